"""pytorch-forecasting N-BEATS (MASE metric object as the loss, backcast loss mixed in), as in
the library's N-BEATS tutorial, on synthetic AR series."""

from __future__ import annotations

import _harness
from _pf_data import datasets


def fit(recipe):
    import lightning.pytorch as pl
    from pytorch_forecasting import NBeats

    pl.seed_everything(42)
    training, _, train_loader, val_loader = datasets()
    net = NBeats.from_dataset(
        training, learning_rate=3e-2, weight_decay=1e-2, widths=[16, 64], backcast_loss_ratio=0.1
    )
    trainer = pl.Trainer(
        **_harness.trainer_kwargs(_harness.workdir(), max_epochs=3, gradient_clip_val=0.01),
        callbacks=recipe(monitor="val_loss"),
    )
    trainer.fit(net, train_dataloaders=train_loader, val_dataloaders=val_loader)


if __name__ == "__main__":
    _harness.run("pytorch-forecasting", "NBeats", ["pytorch-forecasting"], fit)
