#!/usr/bin/env bash
# Builds everything a GPU machine without Rust needs into gpu-bundle/ and packs it into
# gpu-bundle.tar.xz (both git-ignored):
#   gpu-bundle/dinotrain          the release binary
#   gpu-bundle/tests/cuda_*, kernels, ssl_kernels   the GPU test binaries of `cargo test --release`
#   gpu-bundle/benches/cuda_*     the GPU benchmark binaries
#   gpu-bundle/golden/            the golden fixtures (for `dinotrain verify --device cuda`)
#   gpu-bundle/tools/             gpu-check.sh and the PyTorch baselines
# Binaries lose their debug info (line tables are 5x their code) and the archive is solid, so
# the copies of the library in every binary compress away: the device tool carries at most
# 64 MiB with the working tree.
# Kernels are compiled by the pinned nvcc (.ci/run installs it): a missing nvcc is an error.
# Usage: tools/gpu-bundle.sh, then on the GPU machine (from the repository root):
#   tar xJf gpu-bundle.tar.xz && gpu-bundle/tools/gpu-check.sh LOGDIR
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -z "${NVCC:-}" ]; then
    NVCC="$(ls .cuda-venv/lib/python3*/site-packages/nvidia/cu13/bin/nvcc 2>/dev/null | head -n 1 || true)"
fi
if [ -z "$NVCC" ] || [ ! -x "$NVCC" ]; then
    echo "gpu-bundle: no nvcc; run .ci/run once (it installs the pinned wheels) or set NVCC" >&2
    exit 1
fi
export NVCC DINOTRAIN_REQUIRE_NVCC=1

bundle=gpu-bundle
rm -rf "$bundle"
mkdir -p "$bundle/tests" "$bundle/benches" "$bundle/tools"

cargo build --release --bin dinotrain
target_dir="$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')"
cp "$target_dir/release/dinotrain" "$bundle/"

# Every executable cargo names, by its target name (kind test or bench).
copy_executables() {  # $1 = destination folder, then the cargo command
    dest="$1"
    shift
    "$@" --no-run --message-format=json 2>/dev/null | python3 -c '
import json, shutil, sys
dest = sys.argv[1]
for line in sys.stdin:
    try:
        msg = json.loads(line)
    except ValueError:
        continue
    exe = msg.get("executable")
    if msg.get("reason") != "compiler-artifact" or not exe:
        continue
    target = msg["target"]
    kind = target["kind"][0]
    name = target["name"]
    # Only the GPU binaries: the CPU tests run in CI and read fixtures by the build machine paths.
    gpu = name.startswith("cuda_") or (kind == "test" and name in ("kernels", "ssl_kernels"))
    if kind in ("test", "bench") and gpu and name != "cuda_emulator":
        shutil.copy2(exe, f"{dest}/{name}")
        print(f"  {dest}/{name}")
' "$dest"
}
echo "test binaries:"
copy_executables "$bundle/tests" cargo test --release
echo "bench binaries:"
copy_executables "$bundle/benches" cargo bench  # the bench profile (release)
strip --strip-debug "$bundle/dinotrain" "$bundle"/tests/* "$bundle"/benches/*

cp -r tests/golden "$bundle/golden"
cp tools/gpu-check.sh tools/*_baseline.py "$bundle/tools/"
du -sh "$bundle"
XZ_OPT="-6 -T0" tar cJf "$bundle.tar.xz" "$bundle"
size=$(stat -c %s "$bundle.tar.xz")
echo "$bundle.tar.xz: $((size / 1024 / 1024)) MiB"
if [ "$size" -gt $((40 * 1024 * 1024)) ]; then
    echo "gpu-bundle: the archive is over 40 MiB; with the working tree it may not travel" >&2
    exit 1
fi
echo "bundle ready: carry $bundle.tar.xz; there: tar xJf $bundle.tar.xz && $bundle/tools/gpu-check.sh LOGDIR"
