"""pytorch-metric-learning: an embedding MLP trained with ``losses.ArcFaceLoss`` (a loss with its
own trainable class-centre matrix, optimised with the model as the library's docs say), in a
LightningModule, on Gaussian clusters made in code."""

from __future__ import annotations

import _harness
from metric_learning_triplet import CLASSES, fit_with


def fit(recipe):
    from pytorch_metric_learning import losses

    fit_with(
        recipe, lambda: losses.ArcFaceLoss(num_classes=CLASSES, embedding_size=32, margin=28.6, scale=64)
    )


if __name__ == "__main__":
    _harness.run(
        "pytorch-metric-learning",
        "ArcFaceLoss (trainable class centres)",
        ["pytorch-metric-learning"],
        fit,
    )
