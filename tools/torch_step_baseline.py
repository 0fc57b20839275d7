#!/usr/bin/env python3
"""A DINOv2 training iteration in plain PyTorch: the baseline `dinotrain bench` is compared with.

Self-contained (no dinov2 package, no network), written from the project's specification
(`spec/dinov2.md`): ViT with LayerScale and qkv bias, scaled_dot_product_attention, GELU MLP,
final LayerNorm; mask-token substitution on the masked global crops; the DINO head (3-layer MLP,
L2 normalisation, weight-normed last layer) shared by DINO and iBOT; student on 2 global + n local
crops, teacher (no grad, EMA) on the 2 global crops; DINO cross-entropy with softmax centering
over the official crop pairs, iBOT cross-entropy over the masked patches, KoLeo on the student's
global CLS tokens; per-submodule gradient clipping at 3.0, AdamW with the official parameter
groups (layer-wise lr decay, name-based weight-decay exclusions, last layer at lr 0 during the
first epoch), EMA of every teacher parameter with torch._foreach_lerp_.

Deliberate simplifications (they change no work that the FLOP count includes):
- Local crops take the position embedding through F.interpolate (bicubic, scale factor with the
  official +0.1 offset), as the official code does; the 98-px crops then sit on a 7x7 grid.
- Global and local crops run as two backbone calls instead of one packed xFormers call (same maths).
- The head runs on the M masked tokens, not on a zero-padded buffer of `upperbound` rows.
- Drop path is off (as in `dinotrain bench` by default); schedules are held at their step-0 values.
- Masks follow the official collate (stratified ratios, BEiT block masking) but are drawn before
  the timed loop, as a data loader would.

Precision: bf16 autocast on CUDA (losses, softmax, KoLeo in f32; f32 master weights), f32 on CPU.
FLOPs per image use the same formula as `dinotrain bench` (src/train/bench.rs): matrix products
only, backward = 2 x forward, teacher forward on the global crops, heads on CLS and masked tokens.

    python tools/torch_step_baseline.py --model vits14 --batch-size 64 --device cuda --json out.json
"""

import argparse
import json
import math
import os
import random
import resource
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from torch import nn

H100_BF16_PEAK_TFLOPS = 989.0
# (embed dim, depth, heads); MLP width 4·D. tiny is the Rust preset of that name.
MODELS = {"tiny": (192, 6, 3), "vits14": (384, 12, 6), "vitb14": (768, 12, 12)}
PATCH = 14
LAYERSCALE = 1e-5
STUDENT_TEMP = 0.1
TEACHER_TEMP = 0.07
CENTER_MOMENTUM = 0.9
TEACHER_MOMENTUM = 0.992
KOLEO_WEIGHT = 0.1
CLIP = 3.0
MASK_PROBABILITY = 0.5
MASK_RATIO = (0.1, 0.5)


# ---------------------------------------------------------------------------------------------
# Model


class LayerScale(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), LAYERSCALE))

    def forward(self, x):
        return x * self.gamma


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x):
        b, t, d = x.shape
        # [3, b, heads, t, d/heads]: q, k, v each the next D channels, heads contiguous.
        qkv = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(out.transpose(1, 2).reshape(b, t, d))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.ls1 = LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, 4 * dim)
        self.ls2 = LayerScale(dim)

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=PATCH, stride=PATCH)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # [B, N, D], row-major patches


