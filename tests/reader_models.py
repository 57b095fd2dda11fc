"""Small models that reproduce the batch and loss patterns of third-party libraries.

None of those libraries is installed here; each model copies the pattern that matters to the
suite: how the batch is laid out, how the loss is called, what the step returns.

* :class:`Forecaster` -- pytorch-forecasting: a batch ``(x, (target, weight))`` where ``x`` is a
  dict of a dozen tensors (continuous float features, categorical long codes, lengths, time
  indices, a target scale), and a loss that is a torchmetrics ``Metric`` (a quantile loss)
  called as ``self.loss(prediction, (target, weight))``.
* :class:`GraphNet` -- torch_geometric / chemprop: a batch object holding the nodes of many
  graphs in one tensor (``x``, ``edge_index``, the assignment vector ``batch``, ``y`` per
  graph), with its own ``.to()`` and ``__getitem__``, and a custom ``nn.Module`` loss.
* :class:`HFStyle` -- Hugging Face transformers: a dict batch (``input_ids``,
  ``attention_mask``, ``labels``); ``forward`` computes the loss itself and returns an object
  with ``.loss`` and ``.logits``.
* :class:`GaussianNLL` -- a distribution loss: the model predicts a ``torch.distributions.Normal``
  and the loss is its negative log-likelihood.
"""

from __future__ import annotations

import copy
from dataclasses import InitVar, dataclass, field
from typing import Any, NamedTuple

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

try:
    from torchmetrics import Metric
except ImportError:  # pragma: no cover - torchmetrics ships with lightning
    Metric = None  # type: ignore[assignment,misc]


# ---------------------------------------------------------------------------- forecasting
ENC, DEC, CONT = 12, 4, 3
QUANTILES = (0.1, 0.5, 0.9)


