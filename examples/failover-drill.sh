#!/usr/bin/env bash
# volsync failover drill: mirror A -> B, lose A, fail over to B, bring A back with a reverse
# resync, hand the read-write role back to A with role-swap, and mirror A -> B again.
#
# Runs on generated data in a temporary directory that is removed at the end. At every step the
# files are compared with copies saved beforehand (diff -r, .volsync aside); the script exits
# non-zero with a message when anything is not as it should be.
#
#   bash examples/failover-drill.sh                   # uses `volsync` from PATH
#   VOLSYNC="python3 -m volsync" bash examples/failover-drill.sh
#   KEEP=1 bash examples/failover-drill.sh            # keep the temp dir for a look afterwards
set -euo pipefail

VOLSYNC=${VOLSYNC:-volsync}
read -r -a VS <<<"$VOLSYNC"          # allows e.g. VOLSYNC="python3 -m volsync"

TMP=$(mktemp -d "${TMPDIR:-/tmp}/volsync-drill.XXXXXX")
cleanup() { if [[ -n "${KEEP:-}" ]]; then echo "kept $TMP"; else rm -rf "$TMP"; fi; }
trap cleanup EXIT

A=$TMP/site-a/vol        # the primary (source)
B=$TMP/site-b/vol        # the mirror (created by the first transfer)
X=$TMP/expect            # saved copies of what the trees should be
mkdir -p "$TMP/site-a" "$TMP/site-b" "$X"

# ---------------------------------------------------------------- helpers
die()  { echo "FAIL: $*" >&2; exit 1; }
step() { echo; echo "== step: $*"; }
ok()   { echo "   ok: $*"; }

# vs ARGS...            run volsync, show command and output, fail unless it exits 0
vs() {
    echo "\$ volsync $*"
    local rc=0
    "${VS[@]}" "$@" || rc=$?
    [[ $rc -eq 0 ]] || die "volsync $* exited $rc (expected 0)"
}

# vsj OUT ARGS...       same with --json; stdout saved to OUT (and shown)
vsj() {
    local out=$1; shift
    echo "\$ volsync $* --json"
    local rc=0
    "${VS[@]}" "$@" --json >"$out" || rc=$?
    cat "$out"; echo
    [[ $rc -eq 0 ]] || die "volsync $* --json exited $rc (expected 0)"
    python3 -c 'import json,sys; json.load(open(sys.argv[1]))' "$out" \
        || die "volsync $* --json did not print one JSON object"
}

# vs_refused CODE OUT ARGS...   volsync must exit with CODE (and a JSON error object)
vs_refused() {
    local want=$1 out=$2; shift 2
    echo "\$ volsync $* --json      # expected to be refused with exit $want"
    local rc=0
    set +e
    "${VS[@]}" "$@" --json >"$out" 2>"$out.err" </dev/null  # (no terminal: nothing is asked)
    rc=$?
    set -e
    cat "$out"; echo; sed 's/^/   stderr: /' "$out.err"
    [[ $rc -eq $want ]] || die "volsync $* exited $rc, expected $want"
    [[ $(jq_py "$out" 'd["code"]') == "$want" ]] || die "volsync $*: JSON error object should have code $want"
    grep -q Traceback "$out.err" && die "volsync $* printed a traceback"
    ok "refused with exit $rc"
}

# jq_py FILE EXPR       evaluate a Python expression on the JSON in FILE (bound to d)
jq_py() {
    python3 - "$1" "$2" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
r = eval(sys.argv[2], {"d": d, "len": len, "sorted": sorted, "set": set, "any": any})
print(json.dumps(r) if isinstance(r, (list, dict, bool)) or r is None else r)
EOF
}

# same_tree EXPECTED ACTUAL WHAT   equal trees (contents, symlinks, empty dirs), .volsync aside
same_tree() {
    if diff -r --no-dereference --exclude=.volsync "$1" "$2" >"$TMP/diff.out" 2>&1; then
        ok "$3"
    else
        cat "$TMP/diff.out" >&2
        die "$3: $2 differs from $1"
    fi
}

copy_tree() { rm -rf "$2"; cp -a "$1" "$2"; rm -rf "$2/.volsync"; }

changed() {  # changed_paths of a status JSON as a count (the contract allows a list or a number)
    jq_py "$1" 'd["changed_paths"] if isinstance(d["changed_paths"], int) else len(d["changed_paths"])'
}

