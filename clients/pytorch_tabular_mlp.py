"""pytorch-tabular: a ``CategoryEmbeddingModel`` classifier through ``TabularModel.fit`` (the
library builds the ``pytorch_lightning`` Trainer itself; callbacks are passed to ``fit``), on a
pandas DataFrame made in code, configured as the library's quick-start does."""

from __future__ import annotations

import _harness


def frame(task: str = "classification"):
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(0)
    n = 480
    df = pd.DataFrame(
        {
            "age": rng.normal(40, 12, n),
            "income": rng.lognormal(10, 0.5, n),
            "score": rng.normal(0, 1, n),
            "city": rng.choice(["a", "b", "c", "d"], n),
            "plan": rng.choice(["basic", "pro"], n),
        }
    )
    logit = 0.08 * (df.age - 40) + 1.5 * df.score + (df.city == "a") * 1.0 - (df.plan == "pro") * 0.8
    noise = rng.normal(0, 0.5, n)
    df["target"] = (logit + noise > 0).astype(int) if task == "classification" else 3.0 * logit + 20.0 + noise
    return df


def fit_model(recipe, model_config, task: str):
    """Train ``model_config`` through ``TabularModel.fit`` on :func:`frame` with the suite, as the
    library's quick-start configures data, trainer and optimizer."""
    from pytorch_tabular import TabularModel
    from pytorch_tabular.config import DataConfig, OptimizerConfig, TrainerConfig

    df = frame(task)
    train, val = df.iloc[:384], df.iloc[384:]
    data_config = DataConfig(
        target=["target"], continuous_cols=["age", "income", "score"], categorical_cols=["city", "plan"]
    )
    trainer_config = TrainerConfig(
        batch_size=64,
        max_epochs=3,
        accelerator="cpu",
        early_stopping=None,
        checkpoints=None,
        load_best=False,
        progress_bar="none",
        seed=0,
        trainer_kwargs={"enable_model_summary": False, "log_every_n_steps": 1},
    )
    tabular_model = TabularModel(
        data_config=data_config,
        model_config=model_config,
        optimizer_config=OptimizerConfig(),
        trainer_config=trainer_config,
        verbose=False,
    )
    tabular_model.fit(train=train, validation=val, callbacks=recipe(monitor="valid_loss"))


def fit(recipe):
    from pytorch_tabular.models import CategoryEmbeddingModelConfig

    config = CategoryEmbeddingModelConfig(task="classification", layers="32-16", learning_rate=1e-3)
    fit_model(recipe, config, "classification")


if __name__ == "__main__":
    _harness.run("pytorch-tabular", "CategoryEmbeddingModel classifier", ["pytorch_tabular"], fit)
