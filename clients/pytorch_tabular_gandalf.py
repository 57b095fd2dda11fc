"""pytorch-tabular: a ``GANDALF`` regressor through ``TabularModel.fit`` (the library builds the
``pytorch_lightning`` Trainer itself) on a pandas DataFrame made in code, configured as the
library's docs do."""

from __future__ import annotations

import _harness
from pytorch_tabular_mlp import fit_model


def fit(recipe):
    from pytorch_tabular.models import GANDALFConfig

    # healthy as configured here; with target_range=[(0.0, 40.0)] its output sigmoid saturates on
    # these targets and nothing trains (loss 442 -> 466, every update 0), which the suite reports
    fit_model(recipe, GANDALFConfig(task="regression", gflu_stages=2, learning_rate=1e-3), "regression")


if __name__ == "__main__":
    _harness.run("pytorch-tabular", "GANDALF regressor", ["pytorch_tabular"], fit)
