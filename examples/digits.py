"""The recipe suite in plain user code: an MLP on scikit-learn's digits.

Run:  python examples/digits.py           (healthy; the report should hold no warning)
      python examples/digits.py --raw     (pixels left in 0..16: input-not-normalized fires)
Then: tensorboard --logdir recipe_runs
"""

from __future__ import annotations

import argparse

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_recipe as lr


class DigitsMLP(L.LightningModule):
    def __init__(self, lr: float = 1e-3) -> None:
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Dropout(0.1), nn.Linear(128, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def digits_loaders(raw: bool) -> tuple[DataLoader, DataLoader]:
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32)
    y = torch.tensor(digits.target)
    if not raw:
        x = (x - x.mean()) / x.std()
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(y), generator=g)
    train, val = order[360:], order[:360]
    return (
        DataLoader(TensorDataset(x[train], y[train]), batch_size=64, shuffle=True),
        DataLoader(TensorDataset(x[val], y[val]), batch_size=256),
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--raw", action="store_true", help="leave the pixels in 0..16")
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args()
    L.seed_everything(0)
    train, val = digits_loaders(args.raw)
    trainer = L.Trainer(
        max_epochs=args.epochs,
        # the MLP reads flattened 8x8 images: say so, and its first layer is shown as filters
        callbacks=lr.recipe_callbacks(monitor="val_loss", first_layer_filters={"image_shape": (1, 8, 8)}),
        logger=TensorBoardLogger("recipe_runs", name="example_mlp"),
        log_every_n_steps=5,
        enable_checkpointing=False,
    )
    trainer.fit(DigitsMLP(), train, val)
    for f in lr.findings(trainer):
        print(f"{f.severity.value:8s} {f.code}: {f.message}")


if __name__ == "__main__":
    main()
