#!/usr/bin/env bash
# volsync quickstart: one volume, snapshots, diff, revert (nothing is lost), restore, verify.
#
# Runs on generated data in a temporary directory that is removed at the end.
# Every step is checked; the script exits non-zero with a message when something is wrong.
#
#   bash examples/quickstart.sh                  # uses `volsync` from PATH
#   VOLSYNC="python3 -m volsync" bash examples/quickstart.sh
#   KEEP=1 bash examples/quickstart.sh           # keep the temp dir for a look afterwards
set -euo pipefail

VOLSYNC=${VOLSYNC:-volsync}
read -r -a VS <<<"$VOLSYNC"          # allows e.g. VOLSYNC="python3 -m volsync"

TMP=$(mktemp -d "${TMPDIR:-/tmp}/volsync-quickstart.XXXXXX")
cleanup() { if [[ -n "${KEEP:-}" ]]; then echo "kept $TMP"; else rm -rf "$TMP"; fi; }
trap cleanup EXIT

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

# jq_py FILE EXPR       evaluate a Python expression on the JSON in FILE (bound to d)
jq_py() {
    python3 - "$1" "$2" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
r = eval(sys.argv[2], {"d": d, "len": len, "sorted": sorted, "set": set})
print(json.dumps(r) if isinstance(r, (list, dict, bool)) or r is None else r)
EOF
}

# same_tree EXPECTED ACTUAL WHAT   the two trees are equal (contents, symlinks, empty dirs), .volsync aside
same_tree() {
    if diff -r --no-dereference --exclude=.volsync "$1" "$2" >"$TMP/diff.out" 2>&1; then
        ok "$3"
    else
        cat "$TMP/diff.out" >&2
        die "$3: $2 differs from $1"
    fi
}

# copy_tree SRC DST     a copy of a live tree without .volsync (the expectation for later checks)
copy_tree() { cp -a "$1" "$2"; rm -rf "$2/.volsync"; }

# ---------------------------------------------------------------- data
step "generate a directory of test data"
cd "$TMP"                       # relative paths from here on: the contract allows them
VOL=vol
mkdir -p "$VOL"/docs/notes "$VOL"/src/lib/util "$VOL"/data/bin "$VOL"/empty-dir
for i in $(seq 1 12); do
    { echo "note $i"; for j in $(seq 1 $((i * 20))); do echo "line $j of note $i: the quick brown fox"; done; } \
        >"$VOL/docs/notes/note-$i.txt"
done
for i in $(seq 1 10); do
    printf 'def f%d(x):\n    return x * %d\n' "$i" "$i" >"$VOL/src/lib/mod$i.py"
done
printf 'helpers\n' >"$VOL/src/lib/util/helpers.py"
for i in 1 2 3 4 5; do head -c $((i * 37 * 1024 + i)) /dev/urandom >"$VOL/data/bin/blob-$i.bin"; done
head -c 300000 /dev/urandom >"$VOL/data/big.bin"          # several 64K blocks
echo "volsync quickstart volume" >"$VOL/README.txt"
: >"$VOL/empty-file"
ln -s docs/notes/note-1.txt "$VOL/link-to-note1"
find "$VOL" | sort | sed 's/^/   /'
echo "   $(find "$VOL" -type f | wc -l) files, $(du -sh "$VOL" | cut -f1)"

step "make it a volume: volsync init"
vs init "$VOL"
[[ -d "$VOL/.volsync" ]] || die "init made no $VOL/.volsync"
vsj "$TMP/st.json" status "$VOL"
[[ $(jq_py "$TMP/st.json" 'd["mode"]') == read-write ]] || die "a new volume should be read-write"
[[ $(jq_py "$TMP/st.json" 'd["latest"]') == null ]] || die "a new volume should have no snapshot"
[[ -f "$VOL/README.txt" && -L "$VOL/link-to-note1" && -d "$VOL/empty-dir" ]] || die "init changed the files"
ok "read-write volume, no snapshot yet, files kept in place"

