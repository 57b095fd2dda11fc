"""The digits demo: a small CNN on scikit-learn's 8x8 digits, healthy or deliberately broken.

``lightning-recipe demo`` trains it with the full suite; ``--bug NAME`` picks one of
:data:`BUGS` so a new user sees a finding fire. Needs scikit-learn (``pip install
lightning-recipe[demo]``).
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

#: broken variants of the demo and what each breaks
BUGS: dict[str, str] = {
    "softmax": "the model ends in a softmax, and cross_entropy applies another one",
    "unnormalized": "the inputs stay in 0..16 instead of being standardised",
    "batch-view": "a reshape where a permute was meant mixes the samples of each batch",
    "custom-backward": "a hand-written SiLU autograd.Function whose backward forgets a term",
    "lr-too-high": "the learning rate is 250x too high (0.5 instead of 2e-3)",
    "nan-sample": "one training image has a NaN pixel (a missing value in the data)",
    "sigmoid": "the model ends in a sigmoid: cross_entropy sees scores squashed into (0, 1) "
    "and cannot fall below 1.46",
    "detach": "the conv features are detached before the head, so the conv layers never get a gradient",
    "train-in-val": "validation_step calls self.train(): dropout and BatchNorm run in training mode "
    "on validation data",
    "no-zero-grad": "optimizer_zero_grad is overridden to do nothing, so gradients pile up from step to step",
    "conv-bias": "the first conv has bias=True although a BatchNorm follows it (an info finding)",
    "no-output-bias": "the output layer has bias=False (an info finding)",
    "shuffled-labels": "the labels are shuffled apart from their images (train and val)",
    "sgd-too-high": "SGD at lr 20 (momentum 0.9) instead of AdamW 2e-3: updates larger than the weights",
    "lr-too-low": "the learning rate is 1e-7 instead of 2e-3",
    "lr-decay-per-step": "MultiStepLR(milestones=[2, 4, 6]) meant in epochs but stepped every batch",
    "unused-block": "forward skips the second conv block, whose parameters stay in the optimizer",
    "tiny-train-set": "training on 20 images (batch 4, no dropout): the model memorises them",
    "tiny-model": "a linear layer on two pooled pixels (top / bottom brightness) instead of the CNN",
    "dead-relu": "the hidden layer of the head starts with a bias of -10, so its ReLUs never fire",
    "tanh-big-init": "a tanh hidden layer with N(0, 1) weights: its units saturate at +-1",
    "deep-sigmoid": "a head of 7 sigmoid layers: the gradient vanishes on its way to the first layers",
    "tanh-chaos": "a head of 16 tanh layers with weights 3x too large: the gradient explodes backwards",
    "where-sqrt": "a ReLU written as torch.where(x > 0, x.sqrt(), 0): the untaken branch leaks NaN",
}

#: bugs that live in the model (the others live in the data)
MODEL_BUGS = (
    "softmax",
    "batch-view",
    "custom-backward",
    "sigmoid",
    "detach",
    "train-in-val",
    "no-zero-grad",
    "conv-bias",
    "no-output-bias",
    "sgd-too-high",
    "lr-decay-per-step",
    "unused-block",
    "tiny-model",
    "tiny-train-set",
    "dead-relu",
    "tanh-big-init",
    "deep-sigmoid",
    "tanh-chaos",
    "where-sqrt",
)


class _SiLUForgetsTerm(torch.autograd.Function):
    """x * sigmoid(x), with the bug of the ``custom-backward`` demo: the backward returns
    sigmoid(x) and forgets the x * sigmoid'(x) term of the product rule."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return x * torch.sigmoid(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return grad * torch.sigmoid(x)  # correct: s + x * s * (1 - s)


