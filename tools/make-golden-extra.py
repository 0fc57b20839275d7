#!/usr/bin/env python3
"""Extra golden fixtures: shapes the first fixture set (head dim 16, plain MLP FFN) leaves out.

What it writes (schema: tests/golden/README.md; same tensor names, metadata keys and
comparison rule as the existing `attention`, `block` and `vit_forward` fixtures):

    attention-hd4-s2            dim 16, 4 heads (head dim 4), batch 3, 5 tokens
    attention-hd8-s3            dim 24, 3 heads (head dim 8), batch 2, 17 tokens
    block-swiglu-s4             dim 48, 3 heads (head dim 16), SwiGLU FFN (width 192 -> 128), 17 tokens
    block-swiglu-hd8-s5         dim 40, 5 heads (head dim 8), SwiGLU FFN (width 160 -> 112), 5 tokens
    vit_forward-swiglu-hd8-s6   img 56, patch 14, D 48, depth 2, 6 heads (head dim 8), SwiGLU FFN,
                                0 registers, masks, 56x56 input (no positional resampling)

Every value is computed by the official DINOv2 modules (dinov2.layers.Attention /
MemEffAttention, NestedTensorBlock, SwiGLUFFNFused, Mlp, LayerScale and
dinov2.models.vision_transformer.DinoVisionTransformer), imported from a checkout whose path is
given on the command line, in float64; outputs are rounded to float32. The xFormers paths are
switched off (XFORMERS_DISABLED=1), so the plain PyTorch code of those modules runs.

Conventions (the same as the existing fixtures):
  * parameters `in.param.<official state-dict key>`, loaded with load_state_dict(strict=True);
  * inputs drawn in float64 by numpy.random.default_rng(N) for variant suffix `sN`, rounded to
    float32, and the reference uses exactly those float32 values. The distributions follow the
    statistics of the existing fixtures' inputs (which do not say how they were drawn): Linear/Conv weights
    N(0, fan_in^-1/2), biases N(0, 0.1^2), LayerNorm weights 1 + N(0, 0.1^2), LayerScale gamma
    U(0.2, 1), cls/mask/register tokens N(0, 1), pos_embed N(0, 0.5^2), x / images and the
    cotangents N(0, 1), masks Bernoulli(0.4) (at least one masked and one unmasked patch per image);
  * L = sum over outputs o of sum(out.o * in.grad_<o>); `out.grad.<input>` = dL/d(input);
  * `f32_err` = the largest README comparison error of a float32 run of the same modules
    against the float64 reference; `tol` = the smallest power of ten >= 10 * f32_err, at least 1e-4.

New `params` keys (everything else as in the existing fixtures of the case):
  * block: `ffn_layer` ("mlp" | "swiglufused") and `ffn_hidden_dim`;
  * vit_forward: `ffn_hidden_dim` (`ffn_layer` already exists there).
  `mlp_hidden_dim` keeps its meaning int(dim * mlp_ratio), the width handed to the FFN
  constructor; `ffn_hidden_dim` is the width the FFN really has: equal for "mlp", and
  (int(mlp_hidden_dim * 2 / 3) + 7) // 8 * 8 for "swiglufused" (w12: [2*ffn_hidden_dim, dim],
  w3: [dim, ffn_hidden_dim]; hidden = silu(first half of w12 x) * second half). With the SwiGLU
  FFN, `act` is "silu" (the official block hands its GELU to the FFN, which ignores it).

The files are written byte for byte reproducibly, laid out like the existing ones (sorted
compact JSON header, tensor data in name order).

Made with the official commit b8931f7bf91576930313be2c6d6af376033b35f0 of
facebookresearch/dinov2 and torch 2.15.0 (CPU, one thread), numpy 2.4, safetensors 0.8.

Run (the official checkout in any folder outside this repository, e.g. from a clone:
`git -C dinov2 archive b8931f7bf91576930313be2c6d6af376033b35f0 | tar -x -C /tmp/dinov2-official`):

    python3 -m venv .golden-venv && .golden-venv/bin/pip install torch safetensors numpy
    .golden-venv/bin/python tools/make-golden-extra.py /path/to/dinov2-checkout tests/golden
    # Check fixtures (new or existing attention/block/vit_forward ones): recompute from their
    # inputs in float64 (must match the stored outputs to ~1e-7) and in float32 (must be <= tol):
    .golden-venv/bin/python tools/make-golden-extra.py /path/to/dinov2-checkout --check tests/golden/block-s0.safetensors ...
"""

import argparse
import json
import math
import os
import sys
import warnings
from functools import partial

import numpy as np

os.environ.setdefault("XFORMERS_DISABLED", "1")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from official_dinov2 import rel_err, save_sorted  # noqa: E402