step "first snapshot: volsync snapshot --label first"
vsj "$TMP/s1.json" snapshot "$VOL" --label first
[[ $(jq_py "$TMP/s1.json" 'd["number"]') == 1 ]] || die "first snapshot should be number 1"
ID1=$(jq_py "$TMP/s1.json" 'd["id"]')
copy_tree "$VOL" "$TMP/expect-1"
ok "snapshot 1 has id $ID1"
vs snapshots "$VOL"

step "change files: modify, add, delete"
echo "an appended line" >>"$VOL/docs/notes/note-3.txt"
sed -i 's/return x \* 5/return x * 500/' "$VOL/src/lib/mod5.py"
printf 'PATCHED' | dd of="$VOL/data/big.bin" bs=1 seek=150000 conv=notrunc status=none
echo "a new file" >"$VOL/docs/new.txt"
mkdir -p "$VOL/src/new-pkg" && echo "x = 1" >"$VOL/src/new-pkg/__init__.py"
head -c 5000 /dev/urandom >"$VOL/data/bin/blob-new.bin"
rm "$VOL/docs/notes/note-7.txt" "$VOL/data/bin/blob-2.bin"
MODIFIED=(docs/notes/note-3.txt src/lib/mod5.py data/big.bin)
ADDED=(docs/new.txt src/new-pkg/__init__.py data/bin/blob-new.bin)
DELETED=(docs/notes/note-7.txt data/bin/blob-2.bin)
echo "   modified: ${MODIFIED[*]}"
echo "   added:    ${ADDED[*]}"
echo "   deleted:  ${DELETED[*]}"

step "volsync status shows the live-tree changes"
vs status "$VOL"
vsj "$TMP/st.json" status "$VOL"
[[ $(jq_py "$TMP/st.json" 'd["latest"]') == 1 ]] || die "status: latest should be 1"
NCHANGED=$(jq_py "$TMP/st.json" 'd["changed_paths"] if isinstance(d["changed_paths"], int) else len(d["changed_paths"])')
[[ $NCHANGED -ge 8 ]] || die "status: changed_paths should count the 8 changed files, got $NCHANGED"
ok "latest 1, $NCHANGED changed paths"

step "volsync diff (latest snapshot -> live tree)"
echo "\$ volsync diff $VOL"
"${VS[@]}" diff "$VOL" | tee "$TMP/diff.txt" || die "volsync diff failed"
for p in "${MODIFIED[@]}" "${ADDED[@]}" "${DELETED[@]}"; do
    grep -qF "$p" "$TMP/diff.txt" || die "volsync diff does not mention $p"
done
grep -qF "note-1.txt" "$TMP/diff.txt" && die "volsync diff lists an unchanged file (note-1.txt)"
ok "every changed path is listed, unchanged ones are not"

step "second snapshot: volsync snapshot"
vsj "$TMP/s2.json" snapshot "$VOL"
[[ $(jq_py "$TMP/s2.json" 'd["number"]') == 2 ]] || die "second snapshot should be number 2"
ID2=$(jq_py "$TMP/s2.json" 'd["id"]')
[[ "$ID2" != "$ID1" ]] || die "two snapshots with the same id"
copy_tree "$VOL" "$TMP/expect-2"
vsj "$TMP/st.json" status "$VOL"
[[ $(jq_py "$TMP/st.json" 'd["changed_paths"] if isinstance(d["changed_paths"], int) else len(d["changed_paths"])') == 0 ]] \
    || die "status right after a snapshot should show no changed path"
ok "snapshot 2 has id $ID2, live tree clean"

step "diff between two snapshots: volsync diff VOL 1 2"
"${VS[@]}" diff "$VOL" 1 2 | tee "$TMP/diff12.txt" || die "volsync diff 1 2 failed"
for p in "${MODIFIED[@]}" "${ADDED[@]}" "${DELETED[@]}"; do
    grep -qF "$p" "$TMP/diff12.txt" || die "volsync diff 1 2 does not mention $p"
done
ok "1 -> 2 lists the same changes"

