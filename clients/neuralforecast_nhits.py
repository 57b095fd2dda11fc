"""neuralforecast: an ``NHITS`` model through ``NeuralForecast.fit`` (built on the standalone
``pytorch_lightning`` namespace; the library builds the Trainer from the model's keyword
arguments and its windows batches are dicts), on synthetic series in the library's long
format (``unique_id``, ``ds``, ``y``), as its quick-start does."""

from __future__ import annotations

import _harness


def frame():
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(0)
    rows = []
    for uid in range(8):
        t = np.arange(120)
        y = 10 + uid + 3 * np.sin(2 * np.pi * t / 12 + uid) + 0.05 * t + rng.normal(0, 0.3, len(t))
        rows.append(pd.DataFrame({"unique_id": f"s{uid}", "ds": t, "y": y}))
    return pd.concat(rows, ignore_index=True)


def fit_model(recipe, model_cls, **model_kwargs):
    """Train ``model_cls(**model_kwargs)`` through ``NeuralForecast.fit`` on :func:`frame` with the
    suite, the Trainer arguments passed as the model's keyword arguments (the library's way)."""
    from neuralforecast import NeuralForecast

    model = model_cls(
        h=12,
        input_size=24,
        max_steps=30,
        val_check_steps=10,
        batch_size=8,
        random_seed=0,
        scaler_type="standard",
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=_harness.workdir(),
        log_every_n_steps=1,
        callbacks=recipe(monitor="valid_loss"),
        **model_kwargs,
    )
    nf = NeuralForecast(models=[model], freq=1)
    nf.fit(df=frame(), val_size=24)
    # NeuralForecast.fit trains deep copies of the models (and so of their callbacks): the
    # findings are on the copies
    return nf.models[0].trainer_kwargs["callbacks"]


def fit(recipe):
    from neuralforecast.models import NHITS

    return fit_model(recipe, NHITS, windows_batch_size=64, mlp_units=[[32, 32]] * 3)


if __name__ == "__main__":
    _harness.run("neuralforecast", "NHITS (pytorch_lightning namespace)", ["neuralforecast"], fit)
