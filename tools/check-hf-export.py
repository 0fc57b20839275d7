#!/usr/bin/env python3
"""Checks a `dinotrain export --keys hf-folder` folder against the official model: Hugging Face
transformers' `AutoModel.from_pretrained(FOLDER)` and the official `DinoVisionTransformer`
loading the same backbone with official keys (`.safetensors` or `.pth`, strict) run the same
images; prints the
relative error of the CLS and patch tokens (final LayerNorm) and exits 1 above 1e-5.

    dinotrain export --model RUN --out /tmp/hf --keys hf-folder
    .parity-venv/bin/python tools/check-hf-export.py /tmp/hf RUN/teacher_backbone.safetensors \\
        /tmp/dinov2-official

Needs torch, transformers (5.25 was used), safetensors, and a checkout of
facebookresearch/dinov2 for the official model.
"""
import json
import sys
from functools import partial

import torch
from safetensors.torch import load_file
from transformers import AutoModel


def main():
    folder, official_weights, checkout = sys.argv[1:4]
    sys.path.insert(0, checkout)
    from dinov2.layers import MemEffAttention, NestedTensorBlock
    from dinov2.models.vision_transformer import DinoVisionTransformer

    cfg = json.load(open(f"{folder}/config.json"))
    hf = AutoModel.from_pretrained(folder).eval()
    official = DinoVisionTransformer(
        img_size=cfg["image_size"], patch_size=cfg["patch_size"], embed_dim=cfg["hidden_size"],
        depth=cfg["num_hidden_layers"], num_heads=cfg["num_attention_heads"], mlp_ratio=cfg["mlp_ratio"],
        init_values=cfg["layerscale_value"], ffn_layer="swiglufused" if cfg["use_swiglu_ffn"] else "mlp",
        num_register_tokens=cfg.get("num_register_tokens", 0), block_chunks=0,
        block_fn=partial(NestedTensorBlock, attn_class=MemEffAttention)).eval()
    if official_weights.endswith(".pth"):
        state = torch.load(official_weights, map_location="cpu", weights_only=True)
    else:
        state = load_file(official_weights)
    official.load_state_dict(state, strict=True)
    torch.manual_seed(0)
    x = torch.randn(4, 3, cfg["image_size"], cfg["image_size"])
    with torch.no_grad():
        h = hf(pixel_values=x).last_hidden_state
        o = official.forward_features(x)
    skip = 1 + cfg.get("num_register_tokens", 0)
    worst = 0.0
    for name, a, b in [("cls", h[:, 0], o["x_norm_clstoken"]), ("patch", h[:, skip:], o["x_norm_patchtokens"])]:
        err = float((a - b).norm() / b.norm())
        worst = max(worst, err)
        print(f"{name}: relative error {err:.2e} ({type(hf).__name__}, transformers model type {cfg['model_type']})")
    sys.exit(0 if worst < 1e-5 else 1)


if __name__ == "__main__":
    main()
