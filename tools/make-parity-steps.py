#!/usr/bin/env python3
"""Multi-step parity fixtures: N training iterations of the official DINOv2 code on a tiny model.

Each fixture holds everything one needs to replay the official run step by step: the initial
weights, and for every iteration the global and local crops that the official augmentation
(`DataAugmentationDINO`) made from small synthetic RGB images and the iBOT masks that the
official `MaskingGenerator` + `collate_data_and_cast` drew. The expected outputs are the
official losses of every iteration and the student, teacher and centers after the last one.

What runs is the official code (through `official_dinov2.py`, which says what it shims): `SSLMetaArch.forward_backward` (teacher targets, centering or
Sinkhorn-Knopp, student, heads, DINO + KoLeo + iBOT losses, backward), the official schedules
(`build_schedulers`, `apply_optim_scheduler`), parameter groups (`get_params_groups`: layer
decay, patch-embed lr multiplier, no decay on biases and norms, the last-layer freeze) and
AdamW as `build_optimizer` makes it; clipping per student submodule and the teacher EMA as
`do_train` / `update_teacher` do them (there with FSDP's methods, here with torch's
`clip_grad_norm_` and the same `_foreach` EMA on the modules' parameters). Four things are
shimmed so that it runs on one CPU process without xFormers: tensors' `.cuda()` is the identity,
FSDP's reshard and stream synchronisation are no-ops, xFormers' `BlockDiagonalMask` (used to
run the student head once on a concatenation of inputs) is a plain concatenate-and-split, and a
block given a list of crop sets (the nested path, whose block-diagonal attention keeps the sets
apart) runs on each set. A one-rank
gloo process group serves the centers' all-reduce. Everything else is the default recipe; drop
path is 0 except in the drop-path variant, whose random batch subsets (`torch.randperm` in the
official `drop_add_residual_stochastic_depth`) are recorded and stored, so that a replay runs
the same branches on the same samples.

The reference is computed in float64 (outputs rounded to float32). The same run in float32
gives `f32_errs`, the relative error (the README rule) of each compared group: the loss table,
each center, and the student and the teacher each as one vector of all their parameters; and
`tols` = for each group the smallest power of ten >= 10 * its float32 error, at least 1e-4
(`tol` = the largest, for the golden loader). The losses are stored as `out.losses [steps, 5]`
(loss, dino_local_crops_loss, dino_global_crops_loss, koleo_loss, ibot_loss: the logged
values, koleo and ibot halved as the official log shows them).

Tensors (crop-major as in the golden fixtures; p = patch size, N = (G/p)^2):
    in.param.<backbone.* | dino_head.*>   initial student = teacher weights (official keys)
    in.global_crops [steps, 2*n_img, 3, G, G]   in.local_crops [steps, nl*n_img, 3, Lc, Lc]
    in.masks [steps, 2*n_img, N] U8
    out.losses [steps, 5]
    out.student.<key>, out.teacher.<key>   after the last step
    out.dino_center [1, K], out.ibot_center [1, 1, K] (centering only)
    in.drop_path.global [steps, 2*depth, keep_g] I64, in.drop_path.local [steps, 2*depth, keep_l]
        I64 (drop-path variant): the samples each student branch ran on (branch order block 0
        attention, block 0 FFN, block 1 attention, ...), in the official permutation's order,
        keep = max(int(b * (1 - rate)), 1) of b = 2*n_img global and nl*n_img local crops
params: the model, heads, crops, batch and the official schedule keys (see SPECS below).

Made with the official commit b8931f7bf91576930313be2c6d6af376033b35f0 of
facebookresearch/dinov2, torch 2.15.0 (CPU, one thread), numpy, omegaconf, fvcore, pillow,
torchvision, safetensors:

    python3 -m venv .parity-venv
    .parity-venv/bin/pip install torch torchvision numpy safetensors omegaconf fvcore pillow torchmetrics
    git -C dinov2 archive b8931f7bf91576930313be2c6d6af376033b35f0 | tar -x -C /tmp/dinov2-official
    .parity-venv/bin/python tools/make-parity-steps.py /tmp/dinov2-official tests/parity
"""

