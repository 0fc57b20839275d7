#!/usr/bin/env bash
# The one command for a lent GPU machine (the device tool), from the repository root there:
#   bash tools/gpu-device-run.sh
# with `gpu-bundle.tar.xz` (built here by tools/gpu-bundle.sh) carried along. It unpacks the
# bundle, runs tools/gpu-check.sh into a log folder, and leaves in $OUT what the device tool can
# bring back (at most 8 files): summary.txt, the whole log folder as gpu-logs.tar.gz, and the
# bench JSON files. Exit status: gpu-check's.
set -uo pipefail
OUT="${OUT:-$PWD/out}"
mkdir -p "$OUT"
if [ ! -f gpu-bundle.tar.xz ]; then
    echo "gpu-device-run: gpu-bundle.tar.xz is missing (build it with tools/gpu-bundle.sh and carry it)" >&2
    exit 2
fi
rm -rf gpu-bundle
if ! tar xJf gpu-bundle.tar.xz 2>/dev/null; then
    # No xz in tar: Python's lzma reads it.
    python3 -c 'import tarfile; tarfile.open("gpu-bundle.tar.xz").extractall(".")' || exit 2
fi
logs=/tmp/gpu-logs
rm -rf "$logs"
gpu-bundle/tools/gpu-check.sh "$logs" "$PWD/gpu-bundle"
rc=$?
cp "$logs/summary.txt" "$OUT/" 2>/dev/null
tar czf "$OUT/gpu-logs.tar.gz" -C /tmp gpu-logs
n=0
for f in "$logs"/*.json; do
    [ -f "$f" ] || continue
    n=$((n + 1))
    [ $n -le 5 ] && cp "$f" "$OUT/"
done
exit $rc
