"""Small sequence models and data for the future-leak, padding and input-independent tests.

Each model is healthy unless built with the flag that breaks it; every one is a LightningModule
whose ``training_step`` computes its loss the way real projects do.
"""

from __future__ import annotations

import math

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

VOCAB = 16
PAD = 0


# ---------------------------------------------------------------------------- data
def markov_tokens(n: int = 64, length: int = 33, vocab: int = VOCAB, seed: int = 0) -> torch.Tensor:
    """Token ids 1..vocab-1 from a sparse random Markov chain (known entropy, learnable)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(vocab - 1, vocab - 1, generator=g) * 2.5
    probs = logits.softmax(-1)
    out = torch.empty(n, length, dtype=torch.long)
    out[:, 0] = torch.randint(0, vocab - 1, (n,), generator=g)
    for t in range(1, length):
        out[:, t] = torch.multinomial(probs[out[:, t - 1]], 1, generator=g).squeeze(1)
    return out + 1


def padded_tokens(n: int = 64, length: int = 33, min_len: int = 4, max_len: int = 12, seed: int = 0):
    """Markov tokens cut to random lengths and right-padded with ``PAD`` (about 3/4 padding)."""
    g = torch.Generator().manual_seed(seed + 1)
    ids = markov_tokens(n, length, seed=seed)
    lengths = torch.randint(min_len, max_len + 1, (n, 1), generator=g)
    keep = torch.arange(length) < lengths
    return torch.where(keep, ids, torch.full_like(ids, PAD)), keep.long()


def series(n: int = 64, length: int = 40, seed: int = 0) -> torch.Tensor:
    """Noisy sines with random phase and frequency: (n, length) float."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(length).float()
    freq = 0.2 + 0.3 * torch.rand(n, 1, generator=g)
    phase = 2 * math.pi * torch.rand(n, 1, generator=g)
    return torch.sin(freq * t + phase) + 0.1 * torch.randn(n, length, generator=g)


class Rows(Dataset):
    """Yields ``(tensor[i], ...)`` tuples, or dicts when ``keys`` are given."""

    def __init__(self, *tensors: torch.Tensor, keys: tuple[str, ...] | None = None) -> None:
        self.tensors, self.keys = tensors, keys

    def __len__(self) -> int:
        return len(self.tensors[0])

    def __getitem__(self, i: int):
        items = tuple(t[i] for t in self.tensors)
        return dict(zip(self.keys, items)) if self.keys else items


def loader(*tensors: torch.Tensor, keys: tuple[str, ...] | None = None, batch_size: int = 16, shuffle=False):
    return DataLoader(Rows(*tensors, keys=keys), batch_size=batch_size, shuffle=shuffle)


def first_batch(*tensors: torch.Tensor, keys: tuple[str, ...] | None = None, batch_size: int = 16):
    return next(iter(loader(*tensors, keys=keys, batch_size=batch_size)))


# ---------------------------------------------------------------------------- language models
class Base(L.LightningModule):
    def __init__(self, lr: float = 3e-3) -> None:
        super().__init__()
        self.lr = lr

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.training_step(batch, batch_idx))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


class CharTransformer(Base):
    """A char-level transformer LM on ``(tokens,)`` batches; ``causal=False`` forgets the mask.
    ``batch_first=False`` runs the encoder time-first; ``loss_layout`` "flat" (B*T, V) or "bvt"."""

    def __init__(
        self, causal=True, batch_first=True, loss_layout="flat", d=32, vocab=VOCAB, length=64, lr=3e-3
    ):
        super().__init__(lr)
        self.causal, self.batch_first, self.loss_layout = causal, batch_first, loss_layout
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(length, d)
        layer = nn.TransformerEncoderLayer(d, 4, 2 * d, dropout=0.1, batch_first=batch_first)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(d, vocab)

    def forward(self, x):
        t = x.shape[1]
        h = self.tok(x) + self.pos(torch.arange(t, device=x.device))
        mask = nn.Transformer.generate_square_subsequent_mask(t, device=x.device) if self.causal else None
        if self.batch_first:
            h = self.enc(h, mask=mask, is_causal=self.causal)
        else:
            h = self.enc(h.transpose(0, 1), mask=mask, is_causal=self.causal).transpose(0, 1)
        return self.head(h)

    def training_step(self, batch, batch_idx):
        tokens = batch[0]
        x, y = tokens[:, :-1], tokens[:, 1:]
        logits = self(x)
        if self.loss_layout == "bvt":
            return F.cross_entropy(logits.transpose(1, 2), y)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


class TimeFirstTransformer(CharTransformer):
    """Embeds time-first ids ``(T, B)`` (the nn.Transformer tutorial's layout)."""

    def __init__(self, causal=True, **kw):
        super().__init__(causal, batch_first=False, **kw)

    def forward(self, x):  # x: (B, T)
        xt = x.t()
        t = xt.shape[0]
        h = self.tok(xt) + self.pos(torch.arange(t, device=x.device)).unsqueeze(1)
        mask = nn.Transformer.generate_square_subsequent_mask(t, device=x.device) if self.causal else None
        return self.head(self.enc(h, mask=mask, is_causal=self.causal))  # (T, B, V)

    def training_step(self, batch, batch_idx):
        tokens = batch[0]
        logits = self(tokens[:, :-1])
        y = tokens[:, 1:].t()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