import argparse
import json
import math
import os
import random
import sys
import types
import warnings

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from official_dinov2 import import_official, make_cfg, official_iteration, rel_err, save_sorted  # noqa: E402

# (variant, seed, overrides of BASE)
SPECS = [
    ("centering-s0", 0, dict(centering="centering")),
    ("sinkhorn-s1", 1, dict(centering="sinkhorn_knopp")),
    # Stochastic depth at a rate that drops half of each crop set (keep 2 of 4, scale 2): the
    # official run draws its subsets, the fixture records them, dinotrain replays them.
    ("drop-path-s2", 2, dict(centering="centering", drop_path_rate=0.5)),
]

BASE = dict(
    steps=50,
    n_img=2,
    n_images=8,  # synthetic source images, taken in order, n_img per step
    image_size=24,
    embed_dim=32,
    depth=2,
    num_heads=2,
    mlp_ratio=4.0,
    patch_size=4,
    global_crops_size=16,
    local_crops_size=8,
    local_crops_number=2,
    global_crops_scale=[0.32, 1.0],
    local_crops_scale=[0.05, 0.32],
    layerscale=1e-5,
    drop_path_rate=0.0,
    num_register_tokens=0,
    interpolate_offset=0.1,
    interpolate_antialias=False,
    head_n_prototypes=64,
    head_hidden_dim=32,
    head_bottleneck_dim=16,
    head_nlayers=3,
    ibot_separate_head=False,
    dino_loss_weight=1.0,
    koleo_loss_weight=0.1,
    ibot_loss_weight=1.0,
    mask_sample_probability=0.5,
    mask_ratio_min_max=[0.1, 0.5],
    # schedules: epochs * OFFICIAL_EPOCH_LENGTH = steps
    epochs=5,
    official_epoch_length=10,
    warmup_epochs=1,
    freeze_last_layer_epochs=1,
    warmup_teacher_temp_epochs=2,
    base_lr=0.05,
    min_lr=1e-6,
    weight_decay=0.04,
    weight_decay_end=0.4,
    momentum_teacher=0.992,
    final_momentum_teacher=1.0,
    warmup_teacher_temp=0.04,
    teacher_temp=0.07,
    clip_grad=3.0,
    layerwise_decay=0.9,
    patch_embed_lr_mult=0.2,
    adamw_beta1=0.9,
    adamw_beta2=0.999,
)


def synthetic_images(p, seed):
    """Small RGB images with structure at several scales (smooth colour fields plus edges and
    noise), so that crops, flips, jitter and blur all change the pixels."""
    from PIL import Image

    rng = np.random.default_rng(1000 + seed)
    s = p["image_size"]
    yy, xx = np.mgrid[0:s, 0:s] / s
    images = []
    for _ in range(p["n_images"]):
        img = np.zeros((s, s, 3))
        for c in range(3):
            fx, fy, ph = rng.uniform(0.5, 3.0), rng.uniform(0.5, 3.0), rng.uniform(0, 2 * np.pi)
            img[..., c] = 0.5 + 0.35 * np.sin(2 * np.pi * (fx * xx + fy * yy) + ph)
        cx, cy, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.1, 0.3)
        img[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] *= rng.uniform(0.3, 1.0, 3)
        img += rng.normal(0, 0.05, img.shape)
        images.append(Image.fromarray(np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8), "RGB"))
    return images


def make_batches(O, p, cfg, seed):
    """Every iteration's crops and masks, made by the official augmentation and collate."""
    torch = O.torch
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    images = synthetic_images(p, seed)
    aug = O.DataAugmentationDINO(
        cfg.crops.global_crops_scale, cfg.crops.local_crops_scale, cfg.crops.local_crops_number,
        global_crops_size=cfg.crops.global_crops_size, local_crops_size=cfg.crops.local_crops_size)
    side = cfg.crops.global_crops_size // cfg.student.patch_size
    n_tokens = side * side
    mask_generator = O.MaskingGenerator(input_size=(side, side), max_num_patches=0.5 * side * side)
    batches = []
    for step in range(p["steps"]):
        samples = []
        for i in range(p["n_img"]):
            image = images[(step * p["n_img"] + i) % len(images)]
            samples.append((aug(image), None))
        batches.append(O.collate(samples, mask_ratio_tuple=tuple(cfg.ibot.mask_ratio_min_max),
                                 mask_probability=cfg.ibot.mask_sample_probability, dtype=torch.float32,
                                 n_tokens=n_tokens, mask_generator=mask_generator))
    return batches


