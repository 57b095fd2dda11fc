"""``recipe_callbacks()``: the whole suite with sane defaults, one line to add to a Trainer."""

from __future__ import annotations

import inspect
import warnings
from typing import Any

from lightning.pytorch.callbacks import Callback

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

#: (override name, class) for every callback of the suite, in the order they run
SUITE: list[tuple[str, type]] = [
    # one-shot checks on the first batch
    ("data_inspection", DataInspectionCheck),
    ("loss_at_init", LossAtInitCheck),
    ("batch_independence", BatchIndependenceCheck),
    ("future_leak", FutureLeakCheck),
    ("padding", PaddingCheck),
    ("gradient_check", GradientCheck),
    ("overfit_batch", OverfitBatchCheck),
    ("model_lint", ModelLintCheck),
    ("regularization", RegularizationCheck),
    # data checks riding along the first epoch
    ("class_prior", ClassPriorCheck),
    ("target_in_input", TargetInInputCheck),
    ("train_val_overlap", TrainValOverlapCheck),
    # control (opt-in): before the monitors, so that when early stopping ends the fit the
    # monitors' end-of-training hooks still see the last batch's gradients
    ("checkpoint_ensemble", CheckpointEnsemble),
    ("early_stopping", RecipeEarlyStopping),
    # monitors
    ("update_ratio", UpdateRatioMonitor),
    ("activations", ActivationMonitor),
    ("gradients", GradientMonitor),
    ("first_layer_filters", FirstLayerFilterMonitor),
    ("loss_curve", LossCurveMonitor),
    ("train_val_gap", TrainValGapMonitor),
    ("input_independent", InputIndependentBaseline),
    ("prediction_dynamics", PredictionDynamicsMonitor),
    ("label_noise", LabelNoiseMonitor),
    ("baselines", BaselineMonitor),
]

#: callbacks that change the course of training or evaluate extra models: in the suite only when
#: the user names the metric to monitor (``monitor=...``) or passes their arguments explicitly
CONTROL = ("checkpoint_ensemble", "early_stopping")

#: arguments handed to every callback of the suite that accepts them
SHARED_ARGS = ("get_input", "get_target", "step_fn", "on_error")

_HINTED = False


def recipe_callbacks(
    *,
    monitor: str | None = None,
    mode: str = "min",
    get_input: Any = None,
    get_target: Any = None,
    step_fn: Any = None,
    on_error: str = "warn",
    print_report: bool = True,
    verbose: bool | None = None,
    **overrides: Any,
) -> list[Callback]:
    """The full ``lightning_recipe`` suite, ready for ``Trainer(callbacks=...)``.

    Args:
        monitor: the validation metric you log (e.g. ``"val_loss"``). Naming it adds
            :class:`RecipeEarlyStopping` on that metric (restoring the best weights at the end)
            and :class:`CheckpointEnsemble` (snapshot ensemble and averaged weights, evaluated
            every validation run). Without it they are left out, with one info line saying so.
        mode: ``"min"`` or ``"max"`` for ``monitor``.
        get_input: ``callable(batch) -> Tensor``, for batch layouts the suite cannot guess.
        get_target: ``callable(batch) -> Tensor | None``, likewise.
        step_fn: ``callable(model, batch) -> loss`` instead of ``training_step`` in the checks.
        on_error: ``"warn"`` or ``"raise"`` (stop the fit on an error finding).
        print_report: print the report at the end of fit (the JSON report and the TensorBoard
            text are written either way).
        verbose: deprecated name of ``print_report`` (it never touches early stopping's own
            ``verbose``; pass ``early_stopping={"verbose": True}`` for that).
        **overrides: per callback, by its snake-case name (see :data:`SUITE`): a dict of
            arguments, ``False`` to leave it out, or a ready callback instance to use instead.

    Example::

        trainer = L.Trainer(callbacks=recipe_callbacks(monitor="val_loss",
                                                       loss_at_init={"tolerance": 0.5},
                                                       data_inspection=False))
    """
    if verbose is not None:
        warnings.warn(
            "recipe_callbacks(verbose=...) is deprecated: it is called print_report now (early "
            "stopping's own verbose is set with early_stopping={'verbose': ...}).",
            DeprecationWarning,
            stacklevel=2,
        )
        print_report = bool(verbose)
    if not isinstance(print_report, bool):
        raise TypeError(f"`print_report` must be True or False, got {print_report!r}")
    known = {name for name, _ in SUITE}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(
            f"recipe_callbacks() got unknown callback name(s) {unknown}; allowed: {sorted(known)}"
        )
    if monitor is not None and (not isinstance(monitor, str) or not monitor):
        raise ValueError(f"`monitor` must be the name of a logged metric (a string), got {monitor!r}")
    if mode not in ("min", "max"):
        raise ValueError(f"`mode` must be 'min' or 'max', got {mode!r}")
    shared = {"get_input": get_input, "get_target": get_target, "step_fn": step_fn, "on_error": on_error}
    out: list[Callback] = []
    for name, cls in SUITE:
        default: Any = {} if name not in CONTROL or monitor is not None else False
        choice = overrides.get(name, default)
        if choice is False or choice is None:
            continue
        if isinstance(choice, Callback):
            out.append(choice)
            continue
        if not isinstance(choice, dict):
            raise TypeError(
                f"recipe_callbacks({name}=...) must be a dict of arguments, False, or a Callback; "
                f"got {type(choice).__name__}"
            )
        params = inspect.signature(cls.__init__).parameters
        kwargs = {k: v for k, v in shared.items() if k in params and v is not None}
        if name == "early_stopping":
            kwargs.update({"monitor": monitor, "mode": mode})
        kwargs.update(choice)
        if name == "early_stopping" and not kwargs.get("monitor"):
            raise ValueError("recipe_callbacks(early_stopping={...}) needs a 'monitor' (or pass monitor=...)")
        out.append(cls(**kwargs))
    for cb in out:
        if hasattr(cb, "_recipe_findings"):
            cb.print_report = print_report
    if monitor is None and not any(name in overrides for name in CONTROL):
        _hint_control()
    return out


def _hint_control() -> None:
    global _HINTED
    if _HINTED:
        return
    _HINTED = True
    from lightning.pytorch.utilities.rank_zero import rank_zero_info

    rank_zero_info(
        "lightning_recipe: early stopping with best-weight restore and checkpoint ensembles are off; "
        "pass recipe_callbacks(monitor='val_loss') (your validation metric) to turn them on."
    )
