"""Small models and data shared by the tests (healthy unless a test breaks them on purpose)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset


# ---------------------------------------------------------------------------- data
def blobs(n: int = 256, d: int = 16, classes: int = 4, seed: int = 0, scale: float = 1.0):
    """Gaussian blobs: (x (n, d) float, y (n,) int), learnable and roughly normalised."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, d, generator=g) * 1.5
    y = torch.randint(0, classes, (n,), generator=g)
    x = centers[y] + torch.randn(n, d, generator=g)
    x = (x - x.mean(0)) / x.std(0)
    return x * scale, y


def image_blobs(n: int = 256, classes: int = 4, size: int = 8, channels: int = 1, seed: int = 0):
    """Images (n, C, size, size) whose class decides a smooth pattern, plus noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    grid = torch.linspace(-1, 1, size)
    yy, xx = torch.meshgrid(grid, grid, indexing="ij")
    patterns = torch.stack(
        [torch.sin((k + 1) * xx * math.pi / 2) * torch.cos(k * yy) for k in range(classes)]
    )
    x = patterns[y].unsqueeze(1).repeat(1, channels, 1, 1) + 0.3 * torch.randn(
        n, channels, size, size, generator=g
    )
    return x, y


class DictDataset(Dataset):
    """Yields ``{x_key: x[i], y_key: y[i]}``."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, x_key: str = "x", y_key: str = "y") -> None:
        self.x, self.y, self.x_key, self.y_key = x, y, x_key, y_key

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {self.x_key: self.x[i], self.y_key: self.y[i]}


def loaders(
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int = 32,
    dict_keys: tuple[str, str] | None = None,
    val_fraction: float = 0.25,
    shuffle: bool = True,
) -> tuple[DataLoader, DataLoader]:
    """Train / val loaders over (x, y) tuples, or dicts with ``dict_keys``."""
    n_val = int(len(x) * val_fraction)

    def make(xs: torch.Tensor, ys: torch.Tensor) -> Dataset:
        return DictDataset(xs, ys, *dict_keys) if dict_keys else TensorDataset(xs, ys)

    train = DataLoader(make(x[n_val:], y[n_val:]), batch_size=batch_size, shuffle=shuffle)
    val = DataLoader(make(x[:n_val], y[:n_val]), batch_size=batch_size)
    return train, val


# ---------------------------------------------------------------------------- modules
def mlp(d: int = 16, classes: int = 4, hidden: int = 32, act: type[nn.Module] = nn.ReLU) -> nn.Module:
    return nn.Sequential(
        nn.Linear(d, hidden), act(), nn.Linear(hidden, hidden), act(), nn.Linear(hidden, classes)
    )


def cnn(channels: int = 1, classes: int = 4, dropout: float = 0.1) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(channels, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Dropout(dropout),
        nn.Linear(64, classes),
    )


class Classifier(L.LightningModule):
    """Wraps any ``net`` mapping inputs to logits; reads (x, y) tuples or dicts."""

    def __init__(
        self,
        net: nn.Module,
        lr: float = 1e-2,
        optimizer: str = "adam",
        x_key: str = "x",
        y_key: str = "y",
        loss: str = "ce",
    ) -> None:
        super().__init__()
        self.net = net
        self.lr = lr
        self.optimizer = optimizer
        self.x_key, self.y_key = x_key, y_key
        self.loss_kind = loss

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def split(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(batch, dict):
            return batch[self.x_key], batch[self.y_key]
        return batch[0], batch[1]

    def loss_fn(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.loss_kind == "mse":
            return F.mse_loss(out, y)
        return F.cross_entropy(out, y)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = self.split(batch)
        out = self(x)
        loss = self.loss_fn(out, y)
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        if self.loss_kind == "ce":
            self.log("train_acc", (out.argmax(-1) == y).float().mean(), on_epoch=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = self.split(batch)
        out = self(x)
        self.log("val_loss", self.loss_fn(out, y))
        if self.loss_kind == "ce":
            self.log("val_acc", (out.argmax(-1) == y).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer == "sgd":
            return torch.optim.SGD(self.parameters(), lr=self.lr)
        return torch.optim.Adam(self.parameters(), lr=self.lr)


# ---------------------------------------------------------------------------- trainers
def trainer(tmp_path: Path, callbacks: list, logger: str | None = "tb", **kwargs: Any) -> L.Trainer:
    """A quiet CPU trainer writing under ``tmp_path``."""
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    if logger == "tb":
        lg: Any = TensorBoardLogger(str(tmp_path), name="run")
    elif logger == "csv":
        lg = CSVLogger(str(tmp_path), name="run")
    else:
        lg = False
    opts: dict[str, Any] = {
        "max_epochs": 1,
        "accelerator": "cpu",
        "devices": 1,
        "logger": lg,
        "callbacks": callbacks,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "log_every_n_steps": 1,
        "default_root_dir": str(tmp_path),
    }
    opts.update(kwargs)
    return L.Trainer(**opts)


class ManualClassifier(Classifier):
    """Manual optimisation with one optimizer (and the usual zero_grad / backward / step)."""

    def __init__(self, net: nn.Module, lr: float = 1e-2) -> None:
        super().__init__(net, lr=lr)
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        opt = self.optimizers()
        x, y = self.split(batch)
        out = self(x)
        loss = F.cross_entropy(out, y)
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        self.log("train_acc", (out.argmax(-1) == y).float().mean(), on_epoch=True)
        return loss


def event_tags(logdir: Path | str) -> dict[str, list[str]]:
    """Tags by kind ('scalars', 'histograms', 'images', 'tensors') in a TensorBoard run dir."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(
        str(logdir), size_guidance={"scalars": 0, "histograms": 0, "images": 0, "tensors": 0}
    )
    acc.Reload()
    return acc.Tags()


def accumulator(logdir: Path | str):
    """A loaded EventAccumulator for ``logdir`` (keeps every event)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(
        str(logdir), size_guidance={"scalars": 0, "histograms": 0, "images": 0, "tensors": 0}
    )
    acc.Reload()
    return acc


# ---------------------------------------------------------------------------- sequences
def token_blobs(n: int = 256, length: int = 12, vocab: int = 50, classes: int = 3, seed: int = 0):
    """Token ids (n, length) whose class is the most frequent of ``classes`` marker tokens."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    x = torch.randint(classes, vocab, (n, length), generator=g)
    marks = torch.randint(0, length, (n, 4), generator=g)
    x.scatter_(1, marks, y[:, None].expand(-1, 4))
    return x, y


class GRUNet(nn.Module):
    """Embedding -> GRU -> last hidden state -> Linear."""

    def __init__(self, vocab: int = 50, classes: int = 3, dim: int = 16) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.rnn = nn.GRU(dim, dim, batch_first=True)
        self.out = nn.Linear(dim, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h, _ = self.rnn(self.emb(tokens))
        return self.out(h[:, -1])


class TinyTransformer(nn.Module):
    """Embedding + positions -> 1 TransformerEncoder layer -> mean pool -> Linear."""

    def __init__(self, vocab: int = 50, classes: int = 3, dim: int = 16, length: int = 12) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.zeros(1, length, dim))
        layer = nn.TransformerEncoderLayer(dim, 2, 32, dropout=0.1, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.out = nn.Linear(dim, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.enc(self.emb(tokens) + self.pos[:, : tokens.shape[1]])
        return self.out(h.mean(1))