# status_is VOL MODE UPSTREAM LATEST     check volsync status --json
status_is() {
    local vol=$1 mode=$2 up=$3 latest=$4
    vsj "$TMP/st.json" status "$vol"
    [[ $(jq_py "$TMP/st.json" 'd["mode"]') == "$mode" ]] || die "status $vol: mode should be $mode"
    if [[ $up == null ]]; then
        [[ $(jq_py "$TMP/st.json" 'd["upstream"]') == null ]] || die "status $vol: upstream should be null"
    else
        python3 - "$TMP/st.json" "$up" <<'EOF' || die "status $vol: upstream should be $up"
import json, os, sys
u = json.load(open(sys.argv[1]))["upstream"]
sys.exit(0 if u and os.path.realpath(u) == os.path.realpath(sys.argv[2]) else 1)
EOF
    fi
    [[ $(jq_py "$TMP/st.json" 'd["latest"]') == "$latest" ]] || die "status $vol: latest should be $latest"
    ok "$vol: $mode, upstream $up, latest $latest"
}

lineage_ids() { # VOL -> JSON list of the lineage's [number, id]
    "${VS[@]}" snapshots "$1" --json >"$TMP/lin.json" || die "volsync snapshots $1 failed"
    jq_py "$TMP/lin.json" '[[s["number"], s["id"]] for s in d["snapshots"] if not s["preserved"]]'
}

# ---------------------------------------------------------------- the drill
step "create the primary volume A with generated data"
mkdir -p "$A"/projects/alpha "$A"/projects/beta/src "$A"/media "$A"/tmp-empty
for i in $(seq 1 15); do
    { echo "# report $i"; for j in $(seq 1 $((i * 30))); do echo "row $j: value $((i * j))"; done; } \
        >"$A/projects/alpha/report-$i.md"
done
for i in $(seq 1 8); do printf 'int f%d(void) { return %d; }\n' "$i" "$i" >"$A/projects/beta/src/f$i.c"; done
for i in 1 2 3 4; do head -c $((i * 50000 + 7)) /dev/urandom >"$A/media/clip-$i.bin"; done
head -c 1048576 /dev/urandom >"$A/media/disk-image.bin"     # 1 MiB: 16 blocks of 64K
: >"$A/projects/.keep"
ln -s projects/alpha/report-1.md "$A/latest-report"
echo "primary volume" >"$A/README"
DATA_BYTES=$(du -sb "$A" | cut -f1)
echo "   $(find "$A" -type f | wc -l) files, $DATA_BYTES bytes"
vs init "$A"
status_is "$A" read-write null null

step "baseline: volsync transfer A B (B is created as a mirror of A)"
[[ ! -e "$B" ]] || die "B should not exist yet"
vsj "$TMP/t1.json" transfer "$A" "$B"
[[ $(jq_py "$TMP/t1.json" 'd["added"]') == "[1]" ]] || die "baseline should add snapshot 1"
echo "   baseline sent $(jq_py "$TMP/t1.json" 'd["bytes_sent"]') bytes in $(jq_py "$TMP/t1.json" 'd["blocks_sent"]') blocks"
copy_tree "$A" "$X/gen1"
same_tree "$X/gen1" "$B" "B equals A after the baseline"
status_is "$B" read-only "$A" 1
status_is "$A" read-write null 1

step "modify A (a few bytes in a 1 MiB file, one new file, one deletion)"
printf 'CHANGED!' | dd of="$A/media/disk-image.bin" bs=1 seek=500000 conv=notrunc status=none
echo "new meeting notes" >"$A/projects/alpha/notes.md"
rm "$A/projects/beta/src/f8.c"
vs status "$A"

step "plan the incremental: volsync transfer A B --dry-run"
LIN_A=$(lineage_ids "$A")
vs transfer "$A" "$B" --dry-run
[[ $(lineage_ids "$A") == "$LIN_A" ]] || die "transfer --dry-run changed A's lineage"
same_tree "$X/gen1" "$B" "dry-run left B unchanged"

step "incremental: volsync transfer A B"
vsj "$TMP/t2.json" transfer "$A" "$B"
[[ $(jq_py "$TMP/t2.json" 'd["common"]') == 1 ]] || die "incremental: common snapshot should be 1"
[[ $(jq_py "$TMP/t2.json" 'd["added"]') == "[2]" ]] || die "incremental should add snapshot 2"
SENT=$(jq_py "$TMP/t2.json" 'd["bytes_sent"]')
echo "   incremental sent $SENT bytes (the volume holds $DATA_BYTES bytes of data)"
[[ $SENT -gt 0 && $SENT -lt 300000 ]] || die "incremental should send only the changed blocks, sent $SENT bytes"
ok "only changed blocks were sent"
copy_tree "$A" "$X/gen2"
same_tree "$X/gen2" "$B" "B equals A after the incremental"
status_is "$B" read-only "$A" 2
[[ $(lineage_ids "$B") == "$(lineage_ids "$A")" ]] || die "B's lineage (numbers and ids) should equal A's"
ok "B's lineage has A's numbers and ids"

