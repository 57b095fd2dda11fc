"""Hugging Face transformers: a tiny random ``BertForSequenceClassification`` (loss computed
inside ``forward``: ``outputs.loss``), in a LightningModule, on synthetic token sequences."""

from __future__ import annotations

import _harness
from _hf import train


def fit(recipe):
    import lightning.pytorch as pl
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    pl.seed_everything(0)
    g = torch.Generator().manual_seed(0)
    n, length, vocab = 384, 24, 100
    ids = torch.randint(5, vocab, (n, length), generator=g)
    labels = torch.randint(0, 2, (n,), generator=g)
    # the label is written into the sequence as a marker token at a random position
    pos = torch.randint(1, length, (n,), generator=g)
    ids[torch.arange(n), pos] = 3 + labels
    ids[:, 0] = 2  # [CLS]
    lengths = torch.randint(length // 2, length + 1, (n,), generator=g)
    mask = (torch.arange(length)[None] < lengths[:, None]).long()
    ids = ids * mask
    cols = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    config = BertConfig(
        vocab_size=vocab,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=2,
    )
    model = BertForSequenceClassification(config)
    train(recipe, model, cols, lr=1e-3)


if __name__ == "__main__":
    _harness.run("transformers", "BertForSequenceClassification (tiny random)", ["transformers"], fit)