class _SqrtReLU(nn.Module):
    """sqrt(x) for x > 0 else 0, written with torch.where: the ``where-sqrt`` demo bug. The
    gradient of the branch not taken is still computed: d sqrt(x)/dx at x <= 0 is NaN/Inf, and
    0 * NaN = NaN flows back through ``where``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.where(x > 0, x.sqrt(), torch.zeros_like(x))


def _deep_head(depth: int, act: type[nn.Module], gain: float | None = None) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Flatten(), nn.Dropout(0.2)]
    width = 32 * 4 * 4
    for _ in range(depth):
        lin = nn.Linear(width, 64)
        if gain is not None:
            nn.init.normal_(lin.weight, 0.0, gain / math.sqrt(width))
        layers += [lin, act()]
        width = 64
    layers.append(nn.Linear(64, 10))
    return nn.Sequential(*layers)


class _HandSiLU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _SiLUForgetsTerm.apply(x)


def load_digits_tensors(normalize: bool = True, val_fraction: float = 0.2, seed: int = 0) -> tuple:
    """(x_train, y_train, x_val, y_val): images (N, 1, 8, 8) float32, labels int64.

    With ``normalize`` the pixels are standardised with the training set's mean and std.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - the demo extra installs it
        raise ImportError("the digits demo needs scikit-learn: pip install 'lightning-recipe[demo]'") from exc
    import numpy as np

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(data.target, dtype=torch.int64)
    order = torch.as_tensor(np.random.RandomState(seed).permutation(len(y)))
    x, y = x[order], y[order]
    n_val = int(len(y) * val_fraction)
    x_train, y_train, x_val, y_val = x[n_val:], y[n_val:], x[:n_val], y[:n_val]
    if normalize:
        mean, std = x_train.mean(), x_train.std()
        x_train, x_val = (x_train - mean) / std, (x_val - mean) / std
    return x_train, y_train, x_val, y_val


class _DictDataset(Dataset):
    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"image": self.x[i], "label": self.y[i]}


class DigitsDataModule(L.LightningDataModule):
    """scikit-learn's digits as (image, label) batches, or ``{"image", "label"}`` dicts."""

    def __init__(
        self,
        batch_size: int = 64,
        normalize: bool = True,
        dict_batches: bool = False,
        seed: int = 0,
        corrupt: bool = False,
        shuffle_labels: bool = False,
        train_subset: int | None = None,
    ) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.normalize = normalize
        self.corrupt = corrupt
        self.shuffle_labels = shuffle_labels
        self.train_subset = train_subset
        self.dict_batches = dict_batches
        self.seed = seed

    def setup(self, stage: str | None = None) -> None:
        x_train, y_train, x_val, y_val = load_digits_tensors(self.normalize, seed=self.seed)
        if self.shuffle_labels:
            g = torch.Generator().manual_seed(self.seed)
            y_train = y_train[torch.randperm(len(y_train), generator=g)]
            y_val = y_val[torch.randperm(len(y_val), generator=g)]
        if self.corrupt:  # after normalising, or the mean/std would turn everything NaN
            x_train[700, 0, 3, 3] = float("nan")
        if self.train_subset:
            x_train, y_train = x_train[: self.train_subset], y_train[: self.train_subset]
        make = _DictDataset if self.dict_batches else TensorDataset
        self.train_set, self.val_set = make(x_train, y_train), make(x_val, y_val)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=256)