class QuantileLoss(Metric):  # type: ignore[misc,valid-type]
    """Pinball loss as a torchmetrics ``Metric`` (pytorch-forecasting's pattern): ``update``
    accumulates, ``forward`` returns the batch value (differentiable)."""

    full_state_update = False
    is_differentiable = True
    higher_is_better = False

    def __init__(self, quantiles: tuple[float, ...] = QUANTILES) -> None:
        super().__init__()
        self.quantiles = list(quantiles)
        self.add_state("losses", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("lengths", default=torch.tensor(0), dist_reduce_fx="sum")

    def loss(self, y_pred: Tensor, target: Tensor) -> Tensor:
        losses = []
        for i, q in enumerate(self.quantiles):
            err = target - y_pred[..., i]
            losses.append(torch.max((q - 1) * err, q * err).unsqueeze(-1))
        return 2 * torch.cat(losses, dim=2)

    def update(self, y_pred: Tensor, target: Any) -> None:
        if isinstance(target, (list, tuple)):
            target, weight = target
        else:
            weight = None
        losses = self.loss(y_pred, target)
        if weight is not None:
            losses = losses * weight.unsqueeze(-1)
        self.losses = self.losses + losses.sum()
        self.lengths = self.lengths + losses.numel()

    def compute(self) -> Tensor:
        return self.losses / self.lengths


class ForecastData(Dataset):
    """Sliding windows of noisy sine series (one per group), as pytorch-forecasting's
    ``TimeSeriesDataSet`` would hand them out."""

    def __init__(self, n: int = 96, seed: int = 0, shuffle_target: bool = False) -> None:
        g = torch.Generator().manual_seed(seed)
        self.n = n
        self.group = torch.randint(0, 4, (n,), generator=g)
        self.start = torch.randint(0, 50, (n,), generator=g)
        self.noise = 0.05 * torch.randn(n, ENC + DEC, generator=g)
        self.perm = torch.randperm(n, generator=g) if shuffle_target else torch.arange(n)

    def __len__(self) -> int:
        return self.n

    def series(self, i: int) -> Tensor:
        t = self.start[i] + torch.arange(ENC + DEC, dtype=torch.float32)
        level = 10.0 + 3.0 * self.group[i].float()
        return level + 2.0 * torch.sin(t / 3.0 + self.group[i].float()) + self.noise[i]

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        s = self.series(i)
        tgt = self.series(int(self.perm[i]))[ENC:]
        t = self.start[i] + torch.arange(ENC + DEC)
        scale = torch.stack([s[:ENC].mean(), s[:ENC].std()])
        cont = torch.stack([torch.sin(t / 3.0), torch.cos(t / 3.0), (t - 60) / 30.0], dim=-1).float()
        cat = torch.stack([self.group[i].expand(ENC + DEC), t % 7], dim=-1)
        return {
            "encoder_cat": cat[:ENC],
            "encoder_cont": torch.cat([cont[:ENC], ((s[:ENC] - scale[0]) / scale[1]).unsqueeze(-1)], -1),
            "encoder_target": s[:ENC],
            "encoder_lengths": torch.tensor(ENC),
            "decoder_cat": cat[ENC:],
            "decoder_cont": torch.cat([cont[ENC:], torch.zeros(DEC, 1)], -1),
            "decoder_target": tgt,
            "decoder_lengths": torch.tensor(DEC),
            "decoder_time_idx": t[ENC:],
            "encoder_time_idx": t[:ENC],
            "groups": self.group[i].reshape(1),
            "target_scale": scale,
        }


def collate_forecast(items: list[dict[str, Tensor]]) -> tuple[dict[str, Tensor], tuple[Tensor, None]]:
    x = {k: torch.stack([it[k] for it in items]) for k in items[0]}
    return x, (x["decoder_target"].clone(), None)


def forecast_loaders(batch_size: int = 16, shuffle_target: bool = False) -> tuple[DataLoader, DataLoader]:
    train = ForecastData(96, 0, shuffle_target)
    val = ForecastData(32, 1, shuffle_target)
    return (
        DataLoader(train, batch_size=batch_size, shuffle=True, collate_fn=collate_forecast),
        DataLoader(val, batch_size=batch_size, collate_fn=collate_forecast),
    )


class Forecaster(L.LightningModule):
    """An encoder-decoder MLP forecaster with embeddings of the categoricals, predicting
    quantiles in the scale of the target (``target_scale`` undoes the normalisation)."""

    def __init__(self, lr: float = 3e-3, hidden: int = 32, detach: bool = False) -> None:
        super().__init__()
        self.lr, self.detach = lr, detach
        self.emb_group = nn.Embedding(4, 4)
        self.emb_dow = nn.Embedding(7, 3)
        feat = CONT + 1 + 4 + 3
        self.encoder = nn.Sequential(nn.Linear(ENC * feat, hidden), nn.Tanh())
        self.decoder = nn.Sequential(nn.Linear(hidden + DEC * (CONT + 1 + 3), hidden), nn.Tanh())
        self.head = nn.Linear(hidden, DEC * len(QUANTILES))
        self.loss = QuantileLoss()

    def embed(self, cat: Tensor) -> Tensor:
        return torch.cat([self.emb_group(cat[..., 0]), self.emb_dow(cat[..., 1])], dim=-1)

    def forward(self, x: dict[str, Tensor]) -> dict[str, Tensor]:
        b = x["encoder_cont"].shape[0]
        enc = torch.cat([x["encoder_cont"], self.embed(x["encoder_cat"])], dim=-1)
        h = self.encoder(enc.reshape(b, -1))
        if self.detach:
            h = h.detach()
        dec = torch.cat([x["decoder_cont"], self.emb_dow(x["decoder_cat"][..., 1])], dim=-1)
        h = self.decoder(torch.cat([h, dec.reshape(b, -1)], dim=-1))
        out = self.head(h).reshape(b, DEC, len(QUANTILES))
        scale = x["target_scale"]
        return {"prediction": out * scale[:, 1, None, None] + scale[:, 0, None, None]}

    def step(self, x: dict[str, Tensor], y: tuple[Tensor, Any]) -> Tensor:
        prediction = self(x)["prediction"]
        return self.loss(prediction, y)

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        x, y = batch
        loss = self.step(x, y)
        self.log("train_loss", loss)
        return {"loss": loss}

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", self.step(x, y))

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


# ---------------------------------------------------------------------------- graphs
class GraphBatch:
    """Many graphs in one batch, as torch_geometric's ``Batch``: attributes live in a store
    (``__getattr__``), ``.to()`` moves them, ``batch[key]`` reads them, ``num_graphs`` counts."""

    def __init__(self, **attrs: Any) -> None:
        self.__dict__["_store"] = dict(attrs)

    def __getattr__(self, key: str) -> Any:
        store = self.__dict__.get("_store", {})
        if key in store:
            return store[key]
        raise AttributeError(key)

    def __setattr__(self, key: str, value: Any) -> None:
        self._store[key] = value

    def __getitem__(self, key: str) -> Any:
        return self._store[key]

    def keys(self) -> list[str]:
        return list(self._store)

    def __copy__(self) -> GraphBatch:
        out = GraphBatch.__new__(GraphBatch)
        out.__dict__["_store"] = copy.copy(self._store)
        return out

    @property
    def num_graphs(self) -> int:
        return int(self._store["y"].shape[0])

    def to(self, device: Any, **kwargs: Any) -> GraphBatch:
        out = copy.copy(self)
        for k, v in self._store.items():
            if isinstance(v, Tensor):
                out._store[k] = v.to(device, **kwargs)
        return out


def _random_graph(g: torch.Generator, label: int) -> tuple[Tensor, Tensor]:
    n = int(torch.randint(4, 9, (1,), generator=g))
    x = torch.randn(n, 6, generator=g) * 0.5
    x[:, label] += 1.0
    src = torch.arange(n)
    ring = torch.stack([torch.cat([src, (src + 1) % n]), torch.cat([(src + 1) % n, src])])
    return x, ring


class GraphData(Dataset):
    def __init__(self, n: int = 96, seed: int = 0, classes: int = 3) -> None:
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(0, classes, (n,), generator=g)
        self.graphs = [_random_graph(g, int(c)) for c in self.labels]

    def __len__(self) -> int:
        return len(self.graphs)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor, Tensor]:
        x, e = self.graphs[i]
        return x, e, self.labels[i]