class Vit(nn.Module):
    """Returns (normalised CLS [B, D], normalised patch tokens [B, N, D])."""

    def __init__(self, dim, depth, heads, img_size):
        super().__init__()
        self.dim = dim
        self.grid = img_size // PATCH
        self.patch_embed = PatchEmbed(dim)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 1e-6)
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid**2, dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.mask_token = nn.Parameter(torch.zeros(1, dim))
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        for m in self.blocks.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def position_embedding(self, grid, dtype):
        if grid == self.grid:
            return self.pos_embed
        m = self.grid
        patch_pos = self.pos_embed[:, 1:].float().reshape(1, m, m, self.dim).permute(0, 3, 1, 2)
        # Official: a scale factor (grid + 0.1) / M, bicubic, no antialias; floor(M·s) = grid.
        scale = (grid + 0.1) / m
        patch_pos = F.interpolate(
            patch_pos, scale_factor=(scale, scale), mode="bicubic", align_corners=False
        )
        assert patch_pos.shape[-1] == grid, (patch_pos.shape, grid)
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, grid * grid, self.dim)
        return torch.cat([self.pos_embed[:, :1], patch_pos.to(dtype)], dim=1)

    def forward(self, images, masks=None):
        x = self.patch_embed(images)  # [B, N, D]
        if masks is not None:
            x = torch.where(masks.unsqueeze(-1), self.mask_token.to(x.dtype).unsqueeze(0), x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        x = x + self.position_embedding(images.shape[-1] // PATCH, x.dtype)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        return x[:, 0], x[:, 1:]


class WeightNormLinear(nn.Module):
    """W_k = g_k · v_k / ‖v_k‖, no bias; g starts at 1 and is trained."""

    def __init__(self, dim_in, dim_out):
        super().__init__()
        bound = 1.0 / math.sqrt(dim_in)
        self.weight_v = nn.Parameter(torch.empty(dim_out, dim_in).uniform_(-bound, bound))
        self.weight_g = nn.Parameter(torch.ones(dim_out, 1))

    def forward(self, x):
        w = self.weight_g * self.weight_v / self.weight_v.norm(dim=1, keepdim=True)
        return F.linear(x, w)


class DinoHead(nn.Module):
    def __init__(self, dim, prototypes, hidden=2048, bottleneck=256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden),
            nn.GELU(),
            nn.Linear(hidden, hidden),
            nn.GELU(),
            nn.Linear(hidden, bottleneck),
        )
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = WeightNormLinear(bottleneck, prototypes)

    def forward(self, x):
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))


class SslModel(nn.Module):
    def __init__(self, args):
        super().__init__()
        dim, depth, heads = MODELS[args.model]
        self.backbone = Vit(dim, depth, heads, args.global_size)
        self.dino_head = DinoHead(dim, args.prototypes)


# ---------------------------------------------------------------------------------------------
# Masks (official collate: a fixed count of masked crops, stratified ratios, BEiT blocks)


def block_mask(rng, grid, target, max_block):
    mask = [[False] * grid for _ in range(grid)]
    count = 0
    while count < target:
        budget = min(target - count, max_block)
        added = 0
        for _ in range(10):
            area = rng.uniform(4, budget)
            aspect = math.exp(rng.uniform(math.log(0.3), math.log(1 / 0.3)))
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if w < grid and h < grid:
                top = rng.randint(0, grid - h)
                left = rng.randint(0, grid - w)
                new = h * w - sum(mask[i][j] for i in range(top, top + h) for j in range(left, left + w))
                if 0 < new <= budget:
                    for i in range(top, top + h):
                        for j in range(left, left + w):
                            mask[i][j] = True
                    added = new
            if added > 0:
                break
        if added == 0:
            break
        count += added
    return [v for row in mask for v in row]


def collate_masks(rng, n_crops, grid):
    n = grid * grid
    n_masked = int(n_crops * MASK_PROBABILITY)
    lo, hi = MASK_RATIO
    edges = [lo + (hi - lo) * i / n_masked for i in range(n_masked + 1)] if n_masked else [lo]
    max_block = int(0.5 * grid * grid)
    masks = [block_mask(rng, grid, int(n * rng.uniform(edges[i], edges[i + 1])), max_block) for i in range(n_masked)]
    masks += [[False] * n for _ in range(n_crops - n_masked)]
    rng.shuffle(masks)
    return torch.tensor(masks, dtype=torch.bool)  # [2B, N]


# ---------------------------------------------------------------------------------------------
# Losses


