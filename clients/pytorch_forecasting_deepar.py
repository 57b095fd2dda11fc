"""pytorch-forecasting DeepAR (a distribution loss: negative log-likelihood of a predicted
normal), as in the library's DeepAR tutorial, on synthetic AR series."""

from __future__ import annotations

import _harness
from _pf_data import datasets


def fit(recipe):
    import lightning.pytorch as pl
    from pytorch_forecasting import DeepAR
    from pytorch_forecasting.data import GroupNormalizer
    from pytorch_forecasting.metrics import NormalDistributionLoss

    pl.seed_everything(42)
    training, _, train_loader, val_loader = datasets(
        target_normalizer=GroupNormalizer(groups=["series"]),
        static_categoricals=["series"],
        time_varying_known_reals=["time_idx"],
    )
    net = DeepAR.from_dataset(
        training, learning_rate=1e-2, hidden_size=16, rnn_layers=2, loss=NormalDistributionLoss()
    )
    trainer = pl.Trainer(
        **_harness.trainer_kwargs(_harness.workdir(), max_epochs=3, gradient_clip_val=0.1),
        callbacks=recipe(monitor="val_loss"),
    )
    trainer.fit(net, train_dataloaders=train_loader, val_dataloaders=val_loader)


if __name__ == "__main__":
    _harness.run("pytorch-forecasting", "DeepAR", ["pytorch-forecasting"], fit)
