"""MONAI: a 2-D ``monai.networks.nets.UNet`` segmenting synthetic blobs with ``DiceCELoss`` (a
dense per-pixel target; MONAI's own loss module), dict batches ``{"image", "label"}`` as MONAI's
dictionary transforms produce, in a LightningModule as MONAI's Lightning tutorial writes it."""

from __future__ import annotations

import _harness


def fit(recipe):
    import lightning.pytorch as pl
    import torch
    from monai.losses import DiceCELoss
    from monai.networks.nets import UNet
    from torch.utils.data import DataLoader

    pl.seed_everything(0)
    g = torch.Generator().manual_seed(0)
    n, size = 160, 32
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    cy = torch.randint(8, size - 8, (n, 1, 1), generator=g)
    cx = torch.randint(8, size - 8, (n, 1, 1), generator=g)
    r = torch.randint(4, 8, (n, 1, 1), generator=g)
    label = (((yy - cy) ** 2 + (xx - cx) ** 2) < r**2).float()[:, None]
    image = label * 0.8 + 0.3 * torch.randn(n, 1, size, size, generator=g)
    items = [{"image": image[i], "label": label[i]} for i in range(n)]

    class Seg(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self._model = UNet(
                spatial_dims=2,
                in_channels=1,
                out_channels=2,
                channels=(8, 16, 32),
                strides=(2, 2),
                num_res_units=1,
            )
            self.loss_function = DiceCELoss(to_onehot_y=True, softmax=True)

        def forward(self, x):
            return self._model(x)

        def training_step(self, batch, batch_idx):
            images, labels = batch["image"], batch["label"]
            loss = self.loss_function(self.forward(images), labels)
            self.log("train_loss", loss)
            return loss

        def validation_step(self, batch, batch_idx):
            images, labels = batch["image"], batch["label"]
            self.log("val_loss", self.loss_function(self.forward(images), labels))

        def configure_optimizers(self):
            return torch.optim.Adam(self._model.parameters(), 1e-3)

    trainer = pl.Trainer(
        **_harness.trainer_kwargs(_harness.workdir(), max_epochs=3), callbacks=recipe(monitor="val_loss")
    )
    trainer.fit(
        Seg(), DataLoader(items[:128], batch_size=16, shuffle=True), DataLoader(items[128:], batch_size=16)
    )


if __name__ == "__main__":
    _harness.run("monai", "UNet 2-D segmentation, DiceCELoss", ["monai"], fit)
