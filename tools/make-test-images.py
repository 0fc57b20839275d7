#!/usr/bin/env python3
"""Makes the small image fixtures under tests/data/ and the reference values the data tests
compare against, with Pillow (the library the official DINOv2 pipeline decodes and augments
with) and numpy.

    python3 -m venv /tmp/venv && /tmp/venv/bin/pip install pillow numpy scikit-image
    /tmp/venv/bin/python tools/make-test-images.py

Photographs come from scikit-image's bundled sample data (public-domain / CC0 images: NASA's
astronaut and rocket, the cat Chelsea, a coffee cup). Everything else is derived from them.
"""
import gzip
import os
import struct
import zlib

import numpy as np
import skimage.data
from PIL import Image, ImageEnhance, ImageOps

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "data")
PHOTOS = os.path.join(ROOT, "photos")
KINDS = os.path.join(ROOT, "kinds")
REF = os.path.join(ROOT, "reference")


def fit(img, w, h):
    """Resize to cover w x h, then centre-crop to exactly w x h."""
    s = max(w / img.width, h / img.height)
    img = img.resize((round(img.width * s), round(img.height * s)), Image.BICUBIC)
    x, y = (img.width - w) // 2, (img.height - h) // 2
    return img.crop((x, y, x + w, y + h))


def save_raw(path, img):
    """Gzipped raw RGB bytes (`path`.gz) plus a one-line header 'W H' in `path`.txt."""
    img = img.convert("RGB")
    with gzip.GzipFile(path + ".gz", "wb", mtime=0) as f:
        f.write(img.tobytes())
    with open(path + ".txt", "w") as f:
        f.write(f"{img.width} {img.height}\n")


def photos():
    os.makedirs(PHOTOS, exist_ok=True)
    src = {
        "astronaut": skimage.data.astronaut(),
        "chelsea": skimage.data.chelsea(),
        "coffee": skimage.data.coffee(),
        "rocket": skimage.data.rocket(),
    }
    out = {}
    for name, arr in src.items():
        img = Image.fromarray(arr).convert("RGB")
        # ImageNet-like size: 500x375 (375x500 for a portrait source; all four are landscape).
        w, h = (375, 500) if img.height > img.width else (500, 375)
        img = fit(img, w, h)
        img.save(os.path.join(PHOTOS, f"{name}.jpg"), quality=90)
        out[name] = img
    out["coffee"].save(os.path.join(PHOTOS, "coffee-progressive.jpg"), quality=90, progressive=True)
    return out


def exif_with_orientation(value):
    exif = Image.Exif()
    exif[0x0112] = value
    return exif.tobytes()


def kinds(ph):
    os.makedirs(KINDS, exist_ok=True)
    os.makedirs(os.path.join(REF, "kinds"), exist_ok=True)
    small = fit(ph["chelsea"], 96, 64)
    gray = fit(ph["astronaut"], 80, 60).convert("L")

    def ref(name, path):
        # What the official pipeline sees: PIL decode, EXIF transpose, convert("RGB").
        img = ImageOps.exif_transpose(Image.open(path))
        save_raw(os.path.join(REF, "kinds", name + ".rgb"), img)

    def save(name, img, **kw):
        path = os.path.join(KINDS, name)
        img.save(path, **kw)
        ref(name, path)

    save("baseline.jpg", small, quality=92)
    save("progressive.jpg", small, quality=92, progressive=True)
    save("gray.jpg", gray, quality=92)
    save("cmyk.jpg", small.convert("CMYK"), quality=95)
    # Stored 64 wide and 96 tall; EXIF orientation 6 says "rotate 90° clockwise to display".
    save("exif-rotate90.jpg", small.transpose(Image.ROTATE_90), quality=92,
         exif=exif_with_orientation(6))
    save("exif-mirror.jpg", small, quality=92, exif=exif_with_orientation(2))
    save("rgb.png", small)
    rgba = small.copy()
    rgba.putalpha(Image.linear_gradient("L").resize(small.size))
    save("rgba.png", rgba)
    save("gray-alpha.png", gray.convert("LA"))
    save("palette.png", small.convert("P", palette=Image.ADAPTIVE, colors=32))
    # 16-bit PNGs, written by hand. Pillow *clips* 16-bit gray to 255 when converting to RGB
    # (the official pipeline would see a white image); dinotrain scales v / 257 instead, and
    # these references say so.
    g16 = np.asarray(gray, dtype=np.uint32) * 256 + 100
    write_png16(os.path.join(KINDS, "gray16.png"), g16[:, :, None])
    rgb16 = np.asarray(small, dtype=np.uint32) * 256 + np.arange(small.width)[None, :, None]
    write_png16(os.path.join(KINDS, "rgb16.png"), rgb16)
    save("image.bmp", small)
    save("image.ppm", small)
    save("image.pgm", gray)
    save("image.tiff", small)
    save("image.webp", small, lossless=True)
    save("UPPER-CASE.JPEG", small, quality=92)
    # A PNG named .jpg decodes by its contents.
    path = os.path.join(KINDS, "png-named.jpg")
    small.save(path, format="PNG")
    ref("png-named.jpg", path)