# --------------------------------------------------------------------------------------------
# The fixtures this script makes: (case, variant, seed, params of the construction).

SPECS = [
    ("attention", "hd4-s2", 2, dict(dim=16, num_heads=4, batch=3, ntok=5)),
    ("attention", "hd8-s3", 3, dict(dim=24, num_heads=3, batch=2, ntok=17)),
    ("block", "swiglu-s4", 4, dict(dim=48, num_heads=3, batch=2, ntok=17, ffn_layer="swiglufused")),
    ("block", "swiglu-hd8-s5", 5, dict(dim=40, num_heads=5, batch=2, ntok=5, ffn_layer="swiglufused")),
    (
        "vit_forward",
        "swiglu-hd8-s6",
        6,
        dict(img_size=56, patch_size=14, embed_dim=48, depth=2, num_heads=6, num_register_tokens=0,
             ffn_layer="swiglufused", batch=2, input_h=56, input_w=56, has_masks=True),
    ),
]


def ffn_width(ffn_layer, mlp_hidden_dim):
    if ffn_layer == "mlp":
        return mlp_hidden_dim
    if ffn_layer in ("swiglufused", "swiglu"):
        return (int(mlp_hidden_dim * 2 / 3) + 7) // 8 * 8
    raise ValueError(f"unknown ffn_layer {ffn_layer}")


def full_params(case, p):
    """The metadata `params` of a case, from the construction values in SPECS."""
    p = dict(p)
    if case == "attention":
        hd = p["dim"] // p["num_heads"]
        p.update(head_dim=hd, scale=hd**-0.5, qkv_bias=True, proj_bias=True)
    elif case == "block":
        ffn = p.get("ffn_layer", "mlp")
        p.setdefault("mlp_ratio", 4.0)
        p["mlp_hidden_dim"] = int(p["dim"] * p["mlp_ratio"])
        p.update(act="gelu_erf" if ffn == "mlp" else "silu", ln_eps=1e-6, layerscale=True,
                 ffn_layer=ffn, ffn_hidden_dim=ffn_width(ffn, p["mlp_hidden_dim"]))
    elif case == "vit_forward":
        ffn = p.get("ffn_layer", "mlp")
        p.setdefault("mlp_ratio", 4.0)
        p["mlp_hidden_dim"] = int(p["embed_dim"] * p["mlp_ratio"])
        ps = p["patch_size"]
        gh, gw = p["input_h"] // ps, p["input_w"] // ps
        m = p["img_size"] // ps
        p.update(
            act="gelu_erf" if ffn == "mlp" else "silu", block_chunks=0, drop_path_rate=0.0,
            ffn_bias=True, qkv_bias=True, proj_bias=True, ffn_layer=ffn,
            ffn_hidden_dim=ffn_width(ffn, p["mlp_hidden_dim"]), grid_h=gh, grid_w=gw,
            n_patches=gh * gw, in_chans=3, interpolate_antialias=False, interpolate_offset=0.1,
            layerscale=True, ln_eps=1e-6,
            pos_embed_interpolated=not (gh * gw == m * m and p["input_h"] == p["input_w"]),
        )
    return p


# --------------------------------------------------------------------------------------------
# The official modules.

