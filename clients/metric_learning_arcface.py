"""pytorch-metric-learning: an embedding MLP trained with ``losses.ArcFaceLoss`` (a loss with its
own trainable class-centre matrix, optimised with the model as the library's docs say), in a
LightningModule, on Gaussian clusters made in code."""

from __future__ import annotations

import _harness


def fit(recipe):
    import lightning.pytorch as pl
    import torch
    from pytorch_metric_learning import losses
    from torch.utils.data import DataLoader, TensorDataset

    pl.seed_everything(0)
    g = torch.Generator().manual_seed(0)
    classes, per, dim = 8, 48, 16
    centers = 3 * torch.randn(classes, dim, generator=g)
    y = torch.arange(classes).repeat_interleave(per)
    x = centers[y] + torch.randn(len(y), dim, generator=g)
    x = (x - x.mean(0)) / x.std(0)  # standardised features, as a user would feed them
    perm = torch.randperm(len(y), generator=g)
    x, y = x[perm], y[perm]
    train = TensorDataset(x[:320], y[:320])
    val = TensorDataset(x[320:], y[320:])

    class Embedder(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(dim, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32))
            self.loss_func = losses.ArcFaceLoss(num_classes=classes, embedding_size=32, margin=28.6, scale=64)

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            data, labels = batch
            embeddings = self(data)
            loss = self.loss_func(embeddings, labels)
            self.log("train_loss", loss)
            return loss

        def validation_step(self, batch, batch_idx):
            data, labels = batch
            self.log("val_loss", self.loss_func(self(data), labels))

        def configure_optimizers(self):
            # the loss module is a submodule: its class centres are among self.parameters()
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    trainer = pl.Trainer(
        **_harness.trainer_kwargs(_harness.workdir(), max_epochs=3), callbacks=recipe(monitor="val_loss")
    )
    trainer.fit(Embedder(), DataLoader(train, batch_size=32, shuffle=True), DataLoader(val, batch_size=32))


if __name__ == "__main__":
    _harness.run(
        "pytorch-metric-learning",
        "ArcFaceLoss (trainable class centres)",
        ["pytorch-metric-learning"],
        fit,
    )