class RNNLM(Base):
    """A GRU/LSTM LM on ``(x, y)`` batches or ``(tokens,)``.

    ``bug="logits-shift"``: reads all tokens and scores ``logits[:, 1:]`` against ``tokens[:, 1:]``;
    ``bug="unshifted"``: reads all tokens and predicts ``tokens`` itself."""

    def __init__(self, cell="gru", bug=None, d=32, vocab=VOCAB, lr=1e-2):
        super().__init__(lr)
        self.bug = bug
        self.emb = nn.Embedding(vocab, d)
        self.rnn = (nn.GRU if cell == "gru" else nn.LSTM)(d, d, batch_first=True)
        self.out = nn.Linear(d, vocab)

    def forward(self, x):
        return self.out(self.rnn(self.emb(x))[0])

    def training_step(self, batch, batch_idx):
        if len(batch) == 2:
            x, y = batch
            return F.cross_entropy(self(x).transpose(1, 2), y)
        tokens = batch[0]
        if self.bug == "logits-shift":
            logits = self(tokens)
            return F.cross_entropy(logits[:, 1:].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
        if self.bug == "unshifted":
            return F.cross_entropy(self(tokens).transpose(1, 2), tokens)
        logits = self(tokens[:, :-1])
        return F.cross_entropy(logits.transpose(1, 2), tokens[:, 1:])


class HFStyleLM(Base):
    """An LSTM LM on Hugging Face style dicts ``{"input_ids", "labels", "attention_mask"}``;
    the shift happens inside (``logits[:, :-1]`` vs ``labels[:, 1:]``), padding in the labels.

    ``ignore``: "index" (labels padded with -100, healthy), "mask" (reduction='none' and a masked
    mean, healthy), "none" (labels padded with the pad id, no ignore_index: the padding bug),
    "mean-none" (reduction='none' then a plain mean: the bug again)."""

    def __init__(self, ignore="index", d=32, vocab=VOCAB, lr=1e-2):
        super().__init__(lr)
        self.ignore = ignore
        self.emb = nn.Embedding(vocab, d, padding_idx=PAD)
        self.rnn = nn.LSTM(d, d, batch_first=True)
        self.out = nn.Linear(d, vocab)

    def training_step(self, batch, batch_idx):
        ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
        logits = self.out(self.rnn(self.emb(ids))[0])[:, :-1]
        labels = labels[:, 1:]
        flat, target = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
        if self.ignore == "index":
            return F.cross_entropy(flat, target.masked_fill(mask[:, 1:].reshape(-1) == 0, -100))
        if self.ignore == "none":
            return F.cross_entropy(flat, target)
        per = F.cross_entropy(flat, target, reduction="none")
        if self.ignore == "mean-none":
            return per.mean()
        m = mask[:, 1:].reshape(-1).float()
        return (per * m).sum() / m.sum()


# ---------------------------------------------------------------------------- bidirectional and other tasks
class Encoder(Base):
    """A bidirectional transformer encoder over ids (no mask)."""

    def __init__(self, d=32, vocab=VOCAB + 1, out=VOCAB + 1, lr=3e-3):
        super().__init__(lr)
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(64, d)
        layer = nn.TransformerEncoderLayer(d, 4, 2 * d, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(d, out)

    def encode(self, x):
        return self.enc(self.tok(x) + self.pos(torch.arange(x.shape[1], device=x.device)))


class MaskedLM(Encoder):
    """BERT-style: 15% of positions replaced by a mask id (80/10/10), labels -100 elsewhere;
    ``score_all=True`` scores every position against the original tokens (no -100)."""

    MASK = VOCAB

    def __init__(self, score_all=False, **kw):
        super().__init__(**kw)
        self.score_all = score_all

    def training_step(self, batch, batch_idx):
        tokens = batch[0]
        g = torch.Generator().manual_seed(batch_idx)
        pick = torch.rand(tokens.shape, generator=g) < 0.15
        roll = torch.rand(tokens.shape, generator=g)
        corrupted = torch.where(pick & (roll < 0.8), torch.full_like(tokens, self.MASK), tokens)
        random_ids = torch.randint(1, VOCAB, tokens.shape, generator=g)
        corrupted = torch.where(pick & (roll >= 0.8) & (roll < 0.9), random_ids, corrupted)
        labels = tokens if self.score_all else torch.where(pick, tokens, torch.full_like(tokens, -100))
        logits = self.head(self.encode(corrupted))
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


class SeqClassifier(Encoder):
    """Classifies a sequence (mean-pooled bidirectional encoder) on ``{"input_ids", "label"}``."""

    def __init__(self, classes=4, **kw):
        super().__init__(out=classes, **kw)

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self.head(self.encode(batch["input_ids"]).mean(1)), batch["label"])


class Tagger(Encoder):
    """A bidirectional tagger: one class per token, on ``(ids, tags)`` batches."""

    def __init__(self, tags=5, **kw):
        super().__init__(out=tags, **kw)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.head(self.encode(x)).transpose(1, 2), y)