def collate_graphs(items: list[tuple[Tensor, Tensor, Tensor]]) -> GraphBatch:
    xs, es, assign = [], [], []
    offset = 0
    for gi, (x, e, _) in enumerate(items):
        xs.append(x)
        es.append(e + offset)
        assign.append(torch.full((x.shape[0],), gi, dtype=torch.long))
        offset += x.shape[0]
    y = torch.stack([it[2] for it in items])
    return GraphBatch(x=torch.cat(xs), edge_index=torch.cat(es, dim=1), batch=torch.cat(assign), y=y)


def graph_loaders(batch_size: int = 16) -> tuple[DataLoader, DataLoader]:
    return (
        DataLoader(GraphData(96, 0), batch_size=batch_size, shuffle=True, collate_fn=collate_graphs),
        DataLoader(GraphData(32, 1), batch_size=batch_size, collate_fn=collate_graphs),
    )


class LabelSmoothedNLL(nn.Module):
    """A custom classification loss written by hand (no torch.nn.functional loss inside)."""

    def __init__(self, smoothing: float = 0.0) -> None:
        super().__init__()
        self.smoothing = smoothing

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        logp = logits.log_softmax(dim=-1)
        picked = logp.gather(1, target.unsqueeze(1)).squeeze(1)
        return -((1 - self.smoothing) * picked + self.smoothing * logp.mean(dim=-1)).mean()


def scatter_mean(src: Tensor, index: Tensor, size: int) -> Tensor:
    out = torch.zeros(size, src.shape[1], dtype=src.dtype, device=src.device).index_add_(0, index, src)
    count = torch.zeros(size, dtype=src.dtype, device=src.device).index_add_(
        0, index, torch.ones_like(index, dtype=src.dtype)
    )
    return out / count.clamp_min(1).unsqueeze(1)


class GraphConv(nn.Module):
    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.lin = nn.Linear(d_in, d_out)
        self.root = nn.Linear(d_in, d_out, bias=False)

    def forward(self, x: Tensor, edge_index: Tensor) -> Tensor:
        src, dst = edge_index
        agg = scatter_mean(x[src], dst, x.shape[0])
        return self.lin(agg) + self.root(x)


