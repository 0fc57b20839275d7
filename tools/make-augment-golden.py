#!/usr/bin/env python3
"""Reference values for tests/augment_parity.rs: what torchvision and Pillow compute for each
operation of the official DINOv2 augmentation (`DataAugmentationDINO`), for fixed parameters,
and the distribution of `RandomResizedCrop`'s random boxes.

Every pixel value here comes from the library calls the official pipeline makes on PIL images
(torchvision.transforms.functional on a PIL image dispatches to Pillow for resize, colour,
grayscale and solarize, and to a float32 conv2d for the Gaussian blur); nothing is
re-implemented. The script installs nothing. Environment (only PyPI is needed; the default
torch wheel pulls the CUDA libraries, which is harmless: everything runs on the CPU):

    python3 -m venv /work/parity-venv
    /work/parity-venv/bin/pip install torch torchvision pillow numpy safetensors
    /work/parity-venv/bin/python tools/make-augment-golden.py

(versions used for the committed file: see its metadata `versions`.) Output:
tests/data/reference/augment.safetensors.gz, a gzipped safetensors file (format of
tests/golden/README.md: `in.*` inputs, `out.*` references, U8 pixels in HWC order, F32 for the
normalised tensors in CHW order, I64 for histograms) whose metadata `cases` is a JSON list that
names, for each `out.*` tensor, its input, its operation, its parameters and its tolerance.
Running it twice writes the same tensors and metadata (the safetensors library may write
the header's keys in another order, so the bytes can differ).
"""
import gzip
import io
import json
import os

import numpy as np
import PIL
import torch
import torchvision
import torchvision.transforms.functional as F
from PIL import Image
from safetensors.numpy import save
from torchvision import transforms as T

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
OUT = os.path.join(ROOT, "tests", "data", "reference", "augment.safetensors.gz")
BICUBIC = T.InterpolationMode.BICUBIC
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def f32(x):
    """A Python float holding a float32 value, as torch's `uniform_(...).item()` hands out."""
    return float(np.float32(x))


def fashion_mnist(indices):
    with gzip.open(os.path.join(ROOT, "src", "data", "demo", "train-images-idx3-ubyte.gz")) as f:
        raw = f.read()
    n, rows, cols = (int.from_bytes(raw[o : o + 4], "big") for o in (4, 8, 12))
    px = np.frombuffer(raw, np.uint8, offset=16).reshape(n, rows, cols)
    # The demo source hands grayscale images to the augmentation as RGB (R = G = B), like
    # the official decoder's convert("RGB").
    return {f"fm{i}": Image.fromarray(px[i], "L").convert("RGB") for i in indices}


