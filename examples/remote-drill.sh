#!/usr/bin/env bash
# volsync remote failover drill: the failover drill of examples/failover-drill.sh with site B
# on "another machine", reached over ssh (here: localhost). Mirror A -> HOST:B, lose A, fail
# over to B, bring A back with a reverse resync pulled from B, hand the role back with
# role-swap; then a cascade with both volumes remote, an off-site copy by send | receive, a
# connection cut in the middle of a transfer (rerun resends only the rest), and a key
# restricted by `serve --restrict-to-path --read-only`.
#
# Runs on generated data in a temporary directory that is removed at the end. At every step
# the files are compared with copies saved beforehand (diff -r, .volsync aside: "the other
# machine" is this one, so its files can be looked at directly); the script exits non-zero
# with a message when anything is not as it should be.
#
# How volsync reaches "the other machine":
#   - VOLSYNC_RSH if set (any ssh-like command: volsync's own --rsh / VOLSYNC_RSH);
#   - else ssh, if `ssh -o BatchMode=yes HOST true` logs in without a password (HOST is
#     DRILL_HOST, default localhost);
#   - else a local stand-in for ssh, written to the temp directory, that runs the command on
#     this machine (it takes ssh's `-o X -p N -l U HOST COMMAND...` arguments). The script
#     says which one it uses.
# The volsync program on the far side: VOLSYNC_REMOTE_PATH if set, else VOLSYNC if set, else
# `command -v volsync`, else `python3 -m volsync`.
#
#   bash examples/remote-drill.sh                     # uses `volsync` from PATH
#   VOLSYNC="python3 -m volsync" bash examples/remote-drill.sh
#   VOLSYNC_RSH="ssh -p 2222" DRILL_HOST=127.0.0.1 bash examples/remote-drill.sh
#   DRILL_STANDIN=1 bash examples/remote-drill.sh    # the stand-in even when ssh works
#   KEEP=1 bash examples/remote-drill.sh              # keep the temp dir for a look afterwards
set -euo pipefail

VOLSYNC=${VOLSYNC:-volsync}
read -r -a VS <<<"$VOLSYNC"          # allows e.g. VOLSYNC="python3 -m volsync"
HOST=${DRILL_HOST:-localhost}

TMP=$(mktemp -d "${TMPDIR:-/tmp}/volsync-remote-drill.XXXXXX")
TMP=$(cd "$TMP" && pwd -P)           # the far side resolves paths too: use real ones here
cleanup() { if [[ -n "${KEEP:-}" ]]; then echo "kept $TMP"; else rm -rf "$TMP"; fi; }
trap cleanup EXIT

A=$TMP/site-a/vol        # the primary (source), on this machine
B=$TMP/site-b/vol        # the mirror, on "the other machine" (created by the first transfer)
RB=$HOST:$B              # B's address, scp form
UB=ssh://$HOST$B         # B's address, URL form
X=$TMP/expect            # saved copies of what the trees should be
mkdir -p "$TMP/site-a" "$TMP/site-b" "$TMP/site-c" "$TMP/bin" "$X"

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
    "${VS[@]}" "$@" --json >"$out" 2>"$out.err"
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

