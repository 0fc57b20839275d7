#!/usr/bin/env python3
"""dinotrain and the official DINOv2 code trained side by side on the demo data, both judged by
one and the same k-NN evaluation.

For every seed, in alternating order (so both see the same machine load):
  * dinotrain: `dinotrain train --seed S --steps N [--set ...]` on the embedded demo subset
    (Fashion-MNIST train images 0-9,999), a checkpoint every `--eval-every` steps;
  * the official code: `SSLMetaArch` with its schedules, parameter groups, AdamW, per-submodule
    clipping and EMA (through official_dinov2.py), fed by the official `DataAugmentationDINO`,
    `MaskingGenerator`, `collate_data_and_cast` and `ShardedInfiniteSampler` over the same 10,000
    images, with exactly the configuration dinotrain resolved for the run (its
    `--print-config`: the official keys, the architecture from `dinotrain.embed_dim/depth/
    num_heads`, the schedules stretched as dinotrain stretches them: OFFICIAL_EPOCH_LENGTH =
    N / optim.epochs).
The evaluation, for both: the official `DinoVisionTransformer` built from that configuration
loads the teacher backbone (strict), the 28 px images are resized to the crop size (bicubic,
no crop), ImageNet-normalised, the CLS features L2-normalised, and the official `KnnModule`
(k 20, T 0.07) classifies test images 0-1,999 against the 10,000 training images.

Prints a table per evaluation point and the mean and spread over seeds; writes everything to
OUT/results.json. Needs the parity venv of make-parity-steps.py (plus torchmetrics) and a
release build of dinotrain:

    cargo build --release
    .parity-venv/bin/python tools/side-by-side.py /tmp/dinov2-official --seeds 0 1 2 --steps 600 \\
        --set student.patch_size=8 --set student.drop_path_rate=0.1 --out out/side-by-side

Diagnostic, the official code on dinotrain's batches: a dinotrain run with DINOTRAIN_DUMP_BATCHES
set writes every step's crops and masks; `--only official --official-batches DIR` then trains
the official code on exactly those (the same seed; it waits for files still being written):

    DINOTRAIN_DUMP_BATCHES=/tmp/dump python tools/side-by-side.py ... --only dinotrain --seeds 0 &
    python tools/side-by-side.py ... --only official --seeds 0 --official-batches /tmp/dump
"""

import argparse
import gzip
import json
import math
import os
import statistics
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from official_dinov2 import import_official, official_iteration  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_idx(path):
    """A gzipped IDX file (the demo data): u8 items after a big-endian header."""
    raw = gzip.open(path).read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def demo_data():
    d = os.path.join(REPO, "src/data/demo")
    return (read_idx(f"{d}/train-images-idx3-ubyte.gz"), read_idx(f"{d}/train-labels-idx1-ubyte.gz"),
            read_idx(f"{d}/test-images-idx3-ubyte.gz"), read_idx(f"{d}/test-labels-idx1-ubyte.gz"))


def dinotrain_args(args, seed, out):
    return [args.dinotrain, "train", "--seed", str(seed), "--steps", str(args.steps), "--out", out,
            "--set", f"dinotrain.checkpoint_every={args.eval_every}", "--set", "dinotrain.keep_checkpoints=1000",
            "--set", f"dinotrain.knn_every={args.steps}"] + sum((["--set", s] for s in args.set), [])


