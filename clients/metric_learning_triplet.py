"""pytorch-metric-learning: an embedding MLP trained with ``losses.TripletMarginLoss`` and a
``miners.MultiSimilarityMiner`` (a custom loss module; no class scores), in a LightningModule as
the library's docs combine them, on Gaussian clusters made in code."""

from __future__ import annotations

import _harness

CLASSES, DIM = 8, 16


def fit_with(recipe, make_loss, make_miner=None):
    """An embedding MLP trained with ``make_loss()`` (and, if given, the pairs ``make_miner()``
    mines) in a LightningModule as the library's docs combine them, on Gaussian clusters."""
    import lightning.pytorch as pl
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    pl.seed_everything(0)
    g = torch.Generator().manual_seed(0)
    centers = 3 * torch.randn(CLASSES, DIM, generator=g)
    y = torch.arange(CLASSES).repeat_interleave(48)
    x = centers[y] + torch.randn(len(y), DIM, generator=g)
    x = (x - x.mean(0)) / x.std(0)  # standardised features, as a user would feed them
    perm = torch.randperm(len(y), generator=g)
    x, y = x[perm], y[perm]
    train = TensorDataset(x[:320], y[:320])
    val = TensorDataset(x[320:], y[320:])

    class Embedder(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(DIM, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32))
            self.loss_func = make_loss()  # a submodule: a loss with parameters trains with the model
            self.miner = make_miner() if make_miner is not None else None

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            data, labels = batch
            embeddings = self(data)
            if self.miner is not None:
                loss = self.loss_func(embeddings, labels, self.miner(embeddings, labels))
            else:
                loss = self.loss_func(embeddings, labels)
            self.log("train_loss", loss)
            return loss

        def validation_step(self, batch, batch_idx):
            data, labels = batch
            self.log("val_loss", self.loss_func(self(data), labels))

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    trainer = pl.Trainer(
        **_harness.trainer_kwargs(_harness.workdir(), max_epochs=3), callbacks=recipe(monitor="val_loss")
    )
    trainer.fit(Embedder(), DataLoader(train, batch_size=32, shuffle=True), DataLoader(val, batch_size=32))


def fit(recipe):
    from pytorch_metric_learning import distances, losses, miners, reducers

    fit_with(
        recipe,
        lambda: losses.TripletMarginLoss(
            margin=0.2, distance=distances.CosineSimilarity(), reducer=reducers.ThresholdReducer(low=0)
        ),
        lambda: miners.MultiSimilarityMiner(epsilon=0.2),
    )


if __name__ == "__main__":
    _harness.run(
        "pytorch-metric-learning",
        "TripletMarginLoss + MultiSimilarityMiner",
        ["pytorch-metric-learning"],
        fit,
    )