children_of() { # PID -> the pids of its child processes (from /proc: no procps needed)
    local stat rest ppid
    for stat in /proc/[0-9]*/stat; do
        rest=$(cat "$stat" 2>/dev/null) || continue
        rest=${rest##*) }                 # after "pid (comm) ": state ppid ...
        read -r _ ppid _ <<<"$rest"
        [[ $ppid == "$1" ]] && { stat=${stat#/proc/}; echo "${stat%/stat}"; }
    done
    return 0
}

# status_is VOL MODE UPSTREAM LATEST     check volsync status --json (VOL local or remote);
# UPSTREAM is null, or a pattern the recorded upstream must match (bash [[ == ]])
status_is() {
    local vol=$1 mode=$2 up=$3 latest=$4
    vsj "$TMP/st.json" status "$vol"
    [[ $(jq_py "$TMP/st.json" 'd["mode"]') == "$mode" ]] || die "status $vol: mode should be $mode"
    local got
    got=$(jq_py "$TMP/st.json" 'd["upstream"]')
    # shellcheck disable=SC2053  # $up is a pattern on purpose
    [[ $got == $up ]] || die "status $vol: upstream is $got, should be $up"
    [[ $(jq_py "$TMP/st.json" 'd["latest"]') == "$latest" ]] || die "status $vol: latest should be $latest"
    ok "$vol: $mode, upstream $got, latest $latest"
}

lineage_ids() { # VOL -> JSON list of the lineage's [number, id] (VOL local or remote)
    "${VS[@]}" snapshots "$1" --json >"$TMP/lin.json" || die "volsync snapshots $1 failed"
    jq_py "$TMP/lin.json" '[[s["number"], s["id"]] for s in d["snapshots"] if not s["preserved"]]'
}

# ---------------------------------------------------------------- how to reach the far side
# A stand-in for ssh: skips ssh's options (-o X, -p N, -l U, lone flags), takes the host, and
# runs the rest as ssh would on the far side: by a shell, in the home directory. Unlike ssh it
# keeps this environment. With STANDIN_FORCED_COMMAND set it runs that instead of what was
# asked (with SSH_ORIGINAL_COMMAND set), as sshd does for a key with command="...".
STANDIN=$TMP/bin/ssh-standin
cat >"$STANDIN" <<'EOF'
#!/usr/bin/env bash
while [[ $# -gt 0 ]]; do
    case $1 in
        --) shift; break ;;
        -[BbcDEeFIiJLlmOoPpQRSWw]) shift 2 ;;     # an option and its value: -o X, -p 22
        -*) shift ;;                               # -p22, -oX=1, or lone flags (-T, -q)
        *) break ;;
    esac
done
[[ $# -ge 2 ]] || { echo "ssh-standin: usage: ssh-standin [options] HOST COMMAND..." >&2; exit 255; }
shift                                              # the host: always this machine
cd "$HOME" 2>/dev/null || cd /
if [[ -n "${STANDIN_FORCED_COMMAND:-}" ]]; then
    SSH_ORIGINAL_COMMAND="$*" exec bash -c "$STANDIN_FORCED_COMMAND"
fi
exec bash -c "$*"
EOF
chmod +x "$STANDIN"

if [[ -n "${VOLSYNC_RSH:-}" ]]; then
    RSH=$VOLSYNC_RSH
    echo "reaching $HOST with VOLSYNC_RSH: $RSH"
elif [[ -z "${DRILL_STANDIN:-}" ]] &&
     ssh -o BatchMode=yes -o ConnectTimeout=5 "$HOST" true </dev/null >/dev/null 2>&1; then
    RSH=ssh
    echo "reaching $HOST with ssh (a key logs in without a password)"
else
    RSH=$STANDIN
    echo "NOTE: no ssh login to $HOST without a password here (or DRILL_STANDIN is set):"
    echo "      using a local stand-in for ssh ($STANDIN), which runs the far side's"
    echo "      command on this machine. Everything else is as over ssh."
fi
export VOLSYNC_RSH=$RSH
eval "RSH_ARGV=($RSH)"               # split as volsync does (shell words, quotes allowed)

if [[ -n "${VOLSYNC_REMOTE_PATH:-}" ]]; then
    REMOTE=$VOLSYNC_REMOTE_PATH
elif [[ $VOLSYNC != volsync ]]; then
    REMOTE=$VOLSYNC
elif command -v volsync >/dev/null; then
    REMOTE=$(command -v volsync)
else
    REMOTE="python3 -m volsync"
fi
export VOLSYNC_REMOTE_PATH=$REMOTE
echo "volsync on the far side: $REMOTE"

# ---------------------------------------------------------------- the drill
step "check the far side answers: volsync status on a remote path that is not a volume"
vs_refused 1 "$TMP/hello.json" status "$HOST:$TMP/site-b"
grep -q "not a volsync volume" "$TMP/hello.json" || die "the far side should say $TMP/site-b is not a volume"

step "create the primary volume A (on this machine) with generated data"
mkdir -p "$A"/projects/alpha "$A"/projects/beta/src "$A"/media "$A"/tmp-empty
for i in $(seq 1 15); do
    { echo "# report $i"; for j in $(seq 1 $((i * 30))); do echo "row $j: value $((i * j))"; done; } \
        >"$A/projects/alpha/report-$i.md"
done
for i in $(seq 1 8); do printf 'int f%d(void) { return %d; }\n' "$i" "$i" >"$A/projects/beta/src/f$i.c"; done
for i in 1 2 3 4; do head -c $((i * 50000 + 7)) /dev/urandom >"$A/media/clip-$i.bin"; done
head -c 1048576 /dev/urandom >"$A/media/disk-image.bin"     # 1 MiB: 16 blocks of 64K
ln -s projects/alpha/report-1.md "$A/latest-report"
echo "primary volume" >"$A/README"
DATA_BYTES=$(du -sb "$A" | cut -f1)
echo "   $(find "$A" -type f | wc -l) files, $DATA_BYTES bytes"
vs init "$A"

step "baseline over ssh: volsync transfer A $RB (B is created on the far side)"
[[ ! -e "$B" ]] || die "B should not exist yet"
vsj "$TMP/t1.json" transfer "$A" "$RB"
[[ $(jq_py "$TMP/t1.json" 'd["added"]') == "[1]" ]] || die "baseline should add snapshot 1"
[[ $(jq_py "$TMP/t1.json" 'd["bytes_on_wire"]') -gt $(jq_py "$TMP/t1.json" 'd["bytes_sent"]') ]] \
    || die "bytes_on_wire should count the data and the protocol around it"
copy_tree "$A" "$X/gen1"
same_tree "$X/gen1" "$B" "B equals A after the baseline"
status_is "$RB" read-only "*:$A" 1         # B names A by this machine's host name
status_is "$A" read-write null 1

step "modify A, then an incremental with --compress and --bwlimit"
printf 'CHANGED!' | dd of="$A/media/disk-image.bin" bs=1 seek=500000 conv=notrunc status=none
echo "new meeting notes" >"$A/projects/alpha/notes.md"
rm "$A/projects/beta/src/f8.c"
vs transfer "$A" "$UB" --dry-run
vsj "$TMP/t2.json" transfer "$A" "$UB" --compress --bwlimit 20M
[[ $(jq_py "$TMP/t2.json" 'd["common"]') == 1 ]] || die "incremental: common snapshot should be 1"
[[ $(jq_py "$TMP/t2.json" 'd["added"]') == "[2]" ]] || die "incremental should add snapshot 2"
SENT=$(jq_py "$TMP/t2.json" 'd["bytes_sent"]')
WIRE=$(jq_py "$TMP/t2.json" 'd["bytes_on_wire"]')
echo "   incremental: $SENT bytes of objects, $WIRE bytes on the wire (the volume: $DATA_BYTES)"
[[ $SENT -gt 0 && $SENT -lt 300000 && $WIRE -lt 400000 ]] \
    || die "incremental should send only the changed blocks ($SENT bytes, $WIRE on the wire)"
ok "only changed blocks crossed the connection"
copy_tree "$A" "$X/gen2"
same_tree "$X/gen2" "$B" "B equals A after the incremental"
[[ $(lineage_ids "$RB") == "$(lineage_ids "$A")" ]] || die "B's lineage (numbers and ids) should equal A's"
ok "B's lineage has A's numbers and ids"

step "nothing new on A: the transfer adds and sends nothing"
vsj "$TMP/t3.json" transfer "$A" "$RB"
[[ $(jq_py "$TMP/t3.json" 'd["added"]') == "[]" ]] || die "nothing new: no snapshot should be added"
[[ $(jq_py "$TMP/t3.json" 'd["bytes_sent"]') == 0 ]] || die "nothing new: no byte should be sent"

step "site A keeps working for a while, then is lost (these changes never reach B)"
echo "written on A after the last transfer" >"$A/projects/alpha/unmirrored-snap.md"
vsj "$TMP/a3.json" snapshot "$A" --label "A-only, never mirrored"
A3_ID=$(jq_py "$TMP/a3.json" 'd["id"]')
copy_tree "$A" "$X/a3"
echo "live change on A when it went down" >"$A/projects/alpha/unmirrored-live.md"
copy_tree "$A" "$X/a-lost"
echo "   *** site A is down: from now on A is not used ***"

step "failover, run on B's machine through ssh: volsync break $RB"
vs break "$RB"
status_is "$RB" read-write null 2
same_tree "$X/gen2" "$B" "break kept B's live tree"

step "users write on B; snapshot B remotely"
echo "written on B during the outage" >"$B/projects/alpha/outage-log.md"
echo "modified on B" >>"$B/projects/alpha/report-2.md"
head -c 70000 /dev/urandom >"$B/media/new-clip.bin"
rm "$B/media/clip-1.bin"
vsj "$TMP/b3.json" snapshot "$RB" --label "on B after failover"
[[ $(jq_py "$TMP/b3.json" 'd["number"]') == 3 ]] || die "B's first own snapshot should be number 3"
[[ $(jq_py "$TMP/b3.json" 'd["id"]') != "$A3_ID" ]] || die "A's and B's snapshot 3 share an id"
ok "B's snapshot 3 is not A's snapshot 3: the lineages diverged after 2"
copy_tree "$B" "$X/b3"
LIN_B=$(lineage_ids "$RB")

step "A is back. A plain transfer to B must refuse with exit 5 (the far side's refusal)"
vs_refused 5 "$TMP/r1.json" transfer "$A" "$RB"
[[ $(jq_py "$TMP/r1.json" 'd["common"]') == 2 ]] || die "the refusal should name common snapshot 2"
same_tree "$X/b3" "$B" "refused transfer left B unchanged"
[[ $(lineage_ids "$RB") == "$LIN_B" ]] || die "refused transfer changed B's lineage"

step "reverse resync pulled from the far side, the plan first: volsync resync $UB A --dry-run"
vsj "$TMP/plan.json" resync "$UB" "$A" --dry-run
[[ $(jq_py "$TMP/plan.json" 'd["common"]') == 2 ]] || die "plan: newest common snapshot should be 2"
[[ $(jq_py "$TMP/plan.json" 'd["added"]') == "[3]" ]] || die "plan: B's snapshot 3 should be added to A"
same_tree "$X/a-lost" "$A" "dry-run left A unchanged"

step "reverse resync: volsync resync $UB A (B's writes come to A; A's own are preserved)"
vsj "$TMP/rs.json" resync "$UB" "$A" --force
same_tree "$X/b3" "$A" "A now equals B"
status_is "$A" read-only "$UB" 3           # A names B by the address it was given
status_is "$RB" read-write null 3
[[ $(lineage_ids "$A") == "$(lineage_ids "$RB")" ]] || die "A's lineage should now equal B's"
vsj "$TMP/all.json" snapshots "$A" --all
jq_py "$TMP/all.json" 'any(s["id"] == "'"$A3_ID"'" and s["preserved"] for s in d["snapshots"])' | grep -qx true \
    || die "A's snapshot 3 ($A3_ID) is not listed as preserved"
vs restore "$A" "$A3_ID" "$TMP/site-a/restored-a3"
same_tree "$X/a3" "$TMP/site-a/restored-a3" "A's old snapshot 3 is preserved and restores as it was"

step "restore on the far side: volsync restore $RB 1 DIR (DIR is a path on B's machine)"
vs restore "$RB" 1 "$TMP/site-b/restored-1"
same_tree "$X/gen1" "$TMP/site-b/restored-1" "snapshot 1 restored on B's machine"

step "planned switchover back: volsync role-swap $RB A --link current"
ln -s "$RB" "$TMP/current"      # the applications' link: a remote volume is named by address
echo "last write on B before the switchover" >"$B/projects/alpha/handover.md"
copy_tree "$B" "$X/handover"
vs role-swap "$RB" "$A" --link "$TMP/current"
[[ "$(readlink "$TMP/current")" == "$A" ]] || die "--link should now point at A"
ok "the link $TMP/current (on this machine) now points at A"
same_tree "$X/handover" "$A" "A has everything, including B's last write"
status_is "$A" read-write null 4
status_is "$RB" read-only "*:$A" 4
[[ $(lineage_ids "$A") == "$(lineage_ids "$RB")" ]] || die "after role-swap the lineages should be equal"

step "business as usual: write on A, volsync transfer A $RB"
echo "back home on A" >"$A/projects/alpha/back-home.md"
vsj "$TMP/t4.json" transfer "$A" "$RB"
[[ $(jq_py "$TMP/t4.json" 'd["added"]') == "[5]" ]] || die "transfer should add snapshot 5"
copy_tree "$A" "$X/final"
same_tree "$X/final" "$B" "B equals A"

step "both volumes remote (data relayed through this machine): cascade $RB -> $HOST:C"
C=$TMP/site-c/vol
vsj "$TMP/t5.json" transfer "$RB" "ssh://$HOST$C"
[[ $(jq_py "$TMP/t5.json" 'd["added"]') == "[1, 2, 3, 4, 5]" ]] || die "C should get snapshots 1-5"
[[ $(jq_py "$TMP/t5.json" 'd["src_snapshot"]') == null ]] || die "a read-only SRC is never snapshotted"
same_tree "$X/final" "$C" "C equals B equals A"
status_is "$HOST:$C" read-only "$RB" 5

step "an off-site copy by stream: volsync send A | ssh $HOST volsync receive D"
D=$TMP/site-c/offsite
"${VS[@]}" send "$A" --to 4 --json >"$TMP/full.stream" 2>"$TMP/send.json" || die "volsync send failed"
tail -n 1 "$TMP/send.json" >"$TMP/send1.json"
[[ $(jq_py "$TMP/send1.json" 'd["added"]') == "[1, 2, 3, 4]" ]] || die "send --to 4 should carry 1-4"
echo "\$ volsync send A --to 4 > full.stream; ssh $HOST volsync receive D < full.stream"
"${RSH_ARGV[@]}" "$HOST" "$REMOTE receive $D --json" <"$TMP/full.stream" >"$TMP/rcv1.json" \
    || die "volsync receive of the full stream failed"
cat "$TMP/rcv1.json"; echo
[[ $(jq_py "$TMP/rcv1.json" 'd["added"]') == "[1, 2, 3, 4]" ]] || die "receive should add 1-4"
echo "\$ volsync send A --from 4 --compress | ssh $HOST volsync receive D"
"${VS[@]}" send "$A" --from 4 --compress 2>/dev/null | "${RSH_ARGV[@]}" "$HOST" "$REMOTE receive $D --json" \
    >"$TMP/rcv2.json" || die "volsync send --from 4 | volsync receive failed"
cat "$TMP/rcv2.json"; echo
[[ $(jq_py "$TMP/rcv2.json" 'd["added"]') == "[5]" ]] || die "the incremental stream should add 5"
same_tree "$X/final" "$D" "D equals A"
echo "\$ head -c 1000 full.stream | volsync receive $TMP/site-c/cut --json   # a cut stream"
set +e
head -c 1000 "$TMP/full.stream" | "${VS[@]}" receive "$TMP/site-c/cut" --json >"$TMP/cut.json" 2>/dev/null
rc=$?
set -e
cat "$TMP/cut.json"; echo
[[ $rc -eq 6 ]] || die "a cut stream should exit 6, not $rc"
[[ -z "$(find "$TMP/site-c/cut" -mindepth 1 -maxdepth 1 ! -name .volsync 2>/dev/null)" ]] \
    || die "a cut stream should commit nothing"
ok "a cut stream exits 6 and commits nothing"

step "the connection drops in the middle of a transfer (exit 1); the rerun resends only the rest"
BIG=$TMP/site-a/big
E=$TMP/site-b/big
mkdir -p "$BIG"
head -c $((100 << 20)) /dev/urandom >"$BIG/image.bin"   # 100 MiB: a receiver seals every 64 MiB
vs init "$BIG" --quiet
vs snapshot "$BIG" --quiet
echo "\$ volsync transfer $BIG $HOST:$E --bwlimit 10M --json &    # cut once 80 MB arrived"
"${VS[@]}" transfer "$BIG" "$HOST:$E" --bwlimit 10M --json >"$TMP/cut1.json" 2>"$TMP/cut1.err" &
VSPID=$!
got=0
for _ in $(seq 1 1200); do            # up to 120 s: wait until the far side holds 80 MB
    got=$(du -sb "$E/.volsync" 2>/dev/null | cut -f1 || true)
    [[ ${got:-0} -ge 80000000 ]] && break
    kill -0 "$VSPID" 2>/dev/null || break
    sleep 0.1
done
kill -0 "$VSPID" 2>/dev/null || die "the transfer ended before the connection could be cut"
[[ ${got:-0} -ge 80000000 ]] || die "the far side did not receive 80 MB within 120 s"
# the connection: volsync's children are the ssh process (or the stand-in's far side)
for child in $(children_of "$VSPID"); do kill -KILL "$child" 2>/dev/null || true; done
rc=0
wait "$VSPID" || rc=$?
cat "$TMP/cut1.json"; sed 's/^/   stderr: /' "$TMP/cut1.err"
[[ $rc -eq 1 ]] || die "a lost connection should exit 1, not $rc"
grep -q Traceback "$TMP/cut1.err" && die "a lost connection printed a traceback"
ok "the cut transfer exited 1"
vsj "$TMP/cutst.json" status "$HOST:$E"
[[ $(jq_py "$TMP/cutst.json" 'd["latest"]') == null ]] || die "the cut transfer should have committed nothing"
[[ $(jq_py "$TMP/cutst.json" 'd["pending"]') != null ]] \
    || die "status should show the interrupted step (pending), as after a crash"
ok "nothing committed; the far side shows the interrupted step as pending"
vsj "$TMP/cut2.json" transfer "$BIG" "$HOST:$E"
AGAIN=$(jq_py "$TMP/cut2.json" 'd["bytes_on_wire"]')
echo "   the rerun sent $AGAIN bytes on the wire (the volume: $((100 << 20)) bytes)"
[[ $AGAIN -lt $((60 << 20)) ]] || die "the rerun should resend only what was not durable ($AGAIN bytes)"
ok "the rerun finished the transfer, resending only what the far side did not hold durably"
cmp "$BIG/image.bin" "$E/image.bin" || die "the mirror's image differs"
vsj "$TMP/vb.json" verify "$HOST:$E"
[[ $(jq_py "$TMP/vb.json" 'd["ok"]') == true ]] || die "verify of the resumed mirror reported problems"

step "a restricted key: command=\"volsync serve --stdio --restrict-to-path SITE-A --read-only\""
echo "   (always with the stand-in, which runs a forced command as sshd would for such a key)"
export STANDIN_FORCED_COMMAND="$REMOTE serve --stdio --restrict-to-path $TMP/site-a --read-only"
vs status "$HOST:$A" --rsh "$STANDIN"
vs_refused 1 "$TMP/x1.json" status "$RB" --rsh "$STANDIN"
grep -q "outside the paths" "$TMP/x1.json" || die "a path outside --restrict-to-path should be refused"
vs_refused 1 "$TMP/x2.json" status "$HOST:$A/../../site-b/vol" --rsh "$STANDIN"
vs_refused 1 "$TMP/x3.json" snapshot "$HOST:$A" --rsh "$STANDIN"
grep -q "read-only" "$TMP/x3.json" || die "a change through a read-only server should be refused"
echo "pulled by a backup host" >"$A/projects/alpha/pulled.md"   # an unsnapshotted change on A
vs_refused 1 "$TMP/x4.json" transfer "$HOST:$A" "$TMP/site-c/pull" --rsh "$STANDIN"
vsj "$TMP/x5.json" transfer "$HOST:$A" "$TMP/site-c/pull" --no-snapshot --rsh "$STANDIN"
same_tree "$X/final" "$TMP/site-c/pull" "a pull with --no-snapshot copies A's latest snapshot"
unset STANDIN_FORCED_COMMAND

step "volsync verify on every copy (the remote ones run on their machine)"
for v in "$A" "$RB" "$HOST:$C" "$HOST:$D"; do
    vsj "$TMP/v.json" verify "$v"
    [[ $(jq_py "$TMP/v.json" 'd["ok"]') == true ]] || die "verify $v reported problems"
    ok "$v verified ($(jq_py "$TMP/v.json" 'd["blocks_checked"]') blocks)"
done

echo
echo "remote drill: all steps passed (far side reached with: $RSH)"
