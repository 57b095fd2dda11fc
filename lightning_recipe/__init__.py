"""lightning_recipe: drop-in PyTorch Lightning callbacks that measure Karpathy's *Recipe for
Training Neural Networks* and cs231n's *Learning and Evaluation* habits, log them to
TensorBoard and say in plain words when training is silently broken.

Example::

    import lightning as L
    import lightning_recipe as lr

    trainer = L.Trainer(callbacks=lr.recipe_callbacks())
    trainer.fit(model, datamodule)
    for f in lr.findings(trainer):
        print(f.severity, f.code, f.message)
"""

from __future__ import annotations

from typing import Any

from lightning_recipe._version import __version__
from lightning_recipe.batch import BatchAdapter, BatchLayoutError
from lightning_recipe.callback import RecipeCallback
from lightning_recipe.checks.batch_independence import BatchIndependenceCheck
from lightning_recipe.checks.class_prior import ClassPriorCheck
from lightning_recipe.checks.data_inspection import DataInspectionCheck
from lightning_recipe.checks.future_leak import FutureLeakCheck
from lightning_recipe.checks.gradient_check import GradientCheck
from lightning_recipe.checks.loss_at_init import LossAtInitCheck
from lightning_recipe.checks.model_lint import ModelLintCheck
from lightning_recipe.checks.overfit_batch import OverfitBatchCheck
from lightning_recipe.checks.padding import PaddingCheck
from lightning_recipe.checks.regularization import RegularizationCheck
from lightning_recipe.checks.target_in_input import TargetInInputCheck
from lightning_recipe.checks.train_val_overlap import TrainValOverlapCheck
from lightning_recipe.control.early_stopping import RecipeEarlyStopping
from lightning_recipe.control.ensemble import CheckpointEnsemble
from lightning_recipe.findings import CATALOG, Finding, RecipeError, RecipeWarning, Severity
from lightning_recipe.monitors.activations import ActivationMonitor
from lightning_recipe.monitors.baselines import BaselineMonitor
from lightning_recipe.monitors.first_layer_filters import FirstLayerFilterMonitor
from lightning_recipe.monitors.gradients import GradientMonitor
from lightning_recipe.monitors.input_independent import InputIndependentBaseline
from lightning_recipe.monitors.label_noise import LabelNoiseMonitor
from lightning_recipe.monitors.loss_curve import LossCurveMonitor
from lightning_recipe.monitors.prediction_dynamics import PredictionDynamicsMonitor
from lightning_recipe.monitors.train_val_gap import TrainValGapMonitor
from lightning_recipe.monitors.update_ratio import UpdateRatioMonitor
from lightning_recipe.preflight import preflight
from lightning_recipe.report import gather_findings
from lightning_recipe.suite import recipe_callbacks


def findings(trainer: Any) -> list[Finding]:
    """Every finding of every recipe callback on ``trainer``, in step order."""
    return gather_findings(trainer)


__all__ = [
    "CATALOG",
    "ActivationMonitor",
    "BaselineMonitor",
    "BatchAdapter",
    "BatchIndependenceCheck",
    "BatchLayoutError",
    "CheckpointEnsemble",
    "ClassPriorCheck",
    "DataInspectionCheck",
    "Finding",
    "FirstLayerFilterMonitor",
    "FutureLeakCheck",
    "GradientCheck",
    "GradientMonitor",
    "InputIndependentBaseline",
    "LabelNoiseMonitor",
    "LossAtInitCheck",
    "LossCurveMonitor",
    "ModelLintCheck",
    "OverfitBatchCheck",
    "PaddingCheck",
    "PredictionDynamicsMonitor",
    "RecipeCallback",
    "RecipeEarlyStopping",
    "RecipeError",
    "RecipeWarning",
    "RegularizationCheck",
    "Severity",
    "TargetInInputCheck",
    "TrainValGapMonitor",
    "TrainValOverlapCheck",
    "UpdateRatioMonitor",
    "__version__",
    "findings",
    "preflight",
    "recipe_callbacks",
]
