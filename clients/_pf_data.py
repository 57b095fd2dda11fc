"""Synthetic series for the pytorch-forecasting models, built as the library's tutorials build
them (``generate_ar_data`` makes the data in code; nothing is downloaded)."""

from __future__ import annotations

from typing import Any


def datasets(covariates: bool = False, **kw: Any) -> tuple[Any, Any, Any, Any]:
    """(training, validation, train loader, val loader) for AR series, tutorial-style."""
    from pytorch_forecasting import TimeSeriesDataSet
    from pytorch_forecasting.data.examples import generate_ar_data

    data = generate_ar_data(seasonality=10.0, timesteps=80, n_series=12, seed=42)
    data["static"] = 2
    data["series"] = data["series"].astype(str).astype("category")
    data["date"] = data["time_idx"]
    max_encoder_length, max_prediction_length = 30, 6
    cutoff = data["time_idx"].max() - max_prediction_length
    extra: dict[str, Any] = {}
    if covariates:
        extra = {
            "static_categoricals": ["series"],
            "time_varying_known_reals": ["time_idx"],
            "add_relative_time_idx": True,
            "add_target_scales": True,
        }
    extra.update(kw)
    training = TimeSeriesDataSet(
        data[lambda x: x.time_idx <= cutoff],
        time_idx="time_idx",
        target="value",
        group_ids=["series"],
        time_varying_unknown_reals=["value"],
        max_encoder_length=max_encoder_length,
        max_prediction_length=max_prediction_length,
        **extra,
    )
    validation = TimeSeriesDataSet.from_dataset(training, data, min_prediction_idx=cutoff + 1)
    train_loader = training.to_dataloader(train=True, batch_size=32, num_workers=0)
    val_loader = validation.to_dataloader(train=False, batch_size=32, num_workers=0)
    return training, validation, train_loader, val_loader
