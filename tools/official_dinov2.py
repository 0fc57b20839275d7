"""The official DINOv2 training code made runnable in one CPU process, for the tools that compare
dinotrain with it (`make-parity-steps.py`, `side-by-side.py`).

`import_official(CHECKOUT)` imports the official modules from a checkout of
facebookresearch/dinov2 and installs four shims, none of which changes the arithmetic:
tensors' `.cuda()` is the identity; FSDP's reshard is a no-op (and callers set
`need_to_synchronize_fsdp_streams = False`); xFormers' `BlockDiagonalMask` (used by
`forward_backward` to run the student head once on a concatenation of inputs) is a plain
concatenate-and-split; and a block given a list of crop sets (the nested path, whose
block-diagonal attention keeps the sets apart) runs on each set, with drop path as the nested
path does it (a random batch subset per set, the residual scaled by b / subset). A
one-rank gloo process group serves the all-reduces and the k-NN's broadcasts.

`official_iteration` is one iteration of the official `do_train`; `rel_err` and `save_sorted`
are the golden fixtures' comparison rule and file layout (make-golden-extra.py uses them too).

`make_cfg(O, p)` is the official default config with the keys of `p` (the tiny architecture is
registered as `vit_custom` beside the official ones, since build_model_from_cfg looks it up
there) and the official `sqrt_wrt_1024` lr scaling for one rank.
"""

import math
import os
import sys
import types
import warnings

os.environ.setdefault("XFORMERS_DISABLED", "1")


class _BlockDiagonalMask:
    """xFormers' `BlockDiagonalMask.from_tensor_list` / `.split` as `forward_backward` uses them:
    concatenate `[1, n_i, D]` tensors along dim 1, split the result back."""

    def __init__(self, sizes):
        self.sizes = sizes

    @classmethod
    def from_tensor_list(cls, tensors):
        import torch

        return cls([t.shape[1] for t in tensors]), torch.cat(tensors, dim=1)

    def split(self, x):
        return list(x.split(self.sizes, dim=1))


def import_official(path):
    sys.path.insert(0, os.path.abspath(path))
    fmha = types.SimpleNamespace(BlockDiagonalMask=_BlockDiagonalMask)
    sys.modules["xformers"] = types.ModuleType("xformers")
    sys.modules["xformers.ops"] = types.SimpleNamespace(fmha=fmha)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import torch
        import torch.distributed as dist
        from omegaconf import OmegaConf

        from dinov2.configs import dinov2_default_config
        from dinov2.data import DataAugmentationDINO, MaskingGenerator, collate_data_and_cast
        from dinov2.layers import MemEffAttention, NestedTensorBlock
        from dinov2.layers import attention as attention_mod
        from dinov2.layers import block as block_module
        from dinov2.models import vision_transformer as vits
        from dinov2.train import ssl_meta_arch
        from dinov2.train import train as official_train
    assert not attention_mod.XFORMERS_AVAILABLE, "xFormers must be off: the plain PyTorch path is the reference"
    torch.set_num_threads(1)
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    ssl_meta_arch.reshard_fsdp_model = lambda model: None
    # The nested (list) block path needs xFormers: its block-diagonal attention over the
    # concatenated crop sets is attention within each set, so it is the block on each set; with
    # drop path, each set keeps its own random batch subset as drop_add_residual_stochastic_depth_list
    # draws it (the official non-list function, per set; LayerScale inside the residual).
    plain_forward = NestedTensorBlock.forward

    def nested_forward(self, x):
        if not isinstance(x, list):
            return plain_forward(self, x)
        if not (self.training and self.sample_drop_ratio > 0.0):
            return [plain_forward(self, t) for t in x]
        attn = lambda t: self.ls1(self.attn(self.norm1(t)))  # noqa: E731
        ffn = lambda t: self.ls2(self.mlp(self.norm2(t)))  # noqa: E731
        subset = block_module.drop_add_residual_stochastic_depth
        x = [subset(t, residual_func=attn, sample_drop_ratio=self.sample_drop_ratio) for t in x]
        return [subset(t, residual_func=ffn, sample_drop_ratio=self.sample_drop_ratio) for t in x]

    NestedTensorBlock.forward = nested_forward
    if not dist.is_initialized():
        # A rendezvous file of this process's own (a fixed TCP port would keep two tools from
        # running at once).
        import tempfile

        store = os.path.join(tempfile.mkdtemp(prefix="dinotrain-gloo-"), "store")
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    from dinov2.data import samplers
    from dinov2.data.transforms import make_normalize_transform
    from dinov2.eval.knn import KnnModule
    from dinov2.utils.utils import fix_random_seeds

    return types.SimpleNamespace(
        samplers=samplers, make_normalize_transform=make_normalize_transform, KnnModule=KnnModule,
        fix_random_seeds=fix_random_seeds, torch=torch, OmegaConf=OmegaConf, default_cfg=dinov2_default_config, vits=vits,
        MemEffAttention=MemEffAttention, NestedTensorBlock=NestedTensorBlock,
        DataAugmentationDINO=DataAugmentationDINO, MaskingGenerator=MaskingGenerator,
        collate=collate_data_and_cast, SSLMetaArch=ssl_meta_arch.SSLMetaArch, train=official_train,
    )


