"""Hugging Face transformers: a tiny random ``GPT2LMHeadModel`` trained as a causal LM
(``labels=input_ids``, the loss shifted and computed inside ``forward``) in a LightningModule,
on synthetic sequences with a learnable pattern."""

from __future__ import annotations

import _harness
from _hf import train


def fit(recipe):
    import lightning.pytorch as pl
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    pl.seed_everything(0)
    g = torch.Generator().manual_seed(0)
    n, length, vocab = 384, 32, 64
    start = torch.randint(0, vocab, (n, 1), generator=g)
    step = torch.randint(1, 4, (n, 1), generator=g)
    ids = (start + step * torch.arange(length)[None]) % vocab  # arithmetic progressions
    cols = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    config = GPT2Config(vocab_size=vocab, n_positions=length, n_embd=32, n_layer=2, n_head=2)
    model = GPT2LMHeadModel(config)
    train(recipe, model, cols, lr=2e-3)


if __name__ == "__main__":
    _harness.run("transformers", "GPT2LMHeadModel causal LM (tiny random)", ["transformers"], fit)