class GraphNet(L.LightningModule):
    """Two graph convolutions, a mean pool per graph (the assignment vector) and a linear head."""

    def __init__(
        self,
        lr: float = 1e-2,
        hidden: int = 32,
        classes: int = 3,
        mix_graphs: bool = False,
        head_scale: float = 1.0,
    ) -> None:
        super().__init__()
        self.lr, self.mix_graphs = lr, mix_graphs
        self.conv1 = GraphConv(6, hidden)
        self.conv2 = GraphConv(hidden, hidden)
        self.head = nn.Linear(hidden, classes)
        with torch.no_grad():
            self.head.weight.mul_(head_scale)
        self.criterion = LabelSmoothedNLL()

    node_level = False

    def forward(self, data: GraphBatch) -> Tensor:
        h = torch.relu(self.conv1(data.x, data.edge_index))
        h = torch.relu(self.conv2(h, data.edge_index))
        if self.mix_graphs:  # bug: normalises over every node of the batch
            h = h - h.mean(dim=0, keepdim=True)
        if self.node_level:  # one prediction per node (node classification)
            return self.head(h)
        pooled = scatter_mean(h, data.batch, data.num_graphs)
        return self.head(pooled)

    def training_step(self, batch: GraphBatch, batch_idx: int) -> Tensor:
        target = batch.y[batch.batch] if self.node_level else batch.y
        loss = self.criterion(self(batch), target)
        self.log("train_loss", loss, batch_size=batch.num_graphs)
        return loss

    def validation_step(self, batch: GraphBatch, batch_idx: int) -> None:
        self.log("val_loss", self.criterion(self(batch), batch.y), batch_size=batch.num_graphs)

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


# ---------------------------------------------------------------------------- chemistry
@dataclass(frozen=True)
class MolGraphBatch:
    """chemprop's ``BatchMolGraph``: a frozen dataclass built from an ``InitVar`` (the graphs),
    holding atom features V, bond features E, the edge index, the reverse-edge index and the
    assignment vector."""

    mgs: InitVar[list]
    V: Tensor = field(init=False)
    E: Tensor = field(init=False)
    edge_index: Tensor = field(init=False)
    rev_edge_index: Tensor = field(init=False)
    batch: Tensor = field(init=False)

    def __post_init__(self, mgs: list) -> None:
        vs, es, ei, rev, assign, off, eoff = [], [], [], [], [], 0, 0
        for i, n in enumerate(mgs):
            vs.append(torch.randn(n, 4))
            src = torch.arange(n)
            e = torch.stack([torch.cat([src, (src + 1) % n]), torch.cat([(src + 1) % n, src])])
            es.append(torch.randn(e.shape[1], 2))
            ei.append(e + off)
            rev.append(torch.cat([torch.arange(n, 2 * n), torch.arange(n)]) + eoff)
            assign.append(torch.full((n,), i))
            off, eoff = off + n, eoff + e.shape[1]
        for name, parts in (("V", vs), ("E", es), ("rev_edge_index", rev), ("batch", assign)):
            object.__setattr__(self, name, torch.cat(parts))
        object.__setattr__(self, "edge_index", torch.cat(ei, dim=1))

    def to(self, device: Any, **kwargs: Any) -> MolGraphBatch:
        """Moves the tensors in place, as chemprop's ``BatchMolGraph.to`` does."""
        for name in ("V", "E", "edge_index", "rev_edge_index", "batch"):
            object.__setattr__(self, name, getattr(self, name).to(device, **kwargs))
        return self


class TrainingBatch(NamedTuple):
    """chemprop's ``TrainingBatch``."""

    bmg: MolGraphBatch
    V_d: Tensor | None
    X_d: Tensor
    Y: Tensor
    w: Tensor


# ---------------------------------------------------------------------------- HF style
@dataclass
class SequenceClassifierOutput:
    loss: Tensor | None = None
    logits: Tensor | None = None


VOCAB, SEQ = 40, 10


class TokenData(Dataset):
    """Label = which of three marker tokens the sequence holds most of."""

    def __init__(self, n: int = 128, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(4, VOCAB, (n, SEQ), generator=g)
        self.labels = torch.randint(0, 3, (n,), generator=g)
        for i in range(n):  # the marker at random positions: no position is the label itself
            self.ids[i, torch.randperm(SEQ, generator=g)[:4]] = 1 + self.labels[i]
        self.mask = torch.ones(n, SEQ, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i]}


def token_loaders(batch_size: int = 16) -> tuple[DataLoader, DataLoader]:
    return (
        DataLoader(TokenData(128, 0), batch_size=batch_size, shuffle=True),
        DataLoader(TokenData(32, 1), batch_size=batch_size),
    )