step "list the lineage: volsync snapshots"
vs snapshots "$VOL"
vsj "$TMP/ls.json" snapshots "$VOL"
[[ $(jq_py "$TMP/ls.json" '[s["number"] for s in d["snapshots"]]') == "[1, 2]" ]] || die "lineage should be [1, 2]"
[[ $(jq_py "$TMP/ls.json" '[s["label"] for s in d["snapshots"]][0]') == first ]] || die "snapshot 1 should be labelled 'first'"
ok "lineage 1 2, snapshot 1 labelled 'first'"

step "an unsnapshotted change, then volsync revert VOL 1"
echo "scratch work, never snapshotted" >"$VOL/scratch.txt"
copy_tree "$VOL" "$TMP/expect-live"
vs revert "$VOL" 1
same_tree "$TMP/expect-1" "$VOL" "live tree is back to snapshot 1"
vsj "$TMP/ls.json" snapshots "$VOL"
[[ $(jq_py "$TMP/ls.json" '[s["number"] for s in d["snapshots"] if not s["preserved"]]') == "[1]" ]] \
    || die "after revert the lineage should be [1]"

step "nothing was destroyed: volsync snapshots --all"
vs snapshots "$VOL" --all
vsj "$TMP/all.json" snapshots "$VOL" --all
jq_py "$TMP/all.json" 'any(s["id"] == "'"$ID2"'" and s["preserved"] for s in d["snapshots"])' | grep -qx true \
    || die "snapshot 2 ($ID2) is not listed as preserved"
LIVE_ID=$(jq_py "$TMP/all.json" '[s["id"] for s in d["snapshots"] if s["preserved"] and s["id"] != "'"$ID2"'"]' |
    python3 -c 'import json,sys; l=json.load(sys.stdin); print(l[0] if len(l)==1 else "")')
[[ -n "$LIVE_ID" ]] || die "the unsnapshotted live change should be exactly one more preserved snapshot"
ok "snapshot 2 ($ID2) preserved; live changes preserved as $LIVE_ID"

step "restore the preserved snapshot 2 by id: volsync restore VOL ID DIR"
vs restore "$VOL" "$ID2" restored-2
same_tree "$TMP/expect-2" restored-2 "restored snapshot 2 equals the tree when it was taken"
[[ "$(readlink restored-2/link-to-note1)" == docs/notes/note-1.txt ]] || die "symlink not restored as a symlink"
[[ -d restored-2/empty-dir && -f restored-2/empty-file && ! -s restored-2/empty-file ]] || die "empty dir/file not restored"
[[ ! -e restored-2/.volsync ]] || die "restore should write plain files, not a volume"
cmp "$TMP/expect-2/data/big.bin" restored-2/data/big.bin || die "big.bin differs"
ok "big.bin byte-identical"

step "restore by a short id prefix (8 characters) and the preserved live changes"
vs restore "$VOL" "${ID2:0:8}" restored-2b
same_tree "$TMP/expect-2" restored-2b "restore by 8-character id prefix"
vs restore "$VOL" "$LIVE_ID" restored-live
same_tree "$TMP/expect-live" restored-live "preserved live changes equal the tree before the revert"

step "restore a lineage snapshot by label"
vs restore "$VOL" first restored-1
same_tree "$TMP/expect-1" restored-1 "restore by label 'first'"

step "life goes on after the revert: a new snapshot 2 gets a new id"
echo "after revert" >"$VOL/after-revert.txt"
vsj "$TMP/s3.json" snapshot "$VOL"
[[ $(jq_py "$TMP/s3.json" 'd["number"]') == 2 ]] || die "the next snapshot after revert to 1 should be number 2"
[[ $(jq_py "$TMP/s3.json" 'd["id"]') != "$ID2" ]] || die "the new snapshot 2 reused the old id"
vs snapshots "$VOL" --all
ok "new snapshot 2 has its own id; the old one stays preserved"

step "volsync verify"
vs verify "$VOL"
vsj "$TMP/v.json" verify "$VOL"
[[ $(jq_py "$TMP/v.json" 'd["ok"]') == true ]] || die "verify reported problems"
[[ $(jq_py "$TMP/v.json" 'd["blocks_checked"]') -gt 0 ]] || die "verify checked no block"
ok "all blocks and manifests check out"

echo
echo "quickstart: all steps passed"
