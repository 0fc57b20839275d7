#!/usr/bin/env bash
# Extracts the dinotrain demo dataset from Debian's `dataset-fashion-mnist` package:
# the first 10,000 training images and the first 2,000 test images, with their labels, as
# gzipped IDX files under src/data/demo/ (embedded into the binary by src/data/demo.rs).
#
#   apt-get install -y dataset-fashion-mnist
#   tools/make-demo-data.sh [SOURCE_DIR]
#
# IDX layout: a big-endian u32 magic (0x00000803 images, 0x00000801 labels), one big-endian
# u32 per dimension, then the u8 data. We rewrite the item count and keep the first N items.
set -eu  # no pipefail: `head -c` closes its pipe early on purpose

src="${1:-/usr/share/datasets/fashion-mnist}"
out="$(cd "$(dirname "$0")/.." && pwd)/src/data/demo"
mkdir -p "$out"

# subset NAME_IN NAME_OUT COUNT HEADER_BYTES ITEM_BYTES
subset() {
    local input="$src/$1" output="$out/$2" count=$3 header=$4 item=$5
    [[ -f "$input" ]] || { echo "missing $input (apt-get install -y dataset-fashion-mnist)" >&2; exit 1; }
    local tmp
    tmp="$(mktemp)"
    gzip -dc "$input" > "$tmp"
    {
        head -c 4 "$tmp"                              # magic
        printf "%08x" "$count" | xxd -r -p           # new item count (big endian)
        tail -c +9 "$tmp" | head -c $((header - 8))   # remaining dimension sizes
        tail -c +$((header + 1)) "$tmp" | head -c $((count * item))
    } | gzip -9n > "$output"
    rm -f "$tmp"
    local want=$((header + count * item))
    local got
    got="$(gzip -dc "$output" | wc -c)"
    [[ "$got" == "$want" ]] || { echo "$output: $got bytes, expected $want" >&2; exit 1; }
    echo "$output: $count items, $(stat -c %s "$output") bytes"
}

subset train-images-idx3-ubyte.gz train-images-idx3-ubyte.gz 10000 16 784
subset train-labels-idx1-ubyte.gz train-labels-idx1-ubyte.gz 10000 8 1
subset t10k-images-idx3-ubyte.gz  test-images-idx3-ubyte.gz  2000 16 784
subset t10k-labels-idx1-ubyte.gz  test-labels-idx1-ubyte.gz  2000 8 1
