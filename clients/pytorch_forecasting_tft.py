"""pytorch-forecasting TemporalFusionTransformer (QuantileLoss, a metric object as the loss; dict
batches of a dozen tensors), as in the library's TFT tutorial, on synthetic AR series."""

from __future__ import annotations

import _harness
from _pf_data import datasets


def fit(recipe):
    import lightning.pytorch as pl
    from pytorch_forecasting import TemporalFusionTransformer
    from pytorch_forecasting.metrics import QuantileLoss

    pl.seed_everything(42)
    training, _, train_loader, val_loader = datasets(covariates=True)
    tft = TemporalFusionTransformer.from_dataset(
        training,
        learning_rate=0.03,
        hidden_size=8,
        attention_head_size=1,
        dropout=0.1,
        hidden_continuous_size=8,
        loss=QuantileLoss(),
        optimizer="adam",
        reduce_on_plateau_patience=4,
    )
    trainer = pl.Trainer(
        **_harness.trainer_kwargs(_harness.workdir(), max_epochs=3, gradient_clip_val=0.1),
        callbacks=recipe(monitor="val_loss"),
    )
    trainer.fit(tft, train_dataloaders=train_loader, val_dataloaders=val_loader)


if __name__ == "__main__":
    _harness.run("pytorch-forecasting", "TemporalFusionTransformer", ["pytorch-forecasting"], fit)