def official_cfg(O, resolved_yaml, steps):
    """The official config of the run dinotrain resolved (its --print-config output)."""
    from functools import partial

    run = O.OmegaConf.create(resolved_yaml)
    dt = run.pop("dinotrain")
    for key in ("warmup_teacher_temp_epochs",):
        run.teacher[key] = int(run.teacher[key])
    for key in ("epochs", "warmup_epochs", "freeze_last_layer_epochs"):
        run.optim[key] = int(run.optim[key])
    if steps % run.optim.epochs:
        sys.exit(f"--steps {steps} must be a multiple of optim.epochs {run.optim.epochs} (whole epochs)")

    def vit_custom(**kwargs):
        return O.vits.DinoVisionTransformer(
            embed_dim=dt.embed_dim, depth=dt.depth, num_heads=dt.num_heads, mlp_ratio=4,
            block_fn=partial(O.NestedTensorBlock, attn_class=O.MemEffAttention), **kwargs)

    O.vits.vit_custom = vit_custom
    run.student.arch = "vit_custom"
    run.compute_precision.grad_scaler = False
    run.train.OFFICIAL_EPOCH_LENGTH = steps // run.optim.epochs
    cfg = O.OmegaConf.merge(O.OmegaConf.create(O.default_cfg), run)
    cfg.optim.lr = cfg.optim.base_lr * math.sqrt(cfg.train.batch_size_per_gpu / 1024.0)
    return cfg


