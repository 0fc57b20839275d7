#!/usr/bin/env python3
"""The official DINOv2 multi-crop recipe in torchvision, timed on one core on the same photos
as benches/data.rs, for a side-by-side images/s comparison.

    python3 -m venv /tmp/venv && /tmp/venv/bin/pip install torch torchvision pillow
    /tmp/venv/bin/python benches/data_torchvision.py [SECONDS_PER_CASE]
"""
import glob
import io
import os
import sys
import time

import torch
import torchvision
from PIL import Image
from torchvision import transforms as T

torch.set_num_threads(1)
SECONDS = float(sys.argv[1]) if len(sys.argv) > 1 else 5.0
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "data", "photos")
NAMES = ["astronaut.jpg", "chelsea.jpg", "coffee.jpg", "rocket.jpg"]


def recipe():
    """Effective probabilities of the official code (its blur wrapper inverts p)."""
    bicubic = T.InterpolationMode.BICUBIC
    color = [
        T.RandomApply([T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
    ]
    norm = [T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))]

    def blur(p):
        return T.RandomApply([T.GaussianBlur(9, sigma=(0.1, 2.0))], p=p)

    def geometric(size, scale):
        return [T.RandomResizedCrop(size, scale=scale, interpolation=bicubic), T.RandomHorizontalFlip(0.5)]

    g1 = T.Compose(geometric(224, (0.32, 1.0)) + color + [blur(0.0)] + norm)
    g2 = T.Compose(geometric(224, (0.32, 1.0)) + color + [blur(0.9), T.RandomSolarize(128, p=0.2)] + norm)
    local = T.Compose(geometric(96, (0.05, 0.32)) + color + [blur(0.5)] + norm)

    def apply(img):
        return [g1(img), g2(img)], [local(img) for _ in range(8)]

    return apply


def rate(fn, items):
    """Images per wall-second and per CPU-second of this thread, over about SECONDS."""
    for x in items:  # warm-up
        fn(x)
    n, start, cpu = 0, time.perf_counter(), time.thread_time()
    while time.perf_counter() - start < SECONDS:
        for x in items:
            fn(x)
        n += len(items)
    wall, cpu = time.perf_counter() - start, time.thread_time() - cpu
    return f"{n / wall:8.1f} wall {n / cpu:8.1f} cpu"


def main():
    jpegs = [open(os.path.join(ROOT, n), "rb").read() for n in NAMES]
    progressive = [open(os.path.join(ROOT, "coffee-progressive.jpg"), "rb").read()]
    pil = lambda b: Image.open(io.BytesIO(b)).convert("RGB")
    images = [pil(b) for b in jpegs]
    augment = recipe()
    tv_decode = lambda b: torchvision.io.decode_jpeg(torch.frombuffer(bytearray(b), dtype=torch.uint8))
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, "
          f"Pillow {Image.__version__}, 1 thread, images per wall-second and per CPU-second")
    print(f"decode PIL baseline      {rate(pil, jpegs)}")
    print(f"decode PIL progressive   {rate(pil, progressive)}")
    print(f"decode torchvision.io    {rate(tv_decode, jpegs)}")
    print(f"multi-crop only          {rate(augment, images)}")
    print(f"decode + multi-crop      {rate(lambda b: augment(pil(b)), jpegs)}")


if __name__ == "__main__":
    main()
