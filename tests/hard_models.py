"""Unusual but healthy setups for the hard-case matrix (``test_hard_cases.py``) and the resume
tests, plus a helper that runs the full suite on one of them and collects what it produced."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

import lightning_recipe as lr
from models import Classifier, accumulator, mlp, trainer


# ---------------------------------------------------------------------------- running the suite
@dataclass
class Run:
    """What one fit with the full suite left behind."""

    trainer: Any
    callbacks: list
    seconds: float
    logdir: Path | None

    def by_name(self, name: str) -> Any:
        return next(cb for cb in self.callbacks if type(cb).__name__ == name)

    @property
    def findings(self) -> list:
        return lr.findings(self.trainer)

    def codes(self, *severities: str) -> list[tuple[str, str]]:
        return [(f.source, f.code) for f in self.findings if not severities or f.severity.value in severities]

    def loud(self) -> list[str]:
        """Every warning / error finding as 'source code: message'."""
        return [
            f"{f.source} {f.code}: {f.message}"
            for f in self.findings
            if f.severity.value in ("warning", "error")
        ]

    def internal_errors(self) -> list[str]:
        return [f"{f.source}: {f.message}" for f in self.findings if f.code == "internal-error"]

    def skips(self, source: str) -> list[str]:
        return [f.message for f in self.findings if f.source == source and f.code == "check-skipped"]

    def scalars(self) -> dict[str, list[tuple[int, float]]]:
        """Every scalar tag in the run's event files: [(step, value), ...]."""
        acc = accumulator(self.logdir)
        return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}

    def images(self) -> dict[str, list[int]]:
        """Every image tag in the run's event files: [step, ...]."""
        acc = accumulator(self.logdir)
        return {tag: [e.step for e in acc.Images(tag)] for tag in acc.Tags()["images"]}


def fit_suite(
    tmp_path: Path,
    module: Any,
    train: Any,
    val: Any = None,
    *,
    suite: dict[str, Any] | None = None,
    extra_callbacks: list | None = None,
    trainer_factory: Any = None,
    fit_kwargs: dict[str, Any] | None = None,
    **trainer_kwargs: Any,
) -> Run:
    """Fit ``module`` with ``recipe_callbacks(monitor="val_loss")`` (every callback of the suite)
    and a TensorBoard logger at ``tmp_path/run/version_0``."""
    callbacks = lr.recipe_callbacks(monitor="val_loss", print_report=False, **(suite or {}))
    opts: dict[str, Any] = {
        "max_steps": 24,
        "max_epochs": 100,
        "log_every_n_steps": 4,
        "limit_val_batches": 2,
    }
    opts.update(trainer_kwargs)
    make = trainer_factory or trainer
    t = make(tmp_path, callbacks + list(extra_callbacks or []), **opts)
    start = time.perf_counter()
    t.fit(module, train, val, **(fit_kwargs or {}))
    seconds = time.perf_counter() - start
    logdir = tmp_path / "run" / "version_0"
    return Run(t, callbacks, seconds, logdir if logdir.is_dir() else None)


# ---------------------------------------------------------------------------- data
class ListDataset(Dataset):
    """Items built by ``make(i)``."""

    def __init__(self, n: int, make: Any) -> None:
        self.n, self.make = n, make

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Any:
        return self.make(i)


@dataclass
class Sample:
    """A batch layout nobody designed for: a dataclass with unguessable field names."""

    pixels: torch.Tensor
    digit: torch.Tensor


def collate_samples(items: list[Sample]) -> Sample:
    return Sample(torch.stack([s.pixels for s in items]), torch.stack([s.digit for s in items]))


def split_loaders(dataset_train: Dataset, dataset_val: Dataset, batch_size: int = 16, collate: Any = None):
    train = DataLoader(dataset_train, batch_size=batch_size, shuffle=True, collate_fn=collate)
    val = DataLoader(dataset_val, batch_size=batch_size, collate_fn=collate)
    return train, val


# ---------------------------------------------------------------------------- modules
class DictStep(Classifier):
    """``training_step`` returns ``{"loss": loss, "acc": acc}``."""

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        x, y = self.split(batch)
        out = self(x)
        loss = F.cross_entropy(out, y)
        acc = (out.argmax(-1) == y).float().mean()
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        self.log("train_acc", acc, on_epoch=True)
        return {"loss": loss, "acc": acc}