def import_official(path):
    sys.path.insert(0, os.path.abspath(path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import torch
        from torch import nn
        from dinov2.layers import Attention, MemEffAttention, Mlp, NestedTensorBlock, SwiGLUFFNFused
        from dinov2.layers import attention as attention_mod
        from dinov2.models.vision_transformer import DinoVisionTransformer
    assert not attention_mod.XFORMERS_AVAILABLE, "xFormers must be off: the plain PyTorch path is the reference"
    torch.set_num_threads(1)
    return dict(torch=torch, nn=nn, Attention=Attention, MemEffAttention=MemEffAttention, Mlp=Mlp,
                NestedTensorBlock=NestedTensorBlock, SwiGLUFFNFused=SwiGLUFFNFused,
                DinoVisionTransformer=DinoVisionTransformer)


def ffn_class(O, name):
    return {"mlp": O["Mlp"], "swiglufused": O["SwiGLUFFNFused"], "swiglu": O["SwiGLUFFNFused"]}[name]


def build(O, case, p, tensors):
    """The official module for a case; `tensors` (names without `in.param.`) tells which biases
    exist when a fixture is re-checked."""
    nn = O["nn"]
    if case == "attention":
        return O["Attention"](p["dim"], num_heads=p["num_heads"], qkv_bias=p["qkv_bias"], proj_bias=p["proj_bias"])
    if case == "block":
        return O["NestedTensorBlock"](
            dim=p["dim"], num_heads=p["num_heads"], mlp_ratio=p["mlp_ratio"],
            qkv_bias="attn.qkv.bias" in tensors, proj_bias="attn.proj.bias" in tensors,
            ffn_bias=any(k.startswith("mlp.") and k.endswith(".bias") for k in tensors),
            init_values=1.0 if p["layerscale"] else None,
            norm_layer=partial(nn.LayerNorm, eps=p["ln_eps"]),
            attn_class=O["MemEffAttention"], ffn_layer=ffn_class(O, p.get("ffn_layer", "mlp")),
        )
    if case == "vit_forward":
        return O["DinoVisionTransformer"](
            img_size=p["img_size"], patch_size=p["patch_size"], in_chans=p["in_chans"],
            embed_dim=p["embed_dim"], depth=p["depth"], num_heads=p["num_heads"],
            mlp_ratio=p["mlp_ratio"], qkv_bias=p["qkv_bias"], ffn_bias=p["ffn_bias"],
            proj_bias=p["proj_bias"], drop_path_rate=p["drop_path_rate"],
            init_values=1.0 if p["layerscale"] else None,
            block_fn=partial(O["NestedTensorBlock"], attn_class=O["MemEffAttention"]),
            ffn_layer=p["ffn_layer"], block_chunks=p["block_chunks"],
            num_register_tokens=p["num_register_tokens"],
            interpolate_antialias=p["interpolate_antialias"],
            interpolate_offset=p["interpolate_offset"],
        )
    raise ValueError(case)


def output_names(case, p):
    if case == "vit_forward":
        names = ["x_norm_clstoken", "x_norm_patchtokens"]
        return names + (["x_norm_regtokens"] if p["num_register_tokens"] > 0 else [])
    return ["out"]


def cotangent_name(case, o):
    return "grad_out" if case in ("attention", "block") else f"grad_{o}"


def compute(O, case, p, inp, dtype):
    """Forward + backward of the official module at `dtype` from the fixture inputs `inp`
    (numpy, `in.` stripped). Returns {output name without `out.`: float64 numpy}."""
    torch = O["torch"]
    tensors = {k[len("param."):]: v for k, v in inp.items() if k.startswith("param.")}
    torch.manual_seed(0)  # construction draws its own init, replaced right below
    mod = build(O, case, p, tensors).to(dtype)
    state = {k: torch.from_numpy(np.array(v, dtype=np.float64)).to(dtype) for k, v in tensors.items()}
    mod.load_state_dict(state, strict=True)
    mod.train()
    params = dict(mod.named_parameters())
    assert set(params) == set(tensors), (sorted(set(params) ^ set(tensors)))

    data_name = "images" if case == "vit_forward" else "x"
    x = torch.from_numpy(np.array(inp[data_name], dtype=np.float64)).to(dtype).requires_grad_(True)
    if case == "vit_forward":
        masks = torch.from_numpy(inp["masks"].astype(bool)) if "masks" in inp else None
        res = mod.forward_features(x, masks=masks)
        outs = {o: res[o] for o in output_names(case, p)}
    else:
        outs = {"out": mod(x)}
    loss = sum((outs[o] * torch.from_numpy(np.array(inp[cotangent_name(case, o)], dtype=np.float64)).to(dtype)).sum()
               for o in outs)
    names = list(params)
    grads = torch.autograd.grad(loss, [x] + [params[n] for n in names], allow_unused=True)
    result = {o: t.detach().double().numpy() for o, t in outs.items()}
    result[f"grad.{data_name}"] = grads[0].double().numpy()
    for n, g in zip(names, grads[1:]):
        result[f"grad.param.{n}"] = (np.zeros(params[n].shape) if g is None else g.double().numpy())
    return result


# --------------------------------------------------------------------------------------------
# Inputs.

def draw_param(rng, name, shape):
    leaf = name.rsplit(".", 1)[-1]
    if leaf == "gamma":
        v = rng.uniform(0.2, 1.0, shape)
    elif leaf == "bias":
        v = 0.1 * rng.standard_normal(shape)
    elif leaf == "weight" and len(shape) == 1:  # LayerNorm
        v = 1.0 + 0.1 * rng.standard_normal(shape)
    elif leaf == "weight":
        v = rng.standard_normal(shape) / math.sqrt(int(np.prod(shape[1:])))
    elif leaf == "pos_embed":
        v = 0.5 * rng.standard_normal(shape)
    elif leaf in ("cls_token", "mask_token", "register_tokens"):
        v = rng.standard_normal(shape)
    else:
        raise ValueError(f"no draw rule for {name}")
    return v.astype(np.float32)


def draw_inputs(O, case, p, seed):
    """All `in.*` tensors of a new fixture (names without `in.`), float32 / uint8."""
    rng = np.random.default_rng(seed)
    inp = {}
    if case == "vit_forward":
        b, h, w = p["batch"], p["input_h"], p["input_w"]
        inp["images"] = rng.standard_normal((b, p["in_chans"], h, w)).astype(np.float32)
        if p["has_masks"]:
            while True:
                masks = (rng.uniform(size=(b, p["n_patches"])) < 0.4).astype(np.uint8)
                if all(0 < m.sum() < p["n_patches"] for m in masks):
                    break
            inp["masks"] = masks
    else:
        inp["x"] = rng.standard_normal((p["batch"], p["ntok"], p["dim"])).astype(np.float32)
    # The parameter names and shapes come from the official module itself.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        O["torch"].manual_seed(0)
        probe = build(O, case, p, _all_bias_names(case))
    for name, t in probe.state_dict().items():
        inp[f"param.{name}"] = draw_param(rng, name, tuple(t.shape))
    # Cotangents, shaped like the outputs (one float64 forward gives the shapes).
    shapes = {k: v.shape for k, v in compute(O, case, p, {**inp, **_zero_cot(case, p)}, O["torch"].float64).items()}
    for o in output_names(case, p):
        inp[cotangent_name(case, o)] = rng.standard_normal(shapes[o]).astype(np.float32)
    return inp


def _all_bias_names(case):
    return {"attn.qkv.bias", "attn.proj.bias", "mlp.w12.bias", "mlp.fc1.bias"} if case == "block" else {}


def _zero_cot(case, p):
    # Placeholder cotangents (scalars broadcast) for the shape probe.
    return {cotangent_name(case, o): np.zeros(()) for o in output_names(case, p)}


# --------------------------------------------------------------------------------------------
# Comparison (tests/golden/README.md) and files.

def max_err(got, want):
    assert set(got) == set(want), sorted(set(got) ^ set(want))
    errs = {k: rel_err(got[k], want[k]) for k in want}
    worst = max(errs, key=errs.get)
    return errs[worst], worst


def make(O, case, variant, seed, spec, out_dir):
    torch = O["torch"]
    p = full_params(case, spec)
    inp = draw_inputs(O, case, p, seed)
    ref = compute(O, case, p, inp, torch.float64)
    f32 = compute(O, case, p, inp, torch.float32)
    f32_err, worst = max_err(f32, ref)
    tol = max(1e-4, 10.0 ** math.ceil(math.log10(10 * f32_err)))
    tensors = {f"in.{k}": np.ascontiguousarray(v) for k, v in inp.items()}
    tensors.update({f"out.{k}": np.ascontiguousarray(v.astype(np.float32)) for k, v in ref.items()})
    meta = {
        "case": case,
        "variant": variant,
        "params": json.dumps(p, sort_keys=True),
        "tol": f"{tol:g}",
        "f32_err": f"{f32_err:.3e}",
    }
    path = os.path.join(out_dir, f"{case}-{variant}.safetensors")
    save_sorted(tensors, path, meta)
    print(f"{path}: f32_err {f32_err:.3e} (worst {worst}), tol {meta['tol']}\n  params {meta['params']}")


def check(O, path):
    """Recomputes a fixture from its own inputs: in float64 (against the stored outputs, which
    must agree to float32 rounding) and in float32 (must be within the fixture's tol)."""
    from safetensors import safe_open
    from safetensors.numpy import load_file

    with safe_open(path, "np") as f:
        meta = f.metadata()
    data = load_file(path)
    case, p, tol = meta["case"], json.loads(meta["params"]), float(meta["tol"])
    inp = {k[3:]: v for k, v in data.items() if k.startswith("in.")}
    want = {k[4:]: v for k, v in data.items() if k.startswith("out.")}
    torch = O["torch"]
    e64, w64 = max_err({k: v.astype(np.float32) for k, v in compute(O, case, p, inp, torch.float64).items()}, want)
    e32, w32 = max_err(compute(O, case, p, inp, torch.float32), want)
    ok = e64 < 1e-6 and e32 <= tol
    print(f"{os.path.basename(path)}: float64 recompute err {e64:.2e} ({w64}); float32 err {e32:.3e} ({w32}) "
          f"vs tol {tol:g} (stored f32_err {meta['f32_err']}): {'ok' if ok else 'FAIL'}")
    return ok


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("official", help="path of a checkout of facebookresearch/dinov2")
    ap.add_argument("out_dir", nargs="?", help="folder to write the fixtures into")
    ap.add_argument("--check", nargs="+", metavar="FIXTURE", help="re-check fixture files instead")
    args = ap.parse_args()
    O = import_official(args.official)
    if args.check:
        sys.exit(0 if all([check(O, f) for f in args.check]) else 1)
    if not args.out_dir:
        ap.error("out_dir is required unless --check is given")
    os.makedirs(args.out_dir, exist_ok=True)
    for case, variant, seed, spec in SPECS:
        make(O, case, variant, seed, spec, args.out_dir)


if __name__ == "__main__":
    main()
