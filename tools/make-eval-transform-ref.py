#!/usr/bin/env python3
"""Reference outputs of the official evaluation transform (torchvision on PIL images), for
tests/eval_transform.rs:

    Resize(round(size * 256 / 224), BICUBIC) -> CenterCrop(size) -> ToTensor -> Normalize

Inputs are synthetic RGB images given by a formula that the Rust test evaluates too, so no
input file is committed. For each case the JSON records the resized size, the crop offsets that
torchvision's CenterCrop chose (int(round((L - size) / 2)), round half to even) and the
cropped 8-bit pixels (all of them for size 32, every 8th row and column for size 224) and the
normalised float32 output (every 4th / 32nd row and column), as decimal strings.

    python3 -m venv /work/pil-venv && /work/pil-venv/bin/pip install pillow torch torchvision numpy
    /work/pil-venv/bin/python tools/make-eval-transform-ref.py
"""
import json
import os

import numpy as np
import PIL
import torch
import torchvision
from PIL import Image
from torchvision import transforms as T

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "data",
                   "reference", "eval", "transform.json")


def pattern(w, h):
    """value(x, y, c) = (3x^2 + 7y + xy + 85c) mod 256, as tests/eval_transform.rs computes it."""
    y, x = np.mgrid[0:h, 0:w].astype(np.int64)
    planes = [(3 * x * x + 7 * y + x * y + 85 * c) % 256 for c in range(3)]
    return Image.fromarray(np.stack(planes, axis=-1).astype(np.uint8), "RGB")


def case(w, h, size, pixel_stride, stride):
    resize = round(size * 256 / 224)
    img = pattern(w, h)
    resized = T.Resize(resize, interpolation=T.InterpolationMode.BICUBIC)(img)
    rw, rh = resized.size
    left = int(round((rw - size) / 2.0))
    top = int(round((rh - size) / 2.0))
    full = T.Compose([
        T.Resize(resize, interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(size),
        T.ToTensor(),
        T.Normalize(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
    ])(img)
    # The crop torchvision took is the resized image at (left, top).
    want = T.ToTensor()(resized)[:, top:top + size, left:left + size]
    assert torch.equal(T.ToTensor()(T.CenterCrop(size)(resized)), want)
    crop = np.asarray(T.CenterCrop(size)(resized))[::pixel_stride, ::pixel_stride]
    sub = full[:, ::stride, ::stride]
    return {
        "width": w, "height": h, "size": size, "resize": resize,
        "resized": [rw, rh], "offset": [left, top],
        "long_minus_size_mod4": (max(rw, rh) - size) % 4,
        "pixel_stride": pixel_stride, "pixels_hex": crop.tobytes().hex(),
        "stride": stride, "values": ["%.9g" % v for v in sub.numpy().flatten()],
    }


def main():
    cases = []
    # size 32 (resize 37): every pixel compared; long sides 37..44 cover every residue mod 4,
    # landscape and portrait, upscaled and downscaled.
    for (w, h) in [(37, 37), (50, 54), (54, 50), (60, 64), (64, 60), (74, 83), (41, 37),
                   (30, 35), (45, 37), (37, 44), (100, 121), (37, 42), (84, 74)]:
        cases.append(case(w, h, 32, 1, 4))
    # size 224 (resize 256): real-photo shapes; every 8th pixel.
    for (w, h) in [(300, 256), (301, 256), (302, 256), (256, 303), (1024, 683), (1920, 1080),
                   (256, 343), (500, 375), (375, 500), (640, 427)]:
        cases.append(case(w, h, 224, 8, 32))
    residues = {(c["size"], c["long_minus_size_mod4"]) for c in cases}
    assert all((s, r) in residues for s in (32, 224) for r in range(4)), residues
    meta = {"pillow": PIL.__version__, "torchvision": torchvision.__version__,
            "formula": "(3*x*x + 7*y + x*y + 85*c) % 256", "cases": cases}
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        json.dump(meta, f, separators=(",", ":"))
        f.write("\n")
    for c in cases:
        print(c["width"], c["height"], c["size"], c["resized"], c["offset"], c["long_minus_size_mod4"])


if __name__ == "__main__":
    main()