def make_cfg(O, p):
    """The official default config with the fixture's keys; the tiny architecture is registered
    as `vit_custom` beside the official ones (build_model_from_cfg looks the name up there)."""
    from functools import partial

    def vit_custom(**kwargs):
        return O.vits.DinoVisionTransformer(
            embed_dim=p["embed_dim"], depth=p["depth"], num_heads=p["num_heads"], mlp_ratio=p["mlp_ratio"],
            block_fn=partial(O.NestedTensorBlock, attn_class=O.MemEffAttention), **kwargs)

    O.vits.vit_custom = vit_custom
    over = {
        "compute_precision": {"grad_scaler": False},
        "student": dict(arch="vit_custom", patch_size=p["patch_size"], drop_path_rate=p["drop_path_rate"],
                        layerscale=p["layerscale"], num_register_tokens=p["num_register_tokens"],
                        interpolate_offset=p["interpolate_offset"],
                        interpolate_antialias=p["interpolate_antialias"], block_chunks=0),
        "dino": dict(loss_weight=p["dino_loss_weight"], koleo_loss_weight=p["koleo_loss_weight"],
                     head_n_prototypes=p["head_n_prototypes"], head_hidden_dim=p["head_hidden_dim"],
                     head_bottleneck_dim=p["head_bottleneck_dim"], head_nlayers=p["head_nlayers"]),
        "ibot": dict(loss_weight=p["ibot_loss_weight"], separate_head=p["ibot_separate_head"],
                     mask_sample_probability=p["mask_sample_probability"],
                     mask_ratio_min_max=p["mask_ratio_min_max"]),
        "train": dict(batch_size_per_gpu=p["n_img"], OFFICIAL_EPOCH_LENGTH=p["official_epoch_length"],
                      centering=p["centering"]),
        "crops": dict(global_crops_size=p["global_crops_size"], local_crops_size=p["local_crops_size"],
                      local_crops_number=p["local_crops_number"], global_crops_scale=p["global_crops_scale"],
                      local_crops_scale=p["local_crops_scale"]),
        "teacher": dict(momentum_teacher=p["momentum_teacher"], final_momentum_teacher=p["final_momentum_teacher"],
                        warmup_teacher_temp=p["warmup_teacher_temp"], teacher_temp=p["teacher_temp"],
                        warmup_teacher_temp_epochs=p["warmup_teacher_temp_epochs"]),
        "optim": dict(epochs=p["epochs"], warmup_epochs=p["warmup_epochs"],
                      freeze_last_layer_epochs=p["freeze_last_layer_epochs"], base_lr=p["base_lr"],
                      min_lr=p["min_lr"], weight_decay=p["weight_decay"], weight_decay_end=p["weight_decay_end"],
                      clip_grad=p["clip_grad"], layerwise_decay=p["layerwise_decay"],
                      patch_embed_lr_mult=p["patch_embed_lr_mult"], adamw_beta1=p["adamw_beta1"],
                      adamw_beta2=p["adamw_beta2"]),
    }
    cfg = O.OmegaConf.merge(O.OmegaConf.create(O.default_cfg), O.OmegaConf.create(over))
    # apply_scaling_rules_to_cfg, sqrt_wrt_1024, one rank
    cfg.optim.lr = cfg.optim.base_lr * math.sqrt(cfg.train.batch_size_per_gpu * 1 / 1024.0)
    return cfg


def official_iteration(O, cfg, model, optimizer, schedules, it, data):
    """One training iteration as the official `do_train` runs it: the scheduled lr / weight
    decay / last-layer lr, `forward_backward` at the scheduled teacher temperature, clipping per
    student submodule (FSDP's `clip_grad_norm_` there, torch's here), AdamW, and the teacher EMA
    of `update_teacher` on the modules' own parameters. Returns the logged loss dict."""
    torch = O.torch
    lr_s, wd_s, mom_s, tt_s, last_lr_s = schedules
    O.train.apply_optim_scheduler(optimizer, lr_s[it], wd_s[it], last_lr_s[it])
    optimizer.zero_grad(set_to_none=True)
    loss_dict = model.forward_backward(data, teacher_temp=tt_s[it])
    for v in model.student.values():
        torch.nn.utils.clip_grad_norm_(v.parameters(), cfg.optim.clip_grad)
    optimizer.step()
    with torch.no_grad():
        m = mom_s[it]
        for k in model.student.keys():
            t_params = list(model.teacher[k].parameters())
            s_params = list(model.student[k].parameters())
            torch._foreach_mul_(t_params, m)
            torch._foreach_add_(t_params, s_params, alpha=1 - m)
    return loss_dict


def rel_err(a, b):
    """The golden README's relative error: ||a - b|| / max(||b||, 1e-6), inf when a is not finite."""
    import numpy as np

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    if not np.all(np.isfinite(a)):
        return math.inf
    return float(np.linalg.norm((a - b).ravel()) / max(np.linalg.norm(b.ravel()), 1e-6))


def save_sorted(tensors, path, metadata):
    """A safetensors file laid out like the golden fixtures, byte for byte reproducible:
    compact JSON header (metadata first, keys sorted; tensors in name order, data in the same
    order without gaps), padded with spaces to a multiple of 8."""
    import json

    import numpy as np

    dtypes = {np.dtype(np.float32): "F32", np.dtype(np.int64): "I64", np.dtype(np.uint8): "U8"}
    header, blobs, offset = {"__metadata__": dict(sorted(metadata.items()))}, [], 0
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        raw = a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": dtypes[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(len(h).to_bytes(8, "little") + h + b"".join(blobs))