def initial_state(O, cfg, seed):
    """The official initialisation of the student (the teacher starts as its copy)."""
    O.torch.manual_seed(10_000 + seed)
    model = O.SSLMetaArch(cfg)
    return {k: v.detach().clone() for k, v in model.student.state_dict().items()}


LOSS_NAMES = ["loss", "dino_local_crops_loss", "dino_global_crops_loss", "koleo_loss", "ibot_loss"]


class SubsetRecorder:
    """Records the permutations the official stochastic depth draws (`torch.randperm`, called
    once per student branch and crop set), so that they can be stored and replayed."""

    def __init__(self, torch):
        self.torch, self.real, self.perms = torch, torch.randperm, []

    def __enter__(self):
        def randperm(n, *args, **kwargs):
            perm = self.real(n, *args, **kwargs)
            self.perms.append(perm.clone())
            return perm

        self.torch.randperm = randperm
        return self

    def __exit__(self, *exc):
        self.torch.randperm = self.real


def keep_count(b, rate):
    return max(int(b * (1 - rate)), 1)


def subsets_by_set(perms, p):
    """The recorded permutations as the fixture's two tensors. The official nested block draws,
    per block, attention global, attention local, FFN global, FFN local."""
    depth, rate = p["depth"], p["drop_path_rate"]
    b_global, b_local = 2 * p["n_img"], p["local_crops_number"] * p["n_img"]
    per_step = 4 * depth
    assert len(perms) == p["steps"] * per_step, (len(perms), p["steps"] * per_step)
    out = {"global": [], "local": []}
    for step in range(p["steps"]):
        draws = perms[step * per_step:(step + 1) * per_step]
        rows = {"global": [], "local": []}
        for block in range(depth):
            for branch in range(2):
                for k, (name, b) in enumerate((("global", b_global), ("local", b_local))):
                    perm = draws[4 * block + 2 * branch + k]
                    assert perm.numel() == b, (perm.numel(), b)
                    rows[name].append(perm[:keep_count(b, rate)].numpy())
        for name in out:
            out[name].append(np.stack(rows[name]))
    return {name: np.stack(v).astype(np.int64) for name, v in out.items()}