step "nothing new on A: volsync transfer A B adds and sends nothing"
vsj "$TMP/t3.json" transfer "$A" "$B"
[[ $(jq_py "$TMP/t3.json" 'd["added"]') == "[]" ]] || die "nothing new: no snapshot should be added"
[[ $(jq_py "$TMP/t3.json" 'd["bytes_sent"]') == 0 ]] || die "nothing new: no byte should be sent"
status_is "$A" read-write null 2

step "site A keeps working for a while, then is lost (these changes never reach B)"
echo "written on A after the last transfer" >"$A/projects/alpha/unmirrored-snap.md"
vsj "$TMP/a3.json" snapshot "$A" --label "A-only, never mirrored"
A3_ID=$(jq_py "$TMP/a3.json" 'd["id"]')
copy_tree "$A" "$X/a3"
echo "live change on A when it went down" >"$A/projects/alpha/unmirrored-live.md"
echo "edited on A when it went down" >>"$A/README"
copy_tree "$A" "$X/a-lost"
LIN_A=$(lineage_ids "$A")
echo "   A: snapshot 3 ($A3_ID) plus live changes, none of it on B"
echo "   *** site A is down: from now on A is not used ***"

step "failover: volsync break B"
vs break "$B"
ln -s "$B" "$TMP/current"       # applications reach the data through this link; now it points at B
status_is "$B" read-write null 2
same_tree "$X/gen2" "$B" "break kept B's live tree"

step "users write on B, then snapshot B"
echo "written on B during the outage" >"$B/projects/alpha/outage-log.md"
echo "modified on B" >>"$B/projects/alpha/report-2.md"
head -c 70000 /dev/urandom >"$B/media/new-clip.bin"
rm "$B/media/clip-1.bin"
vsj "$TMP/b3.json" snapshot "$B" --label "on B after failover"
[[ $(jq_py "$TMP/b3.json" 'd["number"]') == 3 ]] || die "B's first own snapshot should be number 3"
B3_ID=$(jq_py "$TMP/b3.json" 'd["id"]')
[[ "$B3_ID" != "$A3_ID" ]] || die "A's and B's snapshot 3 share an id"
ok "B's snapshot 3 has id $B3_ID (A's snapshot 3 is $A3_ID): the lineages diverged after 2"
copy_tree "$B" "$X/b3"
LIN_B=$(lineage_ids "$B")

step "A is back. A plain transfer now must refuse with exit 5 (diverged: use resync)"
vs_refused 5 "$TMP/r1.json" transfer "$A" "$B"
same_tree "$X/b3" "$B" "refused transfer A B left B unchanged"
[[ $(lineage_ids "$B") == "$LIN_B" ]] || die "refused transfer changed B's lineage"
[[ $(lineage_ids "$A") == "$LIN_A" ]] || die "refused transfer changed A's lineage (snapshotted A?)"
same_tree "$X/a-lost" "$A" "refused transfer A B left A unchanged"
vs_refused 5 "$TMP/r2.json" transfer "$B" "$A"
same_tree "$X/a-lost" "$A" "refused transfer B A left A unchanged"
[[ $(lineage_ids "$A") == "$LIN_A" ]] || die "refused transfer changed A's lineage"

step "reverse resync, the plan first: volsync resync B A --dry-run"
vs resync "$B" "$A" --dry-run
vsj "$TMP/plan.json" resync "$B" "$A" --dry-run
[[ $(jq_py "$TMP/plan.json" 'd["common"]') == 2 ]] || die "plan: newest common snapshot should be 2"
[[ $(jq_py "$TMP/plan.json" 'd["added"]') == "[3]" ]] || die "plan: B's snapshot 3 should be added to A"
[[ $(jq_py "$TMP/plan.json" '3 in d["removed"] or 3 in d["preserved"]') == true ]] \
    || die "plan: A's snapshot 3 should leave A's lineage (removed/preserved)"
same_tree "$X/a-lost" "$A" "dry-run left A unchanged"
[[ $(lineage_ids "$A") == "$LIN_A" ]] || die "resync --dry-run changed A's lineage"