def write_png16(path, arr):
    h, w, c = arr.shape
    raw = b"".join(b"\0" + arr[y].astype(">u2").tobytes() for y in range(h))
    write_png(path, w, h, 16, 2 if c == 3 else 0, zlib.compress(raw, 9))
    # Reference: the 16-bit values scaled to 8 bits, v / 257 rounded.
    v8 = np.floor(arr / 257.0 + 0.5).astype(np.uint8)
    img = Image.fromarray(np.repeat(v8, 3 // c, axis=2) if c == 1 else v8, "RGB")
    save_raw(os.path.join(REF, "kinds", os.path.basename(path) + ".rgb"), img)


def write_png(path, w, h, depth, color, idat):
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n")
        f.write(chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, color, 0, 0, 0)))
        f.write(chunk(b"IDAT", idat))
        f.write(chunk(b"IEND", b""))


def bad_files():
    bad = os.path.join(ROOT, "bad")
    os.makedirs(bad, exist_ok=True)
    good = open(os.path.join(KINDS, "baseline.jpg"), "rb").read()
    png = open(os.path.join(KINDS, "rgb.png"), "rb").read()
    open(os.path.join(bad, "truncated.jpg"), "wb").write(good[: len(good) // 2])
    open(os.path.join(bad, "truncated.png"), "wb").write(png[: len(png) // 2])
    open(os.path.join(bad, "empty.jpg"), "wb").close()
    open(os.path.join(bad, "text.jpg"), "w").write("this is not an image\n")
    garbage = bytearray(good)
    for i in range(200, len(garbage) - 2, 7):  # keep the header, wreck the entropy-coded data
        garbage[i] = 0xFF
    # Bomb: a header announcing 100000 x 100000 RGB pixels (30 GB) in a 100-byte file.
    write_png(os.path.join(bad, "bomb.png"), 100_000, 100_000, 8, 2, zlib.compress(b"\0" * 64))


def transforms(ph):
    """References for resize, colour and blur on a fixed input."""
    out = os.path.join(REF, "transforms")
    os.makedirs(out, exist_ok=True)
    src = fit(ph["coffee"], 72, 54)
    save_raw(os.path.join(out, "input.rgb"), src)
    box = (9, 5, 9 + 47, 5 + 38)  # x0, y0, x1, y1: what RandomResizedCrop hands to resize
    crop = src.crop(box)
    for size in (160, 21, 38):
        save_raw(os.path.join(out, f"resize-{size}.rgb"), crop.resize((size, size), Image.BICUBIC))
    base = src
    save_raw(os.path.join(out, "brightness-1.3.rgb"), ImageEnhance.Brightness(base).enhance(1.3))
    save_raw(os.path.join(out, "brightness-0.62.rgb"), ImageEnhance.Brightness(base).enhance(0.62))
    save_raw(os.path.join(out, "contrast-0.7.rgb"), ImageEnhance.Contrast(base).enhance(0.7))
    save_raw(os.path.join(out, "contrast-1.35.rgb"), ImageEnhance.Contrast(base).enhance(1.35))
    save_raw(os.path.join(out, "saturation-1.15.rgb"), ImageEnhance.Color(base).enhance(1.15))
    save_raw(os.path.join(out, "saturation-0.83.rgb"), ImageEnhance.Color(base).enhance(0.83))
    for hue in (0.07, -0.09):
        # torchvision's adjust_hue on PIL images, written out.
        h, s, v = base.convert("HSV").split()
        np_h = np.array(h, dtype=np.uint8)
        with np.errstate(over="ignore"):
            np_h += np.array(hue * 255).astype(np.uint8)
        img = Image.merge("HSV", (Image.fromarray(np_h, "L"), s, v)).convert("RGB")
        save_raw(os.path.join(out, f"hue-{hue}.rgb"), img)
    save_raw(os.path.join(out, "grayscale.rgb"), base.convert("L").convert("RGB"))
    save_raw(os.path.join(out, "solarize.rgb"), ImageOps.solarize(base, 128))
    # torchvision's gaussian_blur on a PIL image: float32 2-D kernel, reflect padding, round.
    for sigma in (0.4, 1.3, 2.0):
        x = np.linspace(-4, 4, 9, dtype=np.float32)
        k = np.exp(-0.5 * (x / np.float32(sigma)) ** 2).astype(np.float32)
        k = (k / k.sum()).astype(np.float32)
        k2 = np.outer(k, k).astype(np.float32)
        a = np.asarray(base, dtype=np.float32)
        p = np.pad(a, ((4, 4), (4, 4), (0, 0)), mode="reflect")
        acc = np.zeros_like(a)
        for dy in range(9):
            for dx in range(9):
                acc += k2[dy, dx] * p[dy : dy + a.shape[0], dx : dx + a.shape[1]]
        img = Image.fromarray(np.clip(np.round(acc), 0, 255).astype(np.uint8), "RGB")
        save_raw(os.path.join(out, f"blur-{sigma}.rgb"), img)


if __name__ == "__main__":
    ph = photos()
    kinds(ph)
    bad_files()
    transforms(ph)
