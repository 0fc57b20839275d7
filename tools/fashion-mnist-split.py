#!/usr/bin/env python3
"""Writes a range of Fashion-MNIST images as PNG files in one folder per class, for training
and k-NN on a split other than the embedded demo one (train 0-9,999 / test 0-1,999).

    apt-get install -y dataset-fashion-mnist   # or: apt-get download + dpkg-deb -x
    tools/fashion-mnist-split.py OUT --train 20000 30000 --test 4000 6000 \
        [--source /usr/share/datasets/fashion-mnist]

OUT/train/<class>/<index>.png and OUT/test/<class>/<index>.png; train with
`dinotrain train --data OUT/train --set dinotrain.knn_train=OUT/train --set dinotrain.knn_val=OUT/test`.
Standard library only (gzip, struct, zlib).
"""

import argparse
import gzip
import os
import struct
import zlib

CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]


def read_idx(path):
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic, count = struct.unpack(">II", data[:8])
    if magic == 0x803:
        rows, cols = struct.unpack(">II", data[8:16])
        return [data[16 + i * rows * cols: 16 + (i + 1) * rows * cols] for i in range(count)], (rows, cols)
    if magic == 0x801:
        return list(data[8: 8 + count]), None
    raise SystemExit(f"{path}: unknown IDX magic {magic:#x}")


def png_gray(pixels, rows, cols):
    raw = b"".join(b"\x00" + pixels[r * cols:(r + 1) * cols] for r in range(rows))

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", cols, rows, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


def write_split(out, images, labels, shape, start, end):
    rows, cols = shape
    for i in range(start, end):
        folder = os.path.join(out, CLASSES[labels[i]])
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f"{i:05d}.png"), "wb") as f:
            f.write(png_gray(images[i], rows, cols))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--train", nargs=2, type=int, required=True, metavar=("START", "END"))
    ap.add_argument("--test", nargs=2, type=int, required=True, metavar=("START", "END"))
    ap.add_argument("--source", default="/usr/share/datasets/fashion-mnist")
    args = ap.parse_args()
    for split, prefix, (start, end) in (("train", "train", args.train), ("test", "t10k", args.test)):
        images, shape = read_idx(os.path.join(args.source, f"{prefix}-images-idx3-ubyte.gz"))
        labels, _ = read_idx(os.path.join(args.source, f"{prefix}-labels-idx1-ubyte.gz"))
        if not 0 <= start < end <= len(images):
            raise SystemExit(f"--{split} {start} {end}: the {split} set has {len(images)} images")
        write_split(os.path.join(args.out, split), images, labels, shape, start, end)
        print(f"{split}: images {start}-{end - 1} in {os.path.join(args.out, split)}")


if __name__ == "__main__":
    main()