class Evaluator:
    """The one evaluation both teachers go through."""

    def __init__(self, O, cfg, data, k=20, temperature=0.07):
        from PIL import Image
        from torchvision import transforms

        torch = O.torch
        self.O, self.cfg, self.k, self.temperature = O, cfg, k, temperature
        size = cfg.crops.global_crops_size
        tf = transforms.Compose([
            transforms.Resize((size, size), interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.ToTensor(), O.make_normalize_transform()])
        prep = lambda images: torch.stack([tf(Image.fromarray(a).convert("RGB")) for a in images])  # noqa: E731
        train_x, train_y, test_x, test_y = data
        self.train_x, self.test_x = prep(train_x), prep(test_x)
        self.train_y = torch.from_numpy(train_y.astype(np.int64))
        self.test_y = torch.from_numpy(test_y.astype(np.int64))

    def backbone(self):
        from dinov2.models import build_model_from_cfg

        model, _ = build_model_from_cfg(self.cfg, only_teacher=True)
        return model

    def features(self, model, x):
        torch = self.O.torch
        with torch.no_grad():
            feats = [model(x[i: i + 500]) for i in range(0, len(x), 500)]
        return torch.nn.functional.normalize(torch.cat(feats), dim=1, p=2)

    def __call__(self, state_dict):
        model = self.backbone()
        model.load_state_dict(state_dict, strict=True)
        model.eval()
        train_f, test_f = self.features(model, self.train_x), self.features(model, self.test_x)
        knn = self.O.KnnModule(train_f, self.train_y, nb_knn=[self.k], T=self.temperature, device="cpu",
                               num_classes=int(self.train_y.max()) + 1)
        probs = knn(test_f)[self.k]
        return float((probs.argmax(1) == self.test_y).float().mean() * 100)


def dinotrain_teacher(path):
    """The teacher backbone of a dinotrain checkpoint, with official keys."""
    from safetensors.torch import load_file

    prefix = "teacher.backbone."
    return {k[len(prefix):]: v for k, v in load_file(path).items() if k.startswith(prefix)}


def run_dinotrain(args, seed, evaluate, out):
    start = time.time()
    log = open(os.path.join(out + ".log"), "w")
    subprocess.run(dinotrain_args(args, seed, out) + ["--overwrite"], check=True, stdout=log, stderr=log)
    minutes = (time.time() - start) / 60
    curve = {}
    for step in range(args.eval_every, args.steps + 1, args.eval_every):
        ckpt = os.path.join(out, "checkpoints", f"step_{step:08d}.safetensors")
        curve[step] = evaluate(dinotrain_teacher(ckpt))
    losses = [json.loads(line)["losses"] for line in open(os.path.join(out, "metrics.jsonl"))]
    return dict(curve=curve, minutes=minutes, losses=window_means(losses, args.eval_every))


def window_means(losses, every):
    """The mean of each logged loss term over each window of `every` steps (official names;
    dinotrain's `total` is the official `loss`)."""
    out = {}
    for start in range(0, len(losses), every):
        window = losses[start: start + every]
        for name in window[0]:
            key = "loss" if name == "total" else name
            out.setdefault(key, []).append(statistics.mean(float(w[name]) for w in window))
    return out


def dumped_batch(O, cfg, folder, it):
    """DIAGNOSTIC: iteration `it`'s crops and masks as a dinotrain built with a dump hook wrote
    them (f32 global and local crops, crop-major; u64 upper bound; u8 masks), waiting for the
    file, collated as the official `collate_data_and_cast` would."""
    import numpy as np

    torch = O.torch
    path = os.path.join(folder, f"step_{it:06d}.bin")
    n_img, g, lc, nl = (cfg.train.batch_size_per_gpu, cfg.crops.global_crops_size, cfg.crops.local_crops_size,
                        cfg.crops.local_crops_number)
    n_tok = (g // cfg.student.patch_size) ** 2
    size = 4 * (2 * n_img * 3 * g * g + nl * n_img * 3 * lc * lc) + 8 + 2 * n_img * n_tok
    while not (os.path.exists(path) and os.path.getsize(path) == size):
        time.sleep(1)
    raw = open(path, "rb").read()
    n_g, n_l = 2 * n_img * 3 * g * g, nl * n_img * 3 * lc * lc
    f = np.frombuffer(raw[:4 * (n_g + n_l)], dtype="<f4")
    upperbound = int(np.frombuffer(raw[4 * (n_g + n_l):4 * (n_g + n_l) + 8], dtype="<u8")[0])
    masks = torch.from_numpy(np.frombuffer(raw[4 * (n_g + n_l) + 8:], dtype=np.uint8).copy()).bool().view(2 * n_img, n_tok)
    mask_indices_list = masks.flatten().nonzero().flatten()
    return {
        "collated_global_crops": torch.from_numpy(f[:n_g].copy()).view(2 * n_img, 3, g, g),
        "collated_local_crops": torch.from_numpy(f[n_g:].copy()).view(nl * n_img, 3, lc, lc),
        "collated_masks": masks,
        "mask_indices_list": mask_indices_list,
        "masks_weight": (1 / masks.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(masks)[masks],
        "upperbound": upperbound,
        "n_masked_patches": torch.full((1,), fill_value=mask_indices_list.shape[0], dtype=torch.long),
    }


def run_official(O, cfg, args, seed, data, evaluate):
    from functools import partial

    torch = O.torch
    start = time.time()
    O.fix_random_seeds(seed)
    model = O.SSLMetaArch(cfg)
    model.teacher.load_state_dict(model.student.state_dict())
    model.need_to_synchronize_fsdp_streams = False
    model.train()
    optimizer = O.train.build_optimizer(cfg, model.get_params_groups())
    schedules = O.train.build_schedulers(cfg)

    from PIL import Image

    aug = O.DataAugmentationDINO(
        cfg.crops.global_crops_scale, cfg.crops.local_crops_scale, cfg.crops.local_crops_number,
        global_crops_size=cfg.crops.global_crops_size, local_crops_size=cfg.crops.local_crops_size)
    images = [Image.fromarray(a).convert("RGB") for a in data[0]]

    class Demo(torch.utils.data.Dataset):
        def __len__(self):
            return len(images)

        def __getitem__(self, i):
            return aug(images[i]), int(data[1][i])

    side = cfg.crops.global_crops_size // cfg.student.patch_size
    collate = partial(O.collate, mask_ratio_tuple=tuple(cfg.ibot.mask_ratio_min_max),
                      mask_probability=cfg.ibot.mask_sample_probability, n_tokens=side * side,
                      mask_generator=O.MaskingGenerator(input_size=(side, side), max_num_patches=0.5 * side * side),
                      dtype=torch.float32)
    sampler = O.samplers.ShardedInfiniteSampler(sample_count=len(images), shuffle=True, seed=seed)
    loader = iter(torch.utils.data.DataLoader(Demo(), batch_size=cfg.train.batch_size_per_gpu, sampler=sampler,
                                              num_workers=args.official_workers, drop_last=True,
                                              collate_fn=collate, persistent_workers=args.official_workers > 0))
    curve, train_seconds, losses = {}, 0.0, []
    for it in range(args.steps):
        t0 = time.time()
        data_it = next(loader) if not args.official_batches else dumped_batch(O, cfg, args.official_batches, it)
        loss_dict = official_iteration(O, cfg, model, optimizer, schedules, it, data_it)
        losses.append({k: float(v) for k, v in loss_dict.items()})
        train_seconds += time.time() - t0
        if (it + 1) % args.eval_every == 0:
            curve[it + 1] = evaluate(model.teacher.backbone.state_dict())
            model.train()
    return dict(curve=curve, minutes=(time.time() - start) / 60, train_minutes=train_seconds / 60,
                losses=window_means(losses, args.eval_every))


def summary(results, steps_list):
    lines = []
    for name in ("official", "dinotrain"):
        for step in steps_list:
            accs = [r[name]["curve"][step] for r in results.values() if name in r]
            if accs:
                spread = f"{min(accs):.2f}-{max(accs):.2f}"
                lines.append(f"{name:10s} step {step:5d}: mean {statistics.mean(accs):6.2f}% over {len(accs)} seeds "
                             f"({spread}): " + ", ".join(f"{a:.2f}" for a in accs))
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("official", help="a checkout of facebookresearch/dinov2")
    ap.add_argument("--dinotrain", default=os.path.join(REPO, "target/release/dinotrain"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--set", action="append", default=[], help="a dinotrain --set KEY=VALUE (both runs get it)")
    ap.add_argument("--only", choices=["official", "dinotrain"])
    ap.add_argument("--official-workers", type=int, default=1, help="DataLoader workers of the official run")
    ap.add_argument("--out", default=os.path.join(REPO, "out/side-by-side"))
    ap.add_argument("--official-batches", help="DIAGNOSTIC: train the official code on the batches a dinotrain "
                    "with a dump hook wrote to this folder (step_NNNNNN.bin) instead of its own pipeline")
    args = ap.parse_args()
    if args.steps % args.eval_every:
        sys.exit("--steps must be a multiple of --eval-every")
    os.makedirs(args.out, exist_ok=True)
    O = import_official(args.official)
    O.torch.set_num_threads(os.cpu_count())
    resolved = subprocess.run(dinotrain_args(args, 0, os.path.join(args.out, "print-config")) + ["--print-config"],
                              check=True, capture_output=True, text=True).stdout
    cfg = official_cfg(O, resolved, args.steps)
    data = demo_data()
    evaluate = Evaluator(O, cfg, data)
    results_path = os.path.join(args.out, "results.json")
    results = json.load(open(results_path)) if os.path.exists(results_path) else {}
    results.pop("_config", None)
    results = {s: {n: dict(r, curve={int(k): v for k, v in r["curve"].items()}) for n, r in rs.items()}
               for s, rs in results.items()}
    for i, seed in enumerate(args.seeds):
        order = ["official", "dinotrain"] if i % 2 == 0 else ["dinotrain", "official"]
        for name in order:
            if args.only not in (None, name):
                continue
            if name == "official":
                r = run_official(O, cfg, args, seed, data, evaluate)
            else:
                r = run_dinotrain(args, seed, evaluate, os.path.join(args.out, f"dinotrain-s{seed}"))
            results.setdefault(str(seed), {})[name] = r
            print(f"seed {seed} {name}: " + ", ".join(f"step {s}: {a:.2f}%" for s, a in r["curve"].items())
                  + f" ({r['minutes']:.1f} min)", flush=True)
            with open(results_path + ".tmp", "w") as f:
                json.dump(dict(results, _config=dict(steps=args.steps, set=args.set, eval_every=args.eval_every)),
                          f, indent=1, sort_keys=True)
            os.replace(results_path + ".tmp", results_path)
    print(summary(results, list(range(args.eval_every, args.steps + 1, args.eval_every))))


if __name__ == "__main__":
    main()