def cross_entropy(targets, student_logits):
    """Mean over rows of −Σ_k t_k log softmax(s / 0.1)_k (f32)."""
    return -(targets * F.log_softmax(student_logits / STUDENT_TEMP, dim=-1)).sum(-1).mean()


def koleo(x):
    x = F.normalize(x, dim=-1, eps=1e-8)
    with torch.no_grad():
        dots = x @ x.t()
        dots.fill_diagonal_(-1)
        nearest = dots.argmax(dim=1)
    distances = (x - x[nearest] + 1e-8).norm(dim=-1)
    return -torch.log(distances + 1e-8).mean()


# ---------------------------------------------------------------------------------------------
# Optimizer groups (spec 9.2, 9.3)


def param_groups(model, depth, base_lr, weight_decay):
    groups = {}
    for name, p in model.named_parameters():
        lr_mult = 1.0
        if name.startswith("backbone."):
            local = name[len("backbone."):]
            if local.startswith(("pos_embed", "patch_embed", "mask_token", "cls_token")):
                layer = 0
            elif local.startswith("blocks."):
                layer = int(local.split(".")[1]) + 1
            else:
                layer = depth + 1
            lr_mult = 0.9 ** (depth + 1 - layer)
            if local.startswith("patch_embed"):
                lr_mult *= 0.2
        wd_mult = 0.0 if name.endswith(".bias") or "norm" in name or "gamma" in name else 1.0
        last = "last_layer" in name
        groups.setdefault((lr_mult, wd_mult, last), []).append(p)
    return [
        # The last layer is frozen by lr = 0 during the first epoch (the benchmark's steps).
        {"params": ps, "lr": 0.0 if last else base_lr * lr_mult, "weight_decay": weight_decay * wd_mult}
        for (lr_mult, wd_mult, last), ps in groups.items()
    ]


# ---------------------------------------------------------------------------------------------
# FLOPs (the formula of src/train/bench.rs)