class TinyEncoder(nn.Module):
    """A transformers-style classifier: ``forward(input_ids, attention_mask, labels)`` computes
    the loss itself (with ``nn.CrossEntropyLoss``) and returns ``.loss`` and ``.logits``."""

    def __init__(self, d: int = 32, softmax_twice: bool = False) -> None:
        super().__init__()
        self.embeddings = nn.Embedding(VOCAB, d)
        self.position = nn.Embedding(SEQ, d)
        layer = nn.TransformerEncoderLayer(d, 4, 64, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.classifier = nn.Linear(d, 3)
        self.softmax_twice = softmax_twice

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, labels: Tensor | None = None
    ) -> SequenceClassifierOutput:
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        h = self.embeddings(input_ids) + self.position(pos)
        pad = None if attention_mask is None else attention_mask == 0
        h = self.encoder(h, src_key_padding_mask=pad)
        logits = self.classifier(h[:, 0])
        if self.softmax_twice:
            logits = logits.softmax(-1)
        loss = None
        if labels is not None:
            loss = nn.CrossEntropyLoss()(logits.view(-1, 3), labels.view(-1))
        return SequenceClassifierOutput(loss=loss, logits=logits)


class HFStyle(L.LightningModule):
    def __init__(self, lr: float = 3e-3, softmax_twice: bool = False) -> None:
        super().__init__()
        self.lr = lr
        self.model = TinyEncoder(softmax_twice=softmax_twice)

    def forward(self, **batch: Tensor) -> SequenceClassifierOutput:
        return self.model(**batch)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        out = self(**batch)
        self.log("train_loss", out.loss)
        return out.loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self.log("val_loss", self(**batch).loss)

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


# ---------------------------------------------------------------------------- distribution loss
def regression_data(n: int = 256, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g)
    mean = 3.0 + x[:, 0] - 0.5 * x[:, 1] ** 2
    std = 0.2 + 0.3 * x[:, 2].abs()
    return x, (mean + std * torch.randn(n, generator=g)).unsqueeze(1)


def regression_loaders(batch_size: int = 16) -> tuple[DataLoader, DataLoader]:
    from torch.utils.data import TensorDataset

    x, y = regression_data(256, 0)
    xv, yv = regression_data(64, 1)
    return (
        DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True),
        DataLoader(TensorDataset(xv, yv), batch_size=batch_size),
    )