step "A has work B never got: resync B A asks first, and with no terminal refuses (exit 5)"
vs_refused 5 "$TMP/r3.json" resync "$B" "$A"
same_tree "$X/a-lost" "$A" "the refused resync left A unchanged"
[[ $(lineage_ids "$A") == "$LIN_A" ]] || die "the refused resync changed A's lineage"

step "reverse resync: volsync resync B A --force (B's writes go to A; A's own are preserved)"
vsj "$TMP/rs.json" resync "$B" "$A" --force
[[ $(jq_py "$TMP/rs.json" 'd["common"]') == 2 ]] || die "resync: common snapshot should be 2"
same_tree "$X/b3" "$A" "A now equals B"
status_is "$A" read-only "$B" 3
status_is "$B" read-write null 3
[[ $(lineage_ids "$A") == "$(lineage_ids "$B")" ]] || die "A's lineage should now equal B's (numbers and ids)"
ok "A's lineage equals B's"

step "A's unmirrored work is preserved: volsync snapshots A --all"
vs snapshots "$A" --all
vsj "$TMP/all.json" snapshots "$A" --all
jq_py "$TMP/all.json" 'any(s["id"] == "'"$A3_ID"'" and s["preserved"] for s in d["snapshots"])' | grep -qx true \
    || die "A's snapshot 3 ($A3_ID) is not listed as preserved"
vs restore "$A" "$A3_ID" "$TMP/restored-a3"
same_tree "$X/a3" "$TMP/restored-a3" "A's old snapshot 3 restores to what it was"
FOUND=""
for id in $(jq_py "$TMP/all.json" '" ".join(s["id"] for s in d["snapshots"] if s["preserved"] and s["id"] != "'"$A3_ID"'")'); do
    rm -rf "$TMP/restored-p"
    vs restore "$A" "$id" "$TMP/restored-p"
    if diff -r --no-dereference --exclude=.volsync "$X/a-lost" "$TMP/restored-p" >/dev/null; then FOUND=$id; fi
done
[[ -n "$FOUND" ]] || die "A's unsnapshotted live changes are not in any preserved snapshot"
ok "A's live changes when it went down are preserved as $FOUND"

step "planned switchover back: volsync role-swap B A --link current"
echo "last write on B before the switchover" >"$B/projects/alpha/handover.md"
copy_tree "$B" "$X/handover"
vs role-swap "$B" "$A" --link "$TMP/current"
[[ "$(readlink -f "$TMP/current")" == "$(readlink -f "$A")" ]] || die "--link should now point at A"
ok "the application link $TMP/current now points at A"
same_tree "$X/handover" "$A" "A has everything, including B's last write"
same_tree "$X/handover" "$B" "B unchanged"
"${VS[@]}" status "$A" --json >"$TMP/sa.json" || die "volsync status $A failed"
LATEST=$(jq_py "$TMP/sa.json" 'd["latest"]')
[[ $LATEST -eq 4 ]] || die "role-swap should have snapshotted B's last write as 4 and sent it (latest $LATEST)"
status_is "$A" read-write null "$LATEST"
status_is "$B" read-only "$A" "$LATEST"
[[ $(lineage_ids "$A") == "$(lineage_ids "$B")" ]] || die "after role-swap A's and B's lineages should be equal"
ok "A is read-write again, B mirrors A, lineages equal (latest $LATEST)"

step "business as usual: write on A, volsync transfer A B"
echo "back home on A" >"$A/projects/alpha/back-home.md"
sed -i 's/value/VALUE/' "$A/projects/alpha/report-5.md"
vsj "$TMP/t4.json" transfer "$A" "$B"
[[ $(jq_py "$TMP/t4.json" 'd["common"]') == "$LATEST" ]] || die "transfer: common should be $LATEST"
[[ $(jq_py "$TMP/t4.json" 'd["added"]') == "[$((LATEST + 1))]" ]] || die "transfer should add snapshot $((LATEST + 1))"
copy_tree "$A" "$X/final"
same_tree "$X/final" "$B" "B equals A"
status_is "$B" read-only "$A" $((LATEST + 1))

step "volsync verify on both"
for v in "$A" "$B"; do
    vsj "$TMP/v.json" verify "$v"
    [[ $(jq_py "$TMP/v.json" 'd["ok"]') == true ]] || die "verify $v reported problems"
    ok "$v verified ($(jq_py "$TMP/v.json" 'd["blocks_checked"]') blocks)"
done

echo
echo "failover drill: all steps passed"