def vit_forward_flops(dim, depth, crop):
    n = (crop // PATCH) ** 2
    t = 1 + n
    patch = 2 * n * 3 * PATCH * PATCH * dim
    block = 2 * t * dim * 3 * dim + 2 * t * dim * dim + 2 * 2 * t * t * dim + 2 * 2 * t * dim * 4 * dim
    return patch + depth * block


def head_forward_flops(dim, prototypes, hidden=2048, bottleneck=256):
    return 2 * (dim * hidden + hidden * hidden + hidden * bottleneck + bottleneck * prototypes)


def step_flops(args):
    dim, depth, _ = MODELS[args.model]
    fwd_g = vit_forward_flops(dim, depth, args.global_size)
    fwd_l = vit_forward_flops(dim, depth, args.local_size)
    token = head_forward_flops(dim, args.prototypes)
    b = args.batch_size
    masked = math.floor(2 * b * MASK_PROBABILITY) / b * 0.5 * sum(MASK_RATIO) * (args.global_size // PATCH) ** 2
    parts = {
        "student_backbone": 3 * (2 * fwd_g + args.local_crops * fwd_l),
        "teacher_backbone": 2 * fwd_g,
        "student_heads": 3 * ((2 + args.local_crops) * token + masked * token),
        "teacher_heads": 2 * token + masked * token,
        "forward_global_crop": fwd_g,
        "forward_local_crop": fwd_l,
        "masked_patches_per_image": masked,
    }
    total = sum(parts[k] for k in ("student_backbone", "teacher_backbone", "student_heads", "teacher_heads"))
    return total, parts


# ---------------------------------------------------------------------------------------------
# The step


class Trainer:
    def __init__(self, args, device):
        self.args = args
        self.device = device
        dim, depth, _ = MODELS[args.model]
        self.student = SslModel(args).to(device)
        self.teacher = SslModel(args).to(device)
        self.teacher.load_state_dict(self.student.state_dict())
        self.teacher.requires_grad_(False)
        self.student_params = list(self.student.parameters())
        self.teacher_params = list(self.teacher.parameters())
        base_lr = 0.004 * math.sqrt(args.batch_size / 1024)
        groups = param_groups(self.student, depth, base_lr, 0.04)
        fused = device.type == "cuda"
        self.optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.999), fused=fused, foreach=not fused)
        k = args.prototypes
        self.center_dino = torch.zeros(1, k, device=device)
        self.center_ibot = torch.zeros(1, k, device=device)
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
        self.backbone_s, self.head_s = self.student.backbone, self.student.dino_head
        self.backbone_t, self.head_t = self.teacher.backbone, self.teacher.dino_head
        if args.compile:
            self.backbone_s = torch.compile(self.backbone_s)
            self.head_s = torch.compile(self.head_s, dynamic=True)
            self.backbone_t = torch.compile(self.backbone_t)
            self.head_t = torch.compile(self.head_t, dynamic=True)

    def step(self, global_crops, local_crops, masks, mask_index, mask_weight):
        """One iteration; returns the total loss as a device tensor (no host sync)."""
        b = self.args.batch_size
        n_local = self.args.local_crops
        # Teacher: unmasked global crops, CLS halves swapped, head on CLS + masked patches.
        with torch.no_grad():
            with self.autocast:
                t_cls, t_patch = self.backbone_t(global_crops)
                t_cls = torch.cat(t_cls.chunk(2)[::-1])
                t_masked = t_patch.flatten(0, 1).index_select(0, mask_index)
                t_logits = self.head_t(torch.cat([t_cls, t_masked])).float()
            t_cls_logits, t_patch_logits = t_logits[: 2 * b], t_logits[2 * b :]
            dino_targets = F.softmax((t_cls_logits - self.center_dino) / TEACHER_TEMP, dim=-1)
            ibot_targets = F.softmax((t_patch_logits - self.center_ibot) / TEACHER_TEMP, dim=-1)
            # Lagged centering: this step's statistics serve the next step.
            self.center_dino.mul_(CENTER_MOMENTUM).add_(t_cls_logits.mean(0, keepdim=True), alpha=1 - CENTER_MOMENTUM)
            if t_patch_logits.shape[0] > 0:
                self.center_ibot.mul_(CENTER_MOMENTUM).add_(
                    t_patch_logits.mean(0, keepdim=True), alpha=1 - CENTER_MOMENTUM
                )

        # Student: masked global crops and the local crops, one head call for all tokens.
        with self.autocast:
            s_cls_g, s_patch_g = self.backbone_s(global_crops, masks)
            s_cls_l, _ = self.backbone_s(local_crops)
            s_masked = s_patch_g.flatten(0, 1).index_select(0, mask_index)
            s_logits = self.head_s(torch.cat([s_cls_l, s_cls_g, s_masked])).float()
        s_local = s_logits[: n_local * b]
        s_global = s_logits[n_local * b : (n_local + 2) * b]
        s_patch = s_logits[(n_local + 2) * b :]

        terms = 2 + 2 * n_local
        teacher_views = dino_targets.chunk(2)
        dino_local = sum(cross_entropy(t, s) for s in s_local.chunk(n_local) for t in teacher_views) / terms if n_local else 0.0
        dino_global = 2 * cross_entropy(dino_targets, s_global) / terms
        koleo_loss = KOLEO_WEIGHT * sum(koleo(c) for c in s_cls_g.float().chunk(2))
        per_token = -(ibot_targets * F.log_softmax(s_patch / STUDENT_TEMP, dim=-1)).sum(-1)
        ibot_loss = (per_token * mask_weight).sum() / (2 * b)
        loss = dino_local + dino_global + koleo_loss + ibot_loss

        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for module in (self.student.backbone, self.student.dino_head):
            torch.nn.utils.clip_grad_norm_(module.parameters(), CLIP, foreach=True)
        self.optimizer.step()
        with torch.no_grad():
            torch._foreach_lerp_(self.teacher_params, self.student_params, 1 - TEACHER_MOMENTUM)
        return loss.detach()


