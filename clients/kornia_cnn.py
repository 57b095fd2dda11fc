"""kornia: GPU-style batch augmentations (``kornia.augmentation`` in ``on_after_batch_transfer``,
as kornia's Lightning tutorial does) in front of a small CNN classifier, on synthetic images of
bars (vision without torchvision)."""

from __future__ import annotations

import _harness


def fit(recipe):
    import kornia.augmentation as K
    import lightning.pytorch as pl
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, TensorDataset

    pl.seed_everything(0)
    g = torch.Generator().manual_seed(0)
    n, size = 320, 24
    y = torch.randint(0, 2, (n,), generator=g)
    img = 0.2 * torch.rand(n, 3, size, size, generator=g)
    off = torch.randint(4, size - 4, (n,), generator=g)
    for i in range(n):  # class 0: a horizontal bar, class 1: a vertical bar
        if y[i]:
            img[i, :, :, off[i] - 2 : off[i] + 2] += 0.8
        else:
            img[i, :, off[i] - 2 : off[i] + 2, :] += 0.8
    mean, std = img.mean((0, 2, 3)), img.std((0, 2, 3))

    class Net(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.augment = torch.nn.Sequential(
                K.RandomHorizontalFlip(p=0.5), K.ColorJitter(0.1, 0.1, 0.1, p=0.5)
            )
            self.normalize = K.Normalize(mean=mean, std=std)
            self.features = torch.nn.Sequential(
                torch.nn.Conv2d(3, 16, 3, padding=1),
                torch.nn.ReLU(),
                torch.nn.MaxPool2d(2),
                torch.nn.Conv2d(16, 32, 3, padding=1),
                torch.nn.ReLU(),
                torch.nn.AdaptiveAvgPool2d(1),
            )
            self.head = torch.nn.Linear(32, 2)

        def forward(self, x):
            return self.head(self.features(x).flatten(1))

        def on_after_batch_transfer(self, batch, dataloader_idx):
            x, y = batch
            if self.trainer.training:
                x = self.augment(x)
            return self.normalize(x), y

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = F.cross_entropy(self(x), y)
            self.log("train_loss", loss)
            return loss

        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.log("val_loss", F.cross_entropy(self(x), y))

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    ds = TensorDataset(img, y)
    trainer = pl.Trainer(
        **_harness.trainer_kwargs(_harness.workdir(), max_epochs=3), callbacks=recipe(monitor="val_loss")
    )
    train, val = torch.utils.data.random_split(ds, [256, 64], generator=g)
    trainer.fit(Net(), DataLoader(train, batch_size=32, shuffle=True), DataLoader(val, batch_size=32))


if __name__ == "__main__":
    _harness.run("kornia", "augmentations + CNN classifier", ["kornia"], fit)