class GaussianNLL(L.LightningModule):
    """Predicts a Normal distribution per sample; the loss is its negative log-likelihood."""

    def __init__(self, lr: float = 3e-3, hidden: int = 32) -> None:
        super().__init__()
        self.lr = lr
        self.body = nn.Sequential(nn.Linear(5, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.head = nn.Linear(hidden, 2)

    def forward(self, x: Tensor) -> torch.distributions.Normal:
        loc, raw = self.head(self.body(x)).unbind(-1)
        return torch.distributions.Normal(loc.unsqueeze(-1), F.softplus(raw).unsqueeze(-1) + 1e-3)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        loss = -self(x).log_prob(y).mean()
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", -self(x).log_prob(y).mean())

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


__all__ = [
    "Forecaster",
    "GaussianNLL",
    "GraphBatch",
    "GraphNet",
    "HFStyle",
    "MolGraphBatch",
    "QuantileLoss",
    "TrainingBatch",
    "collate_graphs",
    "forecast_loaders",
    "graph_loaders",
    "regression_loaders",
    "token_loaders",
]


# ---------------------------------------------------------------------------- a plain loss function
def pinball(pred: Tensor, y: Tensor, q: float = 0.5) -> Tensor:
    """A loss written as a plain Python function (no module, no torch.nn.functional loss)."""
    err = y - pred
    return torch.max(q * err, (q - 1) * err).mean()


class FunctionLoss(L.LightningModule):
    """A regressor whose loss is a plain function of ``self(x)`` and ``y``."""

    def __init__(self, lr: float = 3e-3, hidden: int = 32, detach: bool = False) -> None:
        super().__init__()
        self.lr, self.detach = lr, detach
        self.net = nn.Sequential(nn.Linear(5, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, x: Tensor) -> Tensor:
        out = self.net(x)
        return out.detach() + 0 * out if self.detach else out

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        loss = pinball(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", pinball(self(x), y))

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


# ---------------------------------------------------------------------------- chemistry model
class MoleculeData(Dataset):
    """Ring molecules of 3..8 atoms; the property is the mean of the first atom feature plus a
    ring-size term."""

    def __init__(self, n: int = 96, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.sizes = torch.randint(3, 9, (n,), generator=g)
        self.seeds = torch.randint(0, 2**31 - 1, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, i: int) -> tuple[int, int]:
        return int(self.sizes[i]), int(self.seeds[i])


def collate_molecules(items: list[tuple[int, int]]) -> TrainingBatch:
    state = torch.get_rng_state()
    torch.manual_seed(sum(s for _, s in items) % (2**31))
    bmg = MolGraphBatch([n for n, _ in items])
    torch.set_rng_state(state)
    sizes = torch.tensor([n for n, _ in items], dtype=torch.float32)
    pooled = torch.zeros(len(items)).index_add_(0, bmg.batch, bmg.V[:, 0]) / sizes
    y = (pooled + 0.2 * (sizes - 5.5)).unsqueeze(1)
    return TrainingBatch(bmg, None, torch.randn(len(items), 2) * 0.1, y, torch.ones(len(items), 1))


def molecule_loaders(batch_size: int = 16) -> tuple[DataLoader, DataLoader]:
    return (
        DataLoader(MoleculeData(96, 0), batch_size=batch_size, shuffle=True, collate_fn=collate_molecules),
        DataLoader(MoleculeData(32, 1), batch_size=batch_size, collate_fn=collate_molecules),
    )


class WeightedMSE(nn.Module):
    """chemprop's criterion signature: ``(preds, targets, mask, weights, lt_mask, gt_mask)``."""

    def forward(self, preds: Tensor, targets: Tensor, mask: Tensor, weights: Tensor, *masks: Any) -> Tensor:
        err = (preds - targets) ** 2 * weights
        return (err * mask).sum() / mask.sum()


class MPNN(L.LightningModule):
    """Bond message passing (messages along the edges, their sum per atom), a mean aggregation
    per molecule and a feed-forward head, trained on ``TrainingBatch`` (chemprop's pattern)."""

    def __init__(self, lr: float = 3e-3, hidden: int = 32, lr_scale: float = 1.0) -> None:
        super().__init__()
        self.lr = lr * lr_scale
        self.W_i = nn.Linear(4 + 2, hidden)
        self.W_h = nn.Linear(hidden, hidden)
        self.W_o = nn.Linear(4 + hidden, hidden)
        self.ffn = nn.Sequential(nn.Linear(hidden + 2, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        self.criterion = WeightedMSE()

    def forward(self, bmg: MolGraphBatch, X_d: Tensor) -> Tensor:
        src, dst = bmg.edge_index
        h0 = torch.relu(self.W_i(torch.cat([bmg.V[src], bmg.E], dim=1)))
        h = h0
        for _ in range(2):
            m = torch.zeros(bmg.V.shape[0], h.shape[1], dtype=h.dtype).index_add_(0, dst, h)
            h = torch.relu(h0 + self.W_h(m[src] - h[bmg.rev_edge_index]))
        m = torch.zeros(bmg.V.shape[0], h.shape[1], dtype=h.dtype).index_add_(0, dst, h)
        atoms = torch.relu(self.W_o(torch.cat([bmg.V, m], dim=1)))
        n = int(bmg.batch.max()) + 1
        count = torch.zeros(n, dtype=atoms.dtype).index_add_(
            0, bmg.batch, torch.ones_like(bmg.batch, dtype=atoms.dtype)
        )
        mol = (
            torch.zeros(n, atoms.shape[1], dtype=atoms.dtype).index_add_(0, bmg.batch, atoms) / count[:, None]
        )
        return self.ffn(torch.cat([mol, X_d], dim=1))

    def training_step(self, batch: TrainingBatch, batch_idx: int) -> Tensor:
        bmg, _, X_d, targets, weights = batch
        mask = targets.isfinite()
        loss = self.criterion(self(bmg, X_d), targets, mask, weights, None, None)
        self.log("train_loss", loss, batch_size=len(targets))
        return loss

    def validation_step(self, batch: TrainingBatch, batch_idx: int) -> None:
        bmg, _, X_d, targets, weights = batch
        loss = self.criterion(self(bmg, X_d), targets, targets.isfinite(), weights)
        self.log("val_loss", loss, batch_size=len(targets))

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=self.lr)