def mask_inputs(masks, device):
    """(masks, flat indices of masked patches, 1/(masked patches of its image) per index)."""
    flat = masks.flatten()
    index = flat.nonzero().flatten()
    per_image = masks.sum(1).clamp(min=1).float()
    weight = (1.0 / per_image).unsqueeze(1).expand_as(masks).flatten()[index]
    return masks.to(device), index.to(device), weight.to(device)


def cpu_gemm_peak_tflops(n=2048, reps=5):
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = min(timed(lambda: torch.mm(a, b)) for _ in range(reps))
    return 2 * n**3 / best / 1e12


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def write_json_atomic(path, data):
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=sorted(MODELS), default="vits14")
    p.add_argument("--batch-size", type=int, default=None, help="default 64 on CUDA, 8 on the CPU")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 20 CUDA / 5 CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps (default 3 CUDA / 1 CPU)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--global-size", type=int, default=224)
    p.add_argument("--local-size", type=int, default=98)
    p.add_argument("--local-crops", type=int, default=8)
    p.add_argument("--prototypes", type=int, default=65536)
    p.add_argument("--compile", action="store_true", help="torch.compile the backbones and heads")
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the result here (atomically)")
    args = p.parse_args(argv)
    on_cuda = args.device.startswith("cuda")
    args.batch_size = args.batch_size or (64 if on_cuda else 8)
    args.steps = args.steps if args.steps is not None else (20 if on_cuda else 5)
    args.warmup = args.warmup if args.warmup is not None else (3 if on_cuda else 1)
    for name in ("global_size", "local_size"):
        if getattr(args, name) % PATCH:
            p.error(f"--{name.replace('_', '-')} must be a multiple of {PATCH}")
    if args.batch_size < 2:
        p.error("--batch-size must be at least 2 (KoLeo needs two images)")
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    return args