class DigitsCNN(L.LightningModule):
    """A small CNN for 8x8 digits: two conv/BatchNorm/ReLU blocks, max-pool, dropout, MLP head."""

    def __init__(self, lr: float = 2e-3, weight_decay: float = 1e-4, bug: str | None = None) -> None:
        super().__init__()
        if bug is not None and bug not in BUGS:
            raise ValueError(f"`bug` must be one of {sorted(BUGS)} or None, got {bug!r}")
        self.save_hyperparameters()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1, bias=bug == "conv-bias"),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(0.2),
            nn.Linear(32 * 4 * 4, 64),
            nn.ReLU(),
            nn.Linear(64, 10, bias=bug != "no-output-bias"),
        )
        if bug == "custom-backward":
            self.head[3] = _HandSiLU()
        if bug == "tiny-train-set":
            self.head[1].p = 0.0  # no dropout: nothing keeps it from memorising
        if bug == "dead-relu":
            nn.init.constant_(self.head[2].bias, -10.0)
        if bug == "tanh-big-init":
            self.head[3] = nn.Tanh()
            nn.init.normal_(self.head[2].weight, 0.0, 1.0)
        if bug == "deep-sigmoid":
            self.head = _deep_head(7, nn.Sigmoid)
        if bug == "tanh-chaos":
            self.head = _deep_head(16, nn.Tanh, gain=3.0)
        if bug == "where-sqrt":
            self.features[5] = _SqrtReLU()
        if bug == "tiny-model":
            self.features = nn.AdaptiveAvgPool2d((2, 1))
            self.head = nn.Sequential(nn.Flatten(), nn.Linear(2, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.hparams.bug == "unused-block":
            f = self.features
            h = f[2](f[1](f[0](x)))  # block 1 only; block 2 (f[3:6]) is never called
            h = f[6](torch.cat([h, h], dim=1))  # 16 -> 32 channels so the head still fits
        else:
            h = self.features(x)  # (B, 32, 4, 4)
        if self.hparams.bug == "detach":
            h = h.detach()
        if self.hparams.bug == "batch-view":
            h = h.reshape(h.shape[1], h.shape[0], -1).transpose(0, 1)  # meant a permute: mixes samples
        logits = self.head(h)
        if self.hparams.bug == "softmax":
            return logits.softmax(dim=-1)
        if self.hparams.bug == "sigmoid":
            return logits.sigmoid()
        return logits

    def _split(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return (batch["image"], batch["label"]) if isinstance(batch, dict) else batch

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = self._split(batch)
        out = self(x)
        loss = F.cross_entropy(out, y)
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        self.log("train_acc", (out.argmax(1) == y).float().mean(), on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        if self.hparams.bug == "train-in-val":
            self.train()
        x, y = self._split(batch)
        out = self(x)
        self.log("val_loss", F.cross_entropy(out, y), prog_bar=True)
        self.log("val_acc", (out.argmax(1) == y).float().mean(), prog_bar=True)

    def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer: Any) -> None:
        if self.hparams.bug != "no-zero-grad":
            super().optimizer_zero_grad(epoch, batch_idx, optimizer)

    def configure_optimizers(self) -> Any:
        if self.hparams.bug == "sgd-too-high":
            return torch.optim.SGD(self.parameters(), lr=20.0, momentum=0.9)
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        if self.hparams.bug == "lr-decay-per-step":
            sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[2, 4, 6], gamma=0.1)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
        return opt


def run_demo(
    bug: str | None = None,
    epochs: int = 8,
    logdir: str | Path = "recipe_runs",
    seed: int = 0,
    quiet_lightning: bool = True,
) -> tuple[L.Trainer, Any]:
    """Train the digits CNN with the full suite and a TensorBoardLogger; return (trainer, report)."""
    from lightning.pytorch.loggers import TensorBoardLogger

    from lightning_recipe import recipe_callbacks
    from lightning_recipe.report import find_report, load_report, log_dir_of

    if bug is not None and bug not in BUGS:
        raise ValueError(f"`bug` must be one of {sorted(BUGS)} or None, got {bug!r}")
    if quiet_lightning:
        _quiet_lightning()
    L.seed_everything(seed, verbose=False)
    lr = {"lr-too-high": 0.5, "lr-too-low": 1e-7, "tiny-model": 0.1}.get(bug or "", 2e-3)
    model = DigitsCNN(lr=lr, bug=bug if bug in MODEL_BUGS else None)
    data = DigitsDataModule(
        batch_size=4 if bug == "tiny-train-set" else 64,
        train_subset=20 if bug == "tiny-train-set" else None,
        normalize=bug != "unnormalized",
        seed=seed,
        corrupt=bug == "nan-sample",
        shuffle_labels=bug == "shuffled-labels",
    )
    logger = TensorBoardLogger(str(logdir), name=bug or "healthy")
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=logger,
        callbacks=recipe_callbacks(monitor="val_loss"),
        log_every_n_steps=5,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(model, data)
    path = find_report(log_dir_of(trainer))
    report = load_report(path)
    report["path"] = str(path)
    return trainer, report


def _quiet_lightning() -> None:
    import logging

    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*number of training batches.*")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
