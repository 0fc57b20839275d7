#!/usr/bin/env python3
"""Small JPEGs of every kind the decoder must match libjpeg-turbo on, and the pixels Pillow
(which bundles libjpeg-turbo 3.x, the official pipeline's decoder) gives for each, for
tests/data_jpeg_exact.rs:

    python3 -m venv /work/pil-venv && /work/pil-venv/bin/pip install pillow
    /work/pil-venv/bin/python tools/make-jpeg-kinds.py

The input is a 41x31 crop of tests/data/photos/chelsea.jpg (odd sizes exercise the edge
columns of chroma upsampling). Each `<kind>.jpg` gets `<kind>.rgb`: raw `[H, W, 3]` bytes of
`Image.open(path).convert("RGB")`, the size in `README.txt`.
"""
import os

from PIL import Image, features

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "data")
OUT = os.path.join(ROOT, "jpeg-kinds")


def main():
    src = Image.open(os.path.join(ROOT, "photos", "chelsea.jpg")).convert("RGB")
    img = src.crop((200, 100, 282, 162)).resize((41, 31), Image.BICUBIC)
    kinds = {
        "420": (img, dict(quality=90, subsampling=2)),
        "422": (img, dict(quality=90, subsampling=1)),
        "444": (img, dict(quality=90, subsampling=0)),
        "progressive": (img, dict(quality=90, subsampling=2, progressive=True)),
        "gray": (img.convert("L"), dict(quality=90)),
        "cmyk": (img.convert("CMYK"), dict(quality=90)),
        "restart": (img, dict(quality=90, subsampling=2, restart_marker_blocks=2)),
    }
    os.makedirs(OUT, exist_ok=True)
    lines = [f"Made by tools/make-jpeg-kinds.py with Pillow's libjpeg-turbo "
             f"{features.version('libjpeg_turbo')}; every image is 41x31."]
    for name, (im, kw) in kinds.items():
        path = os.path.join(OUT, f"{name}.jpg")
        im.save(path, "JPEG", **kw)
        back = Image.open(path)
        rgb = back.convert("RGB")
        assert rgb.size == (41, 31)
        with open(os.path.join(OUT, f"{name}.rgb"), "wb") as f:
            f.write(rgb.tobytes())
        lines.append(f"{name}.jpg: {back.mode}, {kw}, {os.path.getsize(path)} bytes")
    with open(os.path.join(OUT, "README.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
