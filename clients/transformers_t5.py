"""Hugging Face transformers: a tiny random ``T5ForConditionalGeneration`` (encoder-decoder; the
decoder input is the labels shifted right inside ``forward``, -100 on padding, ``outputs.loss``),
on a synthetic copy-and-reverse task."""

from __future__ import annotations

import _harness
from _hf import train


def fit(recipe):
    import lightning.pytorch as pl
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    pl.seed_everything(0)
    g = torch.Generator().manual_seed(0)
    n, length, vocab = 384, 12, 64
    ids = torch.randint(3, vocab, (n, length), generator=g)
    labels = ids.flip(1)  # the target is the input reversed
    lengths = torch.randint(length // 2, length + 1, (n,), generator=g)
    mask = (torch.arange(length)[None] < lengths[:, None]).long()
    ids = ids * mask
    labels = labels.masked_fill(mask.flip(1) == 0, -100)
    cols = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    config = T5Config(
        vocab_size=vocab,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        decoder_start_token_id=0,
        pad_token_id=0,
    )
    train(recipe, T5ForConditionalGeneration(config), cols, lr=1e-3)


if __name__ == "__main__":
    _harness.run("transformers", "T5ForConditionalGeneration seq2seq (tiny random)", ["transformers"], fit)
