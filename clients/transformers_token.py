"""Hugging Face transformers: a tiny random ``BertForTokenClassification`` (NER style: one label per
token, -100 on padding and special tokens, loss inside ``forward``), on synthetic sequences."""

from __future__ import annotations

import _harness
from _hf import train


def fit(recipe):
    import lightning.pytorch as pl
    import torch
    from transformers import BertConfig, BertForTokenClassification

    pl.seed_everything(0)
    g = torch.Generator().manual_seed(0)
    n, length, vocab, tags = 384, 24, 100, 5
    ids = torch.randint(5, vocab, (n, length), generator=g)
    labels = ids % tags  # each token's tag is a function of the token: learnable
    ids[:, 0] = 2  # [CLS]
    labels[:, 0] = -100
    lengths = torch.randint(length // 2, length + 1, (n,), generator=g)
    mask = (torch.arange(length)[None] < lengths[:, None]).long()
    ids = ids * mask
    labels = labels.masked_fill(mask == 0, -100)
    cols = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    config = BertConfig(
        vocab_size=vocab,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=tags,
    )
    train(recipe, BertForTokenClassification(config), cols, lr=1e-3)


if __name__ == "__main__":
    _harness.run("transformers", "BertForTokenClassification (tiny random)", ["transformers"], fit)