class Forecaster(Base):
    """Forecasts ``horizon`` values from a window ``(B, S, F)``: a GRU over the window, then a head.

    With known future covariates the window covers the forecast days too, with the target
    channel zeroed there and a covariate channel known everywhere (healthy)."""

    def __init__(self, features=2, horizon=4, d=32, lr=1e-2):
        super().__init__(lr)
        self.rnn = nn.GRU(features, d, batch_first=True)
        self.head = nn.Linear(d, horizon)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self.head(self.rnn(x)[0][:, -1]), y)


class SeqRegressor(Base):
    """A causal GRU predicting a float series one step ahead, ``(x (B, T, 1), y (B, T))``;
    ``bidirectional=True`` for a smoother that reads the whole window."""

    def __init__(self, bidirectional=False, d=16, lr=1e-2):
        super().__init__(lr)
        self.rnn = nn.GRU(1, d, batch_first=True, bidirectional=bidirectional)
        self.head = nn.Linear(d * (2 if bidirectional else 1), 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self.head(self.rnn(x)[0]).squeeze(-1), y)


def forecasting_windows(window=16, horizon=4, covariates=True, leak=False, n=64):
    """Windows of noisy sines. ``covariates``: (B, window+horizon, 2) with the target channel
    zeroed over the horizon and a known covariate (the clean phase) everywhere; otherwise
    (B, window, 1). ``leak``: the window is one step too long and ends on the first forecast day."""
    s = series(n, window + horizon + 1)
    y = s[:, window : window + horizon]
    if covariates:
        target = torch.cat([s[:, :window], torch.zeros(n, horizon)], 1)
        cov = torch.cos(torch.arange(window + horizon).float() / 3).expand(n, -1)
        return torch.stack([target, cov], -1), y
    x = s[:, : window + (1 if leak else 0)]
    return x.unsqueeze(-1), y


class Attention(nn.Module):
    """Single-head self-attention written by hand (nanoGPT style), causal by ``masked_fill``."""

    def __init__(self, d: int, causal: bool) -> None:
        super().__init__()
        self.qkv, self.proj, self.causal = nn.Linear(d, 3 * d), nn.Linear(d, d), causal

    def forward(self, x):
        t, d = x.shape[1], x.shape[2]
        q, k, v = self.qkv(x).split(d, 2)
        att = q @ k.transpose(-2, -1) / d**0.5
        if self.causal:
            att = att.masked_fill(torch.tril(torch.ones(t, t, device=x.device)) == 0, float("-inf"))
        return self.proj(att.softmax(-1) @ v)


class NanoGPT(Base):
    """A hand-written GPT on ``(x, y)`` windows with ``y`` the next characters, (B*T, V) logits."""

    def __init__(self, causal=True, d=32, vocab=VOCAB, lr=3e-3):
        super().__init__(lr)
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(64, d)
        self.blocks = nn.ModuleList([Attention(d, causal) for _ in range(2)])
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, vocab)

    def training_step(self, batch, batch_idx):
        x, y = batch
        h = self.tok(x) + self.pos(torch.arange(x.shape[1], device=x.device))
        for block in self.blocks:
            h = h + block(h)
        logits = self.head(self.ln(h))
        b, t, v = logits.shape
        return F.cross_entropy(logits.view(b * t, v), y.view(b * t))


class Seq2Seq(Base):
    """A GRU encoder-decoder with teacher forcing on ``(src, tgt)``; one embedding for both.
    ``unshifted=True`` feeds the decoder ``tgt`` itself instead of ``[BOS] + tgt[:-1]``."""

    def __init__(self, unshifted=False, d=32, lr=1e-2):
        super().__init__(lr)
        self.unshifted = unshifted
        self.emb = nn.Embedding(VOCAB + 1, d)
        self.enc = nn.GRU(d, d, batch_first=True, bidirectional=True)
        self.bridge, self.dec = nn.Linear(2 * d, d), nn.GRU(d, d, batch_first=True)
        self.out = nn.Linear(d, VOCAB + 1)

    def training_step(self, batch, batch_idx):
        src, tgt = batch
        h = torch.tanh(self.bridge(self.enc(self.emb(src))[0].mean(1))).unsqueeze(0)
        bos = torch.full_like(tgt[:, :1], VOCAB)
        dec_in = tgt if self.unshifted else torch.cat([bos, tgt[:, :-1]], 1)
        return F.cross_entropy(self.out(self.dec(self.emb(dec_in), h)[0]).transpose(1, 2), tgt)