def main(argv):
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda but PyTorch sees no GPU")
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    trainer = Trainer(args, device)
    b = args.batch_size
    global_crops = torch.randn(2 * b, 3, args.global_size, args.global_size, device=device)
    local_crops = torch.randn(args.local_crops * b, 3, args.local_size, args.local_size, device=device)
    total = args.warmup + args.steps
    grid = args.global_size // PATCH
    masks = [mask_inputs(collate_masks(rng, 2 * b, grid), device) for _ in range(total)]
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()

    # On a shared CPU the GEMM peak moves with the load: measure before and after, keep the best.
    peak_before = cpu_gemm_peak_tflops() if device.type == "cpu" and not args.peak_tflops else 0.0
    losses, seconds, cpu_seconds = [], [], []
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(total)]
        for i in range(total):
            events[i][0].record()
            losses.append(trainer.step(global_crops, local_crops, *masks[i]))
            events[i][1].record()
        torch.cuda.synchronize()
        seconds = [start.elapsed_time(end) / 1e3 for start, end in events]
    else:
        for i in range(total):
            cpu_start, start = time.process_time(), time.perf_counter()
            losses.append(trainer.step(global_crops, local_crops, *masks[i]))
            seconds.append(time.perf_counter() - start)
            cpu_seconds.append(time.process_time() - cpu_start)
            print(f"step {i + 1}/{total}: {seconds[-1]:.3f} s, loss {losses[-1].item():.4f}", file=sys.stderr)
    losses = [float(v) for v in losses]
    timed_seconds = seconds[args.warmup :]
    median = statistics.median(timed_seconds)
    images_per_s = b / median
    flops, parts = step_flops(args)
    achieved = flops * images_per_s / 1e12

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        cap = torch.cuda.get_device_capability(device)
        description = f"cuda ({name}, sm_{cap[0]}{cap[1]}), torch {torch.__version__}"
        peak_memory = torch.cuda.max_memory_allocated(device)
        memory_source = "torch.cuda.max_memory_allocated"
        peak, peak_source = H100_BF16_PEAK_TFLOPS, "H100/H200 dense bf16 (989 TFLOP/s)"
        if "H100" not in name and "H200" not in name:
            peak_source = "assumed H100/H200 dense bf16 (989 TFLOP/s); pass --peak-tflops"
    else:
        description = f"cpu ({torch.get_num_threads()} threads), torch {torch.__version__}"
        peak_memory = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        memory_source = "ru_maxrss (process resident peak)"
        peak = max(peak_before, cpu_gemm_peak_tflops())
        peak_source = "CPU f32 torch.mm measured in-process (2048^3, best of 5 before and 5 after the steps)"
    if args.peak_tflops:
        peak, peak_source = args.peak_tflops, "given with --peak-tflops"

    report = {
        "schema": "torch-step-baseline/1",
        "device": description,
        "model": args.model,
        "method": "dinov2",
        "precision": "bf16 autocast" if device.type == "cuda" else "f32",
        "compile": args.compile,
        "batch_size": b,
        "global_crops": 2,
        "global_size": args.global_size,
        "local_crops": args.local_crops,
        "local_size": args.local_size,
        "dino_prototypes": args.prototypes,
        "warmup_steps": args.warmup,
        "timed_steps": args.steps,
        "step_seconds": {
            "median": median,
            "min": min(timed_seconds),
            "mean": statistics.fmean(timed_seconds),
            "all": timed_seconds,
        },
        # CPU time of the process per timed step (all threads; CPU runs only).
        "cpu_seconds": None,
        "images_per_s": images_per_s,
        "flops_per_image": flops,
        "flops": parts,
        "achieved_tflops": achieved,
        "peak_tflops": peak,
        "peak_source": peak_source,
        "utilisation": achieved / peak,
        "peak_memory_bytes": peak_memory,
        "peak_memory_source": memory_source,
        "losses": losses,
    }
    timed_cpu = cpu_seconds[args.warmup :]
    if timed_cpu:
        report["cpu_seconds"] = {
            "median": statistics.median(timed_cpu),
            "min": min(timed_cpu),
            "mean": statistics.fmean(timed_cpu),
            "all": timed_cpu,
        }
    g = 1e9
    print("torch DINOv2 step baseline")
    print(f"  model            {args.model} (patch {PATCH}), dinov2, K {args.prototypes}, {report['precision']}"
          f"{', compiled' if args.compile else ''}")
    print(f"  device           {description}")
    print(f"  batch            {b} images: 2 x {args.global_size} px + {args.local_crops} x {args.local_size} px crops each")
    print(f"  steps            {args.steps} timed after {args.warmup} warm-up")
    print(f"  step time        median {median:.4f} s, min {min(timed_seconds):.4f} s, mean {statistics.fmean(timed_seconds):.4f} s")
    print(f"  images/s         {images_per_s:.2f}")
    if timed_cpu:
        cpu_median = report["cpu_seconds"]["median"]
        print(f"  CPU time         median {cpu_median:.4f} s per step ({b / cpu_median:.2f} images per CPU-second)")
    print(f"  FLOPs per image  {flops / g:.1f} GFLOP (student {parts['student_backbone'] / g:.1f}, teacher "
          f"{parts['teacher_backbone'] / g:.1f}, heads {(parts['student_heads'] + parts['teacher_heads']) / g:.1f}; "
          f"forward {parts['forward_global_crop'] / g:.2f} per global crop)")
    print(f"  achieved         {achieved:.3f} TFLOP/s")
    print(f"  peak             {peak:.3f} TFLOP/s: {peak_source}")
    print(f"  utilisation      {100 * achieved / peak:.1f}%")
    print(f"  peak memory      {peak_memory / 1e9:.2f} GB ({memory_source})")
    print(f"  losses           {', '.join(f'{v:.4f}' for v in losses)}")
    if not all(math.isfinite(v) for v in losses):
        print("error: non-finite loss", file=sys.stderr)
        return 1
    if args.json:
        write_json_atomic(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