def run(O, cfg, state, batches, dtype, seed):
    """The official iteration, `steps` times, in `dtype`; returns the losses and final state,
    and the permutations its stochastic depth drew (the same in every dtype: one seed)."""
    torch = O.torch
    torch.manual_seed(20_000 + seed)
    model = O.SSLMetaArch(cfg)
    model.student.load_state_dict(state)
    model.teacher.load_state_dict(state)
    model.to(dtype)
    model.need_to_synchronize_fsdp_streams = False  # no CUDA streams to synchronise
    model.train()
    optimizer = O.train.build_optimizer(cfg, model.get_params_groups())
    schedules = O.train.build_schedulers(cfg)
    losses = []
    recorder = SubsetRecorder(torch)
    for it, batch in enumerate(batches):
        data = {k: (v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in batch.items()}
        with recorder:
            loss_dict = official_iteration(O, cfg, model, optimizer, schedules, it, data)
        logged = {k: float(v) for k, v in loss_dict.items()}
        total = (cfg.dino.loss_weight * (logged["dino_local_crops_loss"] + logged["dino_global_crops_loss"])
                 + 2 * logged["koleo_loss"] + cfg.ibot.loss_weight * 2 * logged["ibot_loss"])
        losses.append([total] + [logged[k] for k in LOSS_NAMES[1:]])
    out = {"losses": np.array(losses)}
    for name, module in (("student", model.student), ("teacher", model.teacher)):
        for k, v in module.state_dict().items():
            out[f"{name}.{k}"] = v.detach().double().numpy()
    if cfg.train.centering == "centering":
        # The official loss applies a center update lazily, when the next step asks for the
        # center: apply the last one, so the centers are those the next step would use.
        model.dino_loss.apply_center_update()
        model.ibot_patch_loss.apply_center_update()
        out["dino_center"] = model.dino_loss.center.detach().double().numpy()
        out["ibot_center"] = model.ibot_patch_loss.center.detach().double().numpy()
    return out, recorder.perms


def group_errors(got, want):
    """Relative errors (README rule) of the compared groups: the loss table, the centers, and the
    student and the teacher each as one vector of all their parameters. Single tensors are not
    compared: a parameter whose true gradient is 0 (the key bias: softmax ignores it) moves by
    AdamW's normalised rounding noise, about lr per step in any precision."""
    flat = lambda d, prefix: np.concatenate([np.ravel(d[k]) for k in sorted(d) if k.startswith(prefix)])
    errs = {k: rel_err(got[k], want[k]) for k in want if "." not in k}
    for model in ("student", "teacher"):
        errs[model] = rel_err(flat(got, model + "."), flat(want, model + "."))
    return errs


def make(O, variant, seed, spec, out_dir):
    torch = O.torch
    p = dict(BASE, **spec)
    cfg = make_cfg(O, p)
    batches = make_batches(O, p, cfg, seed)
    state = initial_state(O, cfg, seed)
    ref, perms = run(O, cfg, {k: v.double() for k, v in state.items()}, batches, torch.float64, seed)
    f32, perms_f32 = run(O, cfg, state, batches, torch.float32, seed)
    assert len(perms) == len(perms_f32) and all(torch.equal(a, b) for a, b in zip(perms, perms_f32))
    errs = group_errors(f32, ref)
    tols = {k: max(1e-4, 10.0 ** math.ceil(math.log10(10 * e))) for k, e in errs.items()}
    tensors = {f"in.param.{k}": v.numpy().astype(np.float32) for k, v in state.items()}
    tensors["in.global_crops"] = np.stack([b["collated_global_crops"].numpy() for b in batches]).astype(np.float32)
    tensors["in.local_crops"] = np.stack([b["collated_local_crops"].numpy() for b in batches]).astype(np.float32)
    tensors["in.masks"] = np.stack([b["collated_masks"].numpy() for b in batches]).astype(np.uint8)
    if p["drop_path_rate"] > 0:
        for name, kept in subsets_by_set(perms, p).items():
            tensors[f"in.drop_path.{name}"] = kept
    else:
        assert not perms, "randperm drawn without drop path"
    tensors.update({f"out.{k}": v.astype(np.float32) for k, v in ref.items()})
    p["lr"] = float(cfg.optim.lr)
    p["upperbound"] = [int(b["upperbound"]) for b in batches]
    meta = {
        "case": "train_steps",
        "variant": variant,
        "params": json.dumps(p, sort_keys=True),
        "tol": f"{max(tols.values()):g}",  # the golden loader's field; the test reads `tols`
        "tols": json.dumps(tols, sort_keys=True),
        "f32_errs": json.dumps({k: float(f"{e:.3e}") for k, e in errs.items()}, sort_keys=True),
    }
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"train_steps-{variant}.safetensors")
    save_sorted(tensors, path, meta)
    first, last = ref["losses"][0], ref["losses"][-1]
    print(f"{path}: loss {first[0]:.5f} -> {last[0]:.5f}\n  float32 errors {meta['f32_errs']}\n  tols {meta['tols']}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("official", help="a checkout of facebookresearch/dinov2")
    ap.add_argument("out_dir", help="where the fixtures go (tests/parity)")
    ap.add_argument("--only", help="make only this variant")
    args = ap.parse_args()
    O = import_official(args.official)
    for variant, seed, spec in SPECS:
        if args.only in (None, variant):
            make(O, variant, seed, spec, args.out_dir)


if __name__ == "__main__":
    main()