def colour_images():
    out = {}
    base = os.path.join(ROOT, "tests", "data", "reference", "transforms", "input.rgb")
    with open(base + ".txt") as f:
        w, h = (int(v) for v in f.read().split())
    with gzip.open(base + ".gz") as f:
        out["coffee"] = Image.frombytes("RGB", (w, h), f.read())
    # A synthetic image with every hue, saturation and value range, sharp edges and flat areas.
    w, h = 40, 30
    y, x = np.mgrid[0:h, 0:w]
    hsv = np.stack(
        [
            (x * 255 // (w - 1)),
            np.where(y < h // 2, 255, (y * 255) // (h - 1)),
            np.where((x // 8 + y // 6) % 2 == 0, 255, 150 + (x * y) % 100),
        ],
        axis=-1,
    ).astype(np.uint8)
    out["hues"] = Image.fromarray(hsv, "HSV").convert("RGB")
    return out


def px(img):
    return np.asarray(img, dtype=np.uint8).copy()


def normalize(img):
    return F.normalize(F.to_tensor(img), MEAN, STD).numpy().astype(np.float32)


def jitter(img, op, factor):
    fn = {
        "brightness": F.adjust_brightness,
        "contrast": F.adjust_contrast,
        "saturation": F.adjust_saturation,
        "hue": F.adjust_hue,
    }[op]
    return fn(img, factor)


def blur(img, sigma):
    # What transforms.GaussianBlur(kernel_size=9, ...) does with its drawn sigma.
    return F.gaussian_blur(img, [9, 9], [sigma, sigma])


def pipeline(img, plan):
    """One crop of DataAugmentationDINO with every random decision given."""
    i, j, h, w = plan["box"]
    out = F.resized_crop(img, i, j, h, w, [plan["size"]] * 2, BICUBIC, antialias=True)
    if plan["flip"]:
        out = F.hflip(out)
    for op, factor in plan.get("jitter", []):
        out = jitter(out, op, factor)
    if plan["gray"]:
        out = F.rgb_to_grayscale(out, num_output_channels=3)
    if plan.get("sigma") is not None:
        out = blur(out, plan["sigma"])
    if plan["solarize"]:
        out = F.solarize(out, 128)
    return normalize(out)


# Tolerances (max absolute difference per value, and how many values may differ at all).
# Pillow's resize, blends, HSV, luma and solarize are integer or scalar float code: an exact
# re-implementation reproduces them bit for bit, so 0. The blur is a float32 2-D convolution
# (kernel outer(k, k), summed in the order conv2d picks) rounded half to even: another
# summation order moves a sum by a few ulps of 255 (~1e-5), which changes the rounding only
# where the exact value sits within that distance of .5: at most 1 level, on a small fraction
# of values. ToTensor + Normalize is (v / 255 - mean) / std in float32 both sides: 1 ulp.
EXACT = {"max_abs": 0, "max_frac": 0.0}
BLUR_TOL = {"max_abs": 1, "max_frac": 0.01}
NORM_TOL = {"max_abs": 1e-6, "max_frac": 1.0}


def main():
    tensors, cases = {}, []
    images = {**fashion_mnist([0, 1, 2]), **colour_images()}
    for name, img in images.items():
        tensors[f"in.{name}"] = px(img)

    def case(name, image, op, params, value, tol):
        tensors[f"out.{name}"] = value
        cases.append({"name": name, "input": image, "op": op, "params": params, "tol": tol})

    boxes = {
        # (i, j, h, w) -> size: upsampling (global crops of 28 px images to 32), downsampling
        # (local crops to 16), non-square boxes, the whole image.
        "fm0": [((2, 3, 20, 17), 32), ((0, 0, 28, 28), 32), ((5, 7, 9, 11), 16), ((1, 0, 27, 26), 16)],
        "fm1": [((4, 4, 23, 19), 32), ((10, 2, 6, 5), 16)],
        "fm2": [((0, 5, 22, 22), 32)],
        "coffee": [((5, 9, 38, 47), 32), ((5, 9, 38, 47), 96), ((20, 30, 12, 9), 16), ((0, 0, 54, 72), 24)],
        "hues": [((3, 2, 25, 30), 32), ((0, 0, 30, 40), 16)],
    }
    for image, bs in boxes.items():
        for k, (box, size) in enumerate(bs):
            out = F.resized_crop(images[image], *box, [size, size], BICUBIC, antialias=True)
            case(f"rrc.{image}.{k}", image, "resized_crop", {"box": box, "size": size}, px(out), EXACT)
    factors = {
        "brightness": [0.6, 0.8137, 1.2291, 1.4],
        "contrast": [0.6, 0.7433, 1.1827, 1.4],
        "saturation": [0.8, 0.9126, 1.0871, 1.2],
        "hue": [-0.1, -0.0437, 0.0291, 0.0999],
    }
    for name, img in images.items():
        case(f"flip.{name}", name, "hflip", {}, px(F.hflip(img)), EXACT)
        for op, fs in factors.items():
            for k, fac in enumerate(fs):
                fac = f32(fac)
                out = jitter(img, op, fac)
                case(f"{op}.{name}.{k}", name, op, {"factor": fac}, px(out), EXACT)
        order = [("hue", f32(0.0713)), ("contrast", f32(1.3124)), ("brightness", f32(0.7151)), ("saturation", f32(1.1532))]
        out = img
        for op, fac in order:
            out = jitter(out, op, fac)
        case(f"jitter4.{name}", name, "jitter", {"ops": order}, px(out), EXACT)
        gray = F.rgb_to_grayscale(img, num_output_channels=3)
        case(f"gray.{name}", name, "grayscale", {}, px(gray), EXACT)
        for k, s in enumerate([0.1, 0.5, 1.3173, 2.0]):
            s = f32(s)
            case(f"blur.{name}.{k}", name, "blur", {"sigma": s, "kernel_size": 9}, px(blur(img, s)), BLUR_TOL)
        case(f"solarize.{name}", name, "solarize", {"threshold": 128}, px(F.solarize(img, 128)), EXACT)
        case(f"normalize.{name}", name, "normalize", {"mean": MEAN, "std": STD}, normalize(img), NORM_TOL)
    # Whole crops: every decision given, the official order of operations.
    plans = [
        ("fm0", {"box": (2, 3, 20, 17), "size": 32, "flip": True, "jitter": [("contrast", f32(1.234)), ("hue", f32(0.05)), ("brightness", f32(0.81)), ("saturation", f32(0.9))], "gray": False, "sigma": None, "solarize": False}),
        ("fm1", {"box": (4, 4, 23, 19), "size": 32, "flip": False, "jitter": [("brightness", f32(1.31)), ("saturation", f32(1.1)), ("contrast", f32(0.66)), ("hue", f32(-0.08))], "gray": True, "sigma": f32(1.61), "solarize": True}),
        ("fm2", {"box": (10, 2, 6, 5), "size": 16, "flip": True, "jitter": [], "gray": False, "sigma": f32(0.73), "solarize": False}),
        ("coffee", {"box": (5, 9, 38, 47), "size": 32, "flip": True, "jitter": [("saturation", f32(1.18)), ("hue", f32(-0.031)), ("contrast", f32(0.93)), ("brightness", f32(1.07))], "gray": False, "sigma": f32(1.1), "solarize": True}),
        ("hues", {"box": (3, 2, 25, 30), "size": 16, "flip": False, "jitter": [("hue", f32(0.093)), ("brightness", f32(0.62)), ("saturation", f32(0.85)), ("contrast", f32(1.39))], "gray": False, "sigma": None, "solarize": False}),
    ]
    # A whole crop's pixels are exact up to the blur's rounding; a level of 8-bit error is
    # 1 / (255 * std) ~ 0.018 after normalisation.
    for k, (image, plan) in enumerate(plans):
        tol = {"max_abs": 0.02, "max_frac": 0.02} if plan["sigma"] is not None else NORM_TOL
        case(f"crop.{k}", image, "crop", plan, pipeline(images[image], plan), tol)
    # RandomResizedCrop.get_params: histograms of (w, h), x and y over many draws.
    n_draws = 200_000
    torch.manual_seed(0)
    for k, (w, h, scale) in enumerate([(28, 28, (0.32, 1.0)), (28, 28, (0.05, 0.32)), (72, 54, (0.05, 0.32)), (60, 20, (0.32, 1.0))]):
        img = Image.new("RGB", (w, h))
        wh = np.zeros((w + 1, h + 1), np.int64)
        xs, ys = np.zeros(w, np.int64), np.zeros(h, np.int64)
        for _ in range(n_draws):
            i, j, hh, ww = T.RandomResizedCrop.get_params(img, scale, (3 / 4, 4 / 3))
            wh[ww, hh] += 1
            xs[j] += 1
            ys[i] += 1
        params = {"width": w, "height": h, "scale": scale, "ratio": (3 / 4, 4 / 3), "draws": n_draws}
        tensors[f"out.rrc_params.{k}.wh"] = wh
        tensors[f"out.rrc_params.{k}.x"] = xs
        tensors[f"out.rrc_params.{k}.y"] = ys
        cases.append({"name": f"rrc_params.{k}", "input": None, "op": "rrc_params", "params": params, "tol": {}})
    meta = {
        "cases": json.dumps(cases),
        "versions": json.dumps({"torch": torch.__version__, "torchvision": torchvision.__version__, "pillow": PIL.__version__, "numpy": np.__version__}),
    }
    blob = save({k: np.ascontiguousarray(v) for k, v in sorted(tensors.items())}, metadata=meta)
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0, compresslevel=9) as f:
        f.write(blob)
    with open(OUT, "wb") as f:
        f.write(buf.getvalue())
    print(f"{OUT}: {len(cases)} cases, {len(blob)} bytes, {len(buf.getvalue())} gzipped")


if __name__ == "__main__":
    main()