class TinyGAN(L.LightningModule):
    """Generator / discriminator on 2-d points, both stepped every batch (manual optimisation).

    ``validation_step`` logs ``val_loss`` (the discriminator's loss on real vs generated
    points), so ``recipe_callbacks(monitor="val_loss")`` has its metric.
    """

    def __init__(self, noise: int = 4, dim: int = 2, hidden: int = 16) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.noise = noise
        self.generator = nn.Sequential(nn.Linear(noise, hidden), nn.ReLU(), nn.Linear(hidden, dim))
        self.discriminator = nn.Sequential(nn.Linear(dim, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, 1))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.generator(z)

    def _d_loss(self, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        ones = torch.ones(len(real), 1, device=real.device)
        zeros = torch.zeros(len(fake), 1, device=real.device)
        return 0.5 * (
            F.binary_cross_entropy_with_logits(self.discriminator(real), ones)
            + F.binary_cross_entropy_with_logits(self.discriminator(fake), zeros)
        )

    def training_step(self, batch: Any, batch_idx: int) -> None:
        real = batch[0]
        opt_g, opt_d = self.optimizers()
        z = torch.randn(len(real), self.noise, device=real.device)
        fake = self.generator(z)
        # discriminator (Lightning's documented pattern: toggle_optimizer freezes the other's params)
        self.toggle_optimizer(opt_d)
        d_loss = self._d_loss(real, fake.detach())
        opt_d.zero_grad()
        self.manual_backward(d_loss)
        opt_d.step()
        self.untoggle_optimizer(opt_d)
        # generator
        self.toggle_optimizer(opt_g)
        g_loss = F.binary_cross_entropy_with_logits(
            self.discriminator(fake), torch.ones(len(real), 1, device=real.device)
        )
        opt_g.zero_grad()
        self.manual_backward(g_loss)
        opt_g.step()
        self.untoggle_optimizer(opt_g)
        self.log_dict({"d_loss": d_loss, "g_loss": g_loss}, prog_bar=False)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        real = batch[0]
        z = torch.randn(len(real), self.noise, device=real.device)
        self.log("val_loss", self._d_loss(real, self.generator(z)))

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return [
            torch.optim.Adam(self.generator.parameters(), lr=2e-3, betas=(0.5, 0.999)),
            torch.optim.Adam(self.discriminator.parameters(), lr=2e-3, betas=(0.5, 0.999)),
        ]


def gan_points(n: int = 256, seed: int = 0) -> torch.Tensor:
    """Points on a noisy ring (the "real" distribution of the GAN)."""
    g = torch.Generator().manual_seed(seed)
    angle = torch.rand(n, generator=g) * 2 * torch.pi
    return torch.stack([angle.cos(), angle.sin()], 1) + 0.05 * torch.randn(n, 2, generator=g)


def backbone(channels: int = 1) -> nn.Sequential:
    """A small conv feature extractor with BatchNorm (stands in for a pretrained backbone)."""
    return nn.Sequential(
        nn.Conv2d(channels, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
    )


class FrozenBackbone(L.LightningModule):
    """Fine-tuning: a frozen backbone (``requires_grad=False``, BatchNorm kept in eval mode with
    its running statistics) and a trainable head; only the head is in the optimizer."""

    def __init__(self, pretrained: nn.Module, classes: int = 4, lr: float = 1e-2) -> None:
        super().__init__()
        self.backbone = pretrained
        self.backbone.requires_grad_(False)
        self.head = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, classes))
        self.lr = lr
        self.backbone.eval()  # Lightning 2.x keeps the modes it finds (it never calls .train())

    def train(self, mode: bool = True) -> FrozenBackbone:
        super().train(mode)
        self.backbone.eval()  # frozen statistics, whatever the caller asks
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        out = self(x)
        loss = F.cross_entropy(out, y)
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        self.log("train_acc", (out.argmax(-1) == y).float().mean(), on_epoch=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        out = self(x)
        self.log("val_loss", F.cross_entropy(out, y))
        self.log("val_acc", (out.argmax(-1) == y).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.head.parameters(), lr=self.lr)


def pretrained_backbone(
    x: torch.Tensor, y: torch.Tensor, net: nn.Module | None = None, steps: int = 30
) -> nn.Module:
    """Train ``net`` (default :func:`backbone`) with a linear probe briefly and return it, running
    statistics included: a stand-in for a pretrained feature extractor."""
    net = net if net is not None else backbone(x.shape[1])
    full = nn.Sequential(net, nn.Linear(64, int(y.max()) + 1))
    opt = torch.optim.Adam(full.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (32,), generator=g)
        loss = F.cross_entropy(full(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net


class CompiledInside(Classifier):
    """``self.net = torch.compile(net)`` inside the LightningModule."""

    def __init__(self, net: nn.Module, backend: str, lr: float = 1e-2) -> None:
        super().__init__(torch.compile(net, backend=backend), lr=lr)


class MetaTuple(Classifier):
    """Batches are ``(meta_dict, x, y)``: a layout no getter was written for."""

    def split(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        _meta, x, y = batch
        return x, y


class DataclassBatch(Classifier):
    """Batches are :class:`Sample` dataclasses (``pixels``, ``digit``)."""

    def split(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return batch.pixels, batch.digit


class NoValidation(Classifier):
    """Has a ``validation_step`` but runs without validation data (or with it switched off)."""


def mlp_net(d: int = 16, classes: int = 4) -> nn.Module:
    return mlp(d, classes)


# ---------------------------------------------------------------------------- pytorch_lightning
def pl_classes() -> tuple[Any, Any]:
    """(LightningModule subclass, Trainer factory) from the standalone ``pytorch_lightning``."""
    import pytorch_lightning as pl

    class PLClassifier(pl.LightningModule):
        def __init__(self, net: nn.Module, lr: float = 1e-2) -> None:
            super().__init__()
            self.net, self.lr = net, lr

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            out = self(x)
            loss = F.cross_entropy(out, y)
            self.log("train_loss", loss, on_step=True, on_epoch=True)
            self.log("train_acc", (out.argmax(-1) == y).float().mean(), on_epoch=True)
            return loss

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            x, y = batch
            out = self(x)
            self.log("val_loss", F.cross_entropy(out, y))
            self.log("val_acc", (out.argmax(-1) == y).float().mean())

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.Adam(self.parameters(), lr=self.lr)

    def make_trainer(tmp_path: Path, callbacks: list, **kwargs: Any) -> Any:
        from pytorch_lightning.loggers import TensorBoardLogger

        opts: dict[str, Any] = {
            "accelerator": "cpu",
            "devices": 1,
            "logger": TensorBoardLogger(str(tmp_path), name="run"),
            "callbacks": callbacks,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "enable_checkpointing": False,
            "default_root_dir": str(tmp_path),
        }
        opts.update(kwargs)
        return pl.Trainer(**opts)

    return PLClassifier, make_trainer
