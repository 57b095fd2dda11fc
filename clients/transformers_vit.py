"""Hugging Face transformers: a tiny random ``ViTForImageClassification`` (patch embedding by a
strided Conv2d, ``pixel_values`` / ``labels`` dict batches, ``outputs.loss``), on synthetic
16x16 images whose class is a bright quadrant."""

from __future__ import annotations

import _harness
from _hf import train


def fit(recipe):
    import lightning.pytorch as pl
    import torch
    from transformers import ViTConfig, ViTForImageClassification

    pl.seed_everything(0)
    g = torch.Generator().manual_seed(0)
    n = 384
    labels = torch.randint(0, 4, (n,), generator=g)
    x = torch.randn(n, 3, 16, 16, generator=g) * 0.5
    for k in range(4):
        r, c = divmod(k, 2)
        x[labels == k, :, r * 8 : r * 8 + 8, c * 8 : c * 8 + 8] += 1.0
    cols = {"pixel_values": x, "labels": labels}
    config = ViTConfig(
        image_size=16,
        patch_size=4,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=4,
    )
    train(recipe, ViTForImageClassification(config), cols, lr=1e-3)


if __name__ == "__main__":
    _harness.run("transformers", "ViTForImageClassification (tiny random)", ["transformers"], fit)
