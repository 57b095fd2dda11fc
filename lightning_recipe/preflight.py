"""``preflight(model, data)``: the one-shot checks without a fit, for the verdict before a long job.

A cluster user wants to know that a run is worth queueing before it takes 64 GPUs for a day.
``preflight`` takes the first training batch, runs the suite's one-shot checks on it through the
very same code the callbacks use (``check``/``static_check`` with ``trainer=None``), prints the
findings table and returns the findings. The model is left untouched: every check works on a
copy, and the RNG state is restored.

    lightning-recipe preflight my_project.models:LitModel --data my_project.data:LitData
"""

from __future__ import annotations

import importlib
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

from torch import nn

from lightning_recipe._probe import preserved_rng
from lightning_recipe.batch import Getter, map_tensors
from lightning_recipe.checks.base import FirstBatchCheck
from lightning_recipe.checks.batch_independence import BatchIndependenceCheck
from lightning_recipe.checks.data_inspection import DataInspectionCheck
from lightning_recipe.checks.future_leak import FutureLeakCheck
from lightning_recipe.checks.gradient_check import GradientCheck
from lightning_recipe.checks.loss_at_init import LossAtInitCheck
from lightning_recipe.checks.model_lint import ModelLintCheck
from lightning_recipe.checks.overfit_batch import OverfitBatchCheck
from lightning_recipe.checks.padding import PaddingCheck
from lightning_recipe.findings import Finding, Severity

#: the checks preflight runs, in order
PREFLIGHT_CHECKS: tuple[type, ...] = (
    DataInspectionCheck,
    LossAtInitCheck,
    BatchIndependenceCheck,
    FutureLeakCheck,
    PaddingCheck,
    GradientCheck,
    OverfitBatchCheck,
    ModelLintCheck,
)


def first_batch(model: nn.Module, data: Any = None) -> Any:
    """The first training batch, from a LightningDataModule, a DataLoader / iterable, a
    ``(train_loader, val_loader)`` pair, or the model's own ``train_dataloader()``; moved to the
    model's device through the module's batch-transfer hooks when it has them."""
    with preserved_rng():
        loader = _train_loader(model, data)
        try:
            batch = next(iter(loader))
        except StopIteration as exc:
            raise ValueError("`data` yielded no batch: the training data is empty") from exc
    return _to_model_device(model, batch)


def _train_loader(model: nn.Module, data: Any) -> Any:
    if data is None:
        if not _defines(model, "train_dataloader"):
            raise ValueError(
                "`data` is required: pass a LightningDataModule, a DataLoader or (train, val) loaders "
                "(the model defines no train_dataloader())"
            )
        return model.train_dataloader()
    if hasattr(data, "train_dataloader") and callable(data.train_dataloader):
        for hook in ("prepare_data",):
            if callable(getattr(data, hook, None)):
                getattr(data, hook)()
        if callable(getattr(data, "setup", None)):
            data.setup("fit")
        return data.train_dataloader()
    if (
        isinstance(data, (tuple, list))
        and data
        and hasattr(data[0], "__iter__")
        and not hasattr(data[0], "shape")
    ):
        return data[0]
    if hasattr(data, "__iter__"):
        return data
    raise TypeError(
        f"`data` must be a LightningDataModule, a DataLoader/iterable of batches or a (train, val) "
        f"pair, got {type(data).__name__}"
    )


def _defines(obj: Any, method: str) -> bool:
    """True when ``obj`` has ``method`` and, for a LightningModule, overrides the stub."""
    if not callable(getattr(obj, method, None)):
        return False
    try:
        from lightning.pytorch.utilities.model_helpers import is_overridden

        return is_overridden(method, obj)
    except (ValueError, TypeError, ImportError):
        return True


def _to_model_device(model: nn.Module, batch: Any) -> Any:
    try:
        device = next(model.parameters()).device
    except StopIteration:
        return batch
    for name in ("on_before_batch_transfer",):
        hook = getattr(model, name, None)
        if callable(hook):
            try:
                batch = hook(batch, 0)
            except Exception:
                pass
    batch = map_tensors(batch, lambda t: t.to(device))
    hook = getattr(model, "on_after_batch_transfer", None)
    if callable(hook):
        try:
            batch = hook(batch, 0)
        except Exception:
            pass
    return batch


def preflight(
    model: nn.Module,
    data: Any = None,
    *,
    get_input: Getter | None = None,
    get_target: Getter | None = None,
    step_fn: Any = None,
    checks: Sequence[type] | None = None,
    verbose: bool = True,
) -> list[Finding]:
    """Run the suite's one-shot checks on the first training batch, without a fit.

    Args:
        model: the LightningModule (or any module with a ``training_step``, or pass ``step_fn``).
        data: a LightningDataModule, a DataLoader, a ``(train, val)`` pair, or ``None`` to use
            ``model.train_dataloader()``.
        get_input, get_target, step_fn: as for the callbacks.
        checks: which check classes to run (default: :data:`PREFLIGHT_CHECKS`).
        verbose: print the findings table and the cost of each check.

    Returns:
        The findings of every check, most severe first. The model's weights, gradients, modes
        and the RNG state are as before.

    Example::

        found = lightning_recipe.preflight(LitModel(), LitDataModule())
        assert not [f for f in found if f.severity == "error"]
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module / LightningModule, got {type(model).__name__}")
    chosen = tuple(checks) if checks is not None else PREFLIGHT_CHECKS
    for cls in chosen:
        if not (isinstance(cls, type) and cls in PREFLIGHT_CHECKS):
            raise ValueError(
                f"`checks` must hold classes from {[c.__name__ for c in PREFLIGHT_CHECKS]}, got {cls!r}"
            )
    batch = first_batch(model, data)
    shared = {"get_input": get_input, "get_target": get_target, "step_fn": step_fn}
    found: list[Finding] = []
    costs: dict[str, float] = {}
    with preserved_rng():
        for cls in chosen:
            check = _make(cls, shared)
            start = time.perf_counter()
            _run(check, model, batch)
            costs[cls.__name__] = time.perf_counter() - start
            found.extend(check.findings)
    found.sort(key=lambda f: (-f.severity.rank, f.source))
    if verbose:
        from lightning_recipe.report import format_table

        print(format_table(found))
        print("preflight cost: " + ", ".join(f"{k} {v:.2f}s" for k, v in costs.items()))
    return found


def _make(cls: type, shared: dict[str, Any]) -> Any:
    import inspect

    params = inspect.signature(cls.__init__).parameters
    return cls(**{k: v for k, v in shared.items() if v is not None and k in params})


def _run(check: Any, model: nn.Module, batch: Any) -> None:
    """Each check through its own code path; an internal failure becomes an info finding."""
    if isinstance(check, ModelLintCheck):
        check.run_safely(None, "preflight", check.static_check, None, model, batch)
    elif isinstance(check, FirstBatchCheck):
        check.run_safely(None, "preflight", check.run_check, None, model, batch)


# ---------------------------------------------------------------------------- command line
def load_object(spec: str, kwargs: dict[str, Any] | None = None) -> Any:
    """Import ``package.module:Name`` and call it with ``kwargs`` (a class or a factory)."""
    if ":" not in spec:
        raise ValueError(f"expected 'package.module:Name', got {spec!r}")
    mod_name, _, attr = spec.partition(":")
    sys.path.insert(0, ".")
    try:
        obj = getattr(importlib.import_module(mod_name), attr)
    finally:
        sys.path.pop(0)
    return obj(**(kwargs or {}))


def main_preflight(args: Any) -> int:
    """``lightning-recipe preflight MODEL [--data DATA]``: exit 1 on error findings (or on
    warnings with ``--fail-on warning``)."""
    model = load_object(args.model, json.loads(args.model_args))
    data = load_object(args.data, json.loads(args.data_args)) if args.data else None
    found = preflight(model, data)
    worst = max((f.severity.rank for f in found), default=-1)
    limit = {"error": Severity.ERROR.rank, "warning": Severity.WARNING.rank, "never": 99}[args.fail_on]
    return 1 if worst >= limit else 0


def add_parser(sub: Any) -> None:
    """Register the ``preflight`` subcommand."""
    p = sub.add_parser("preflight", help="run the one-shot checks on a LightningModule without training")
    p.add_argument("model", help="package.module:ModelClass (called with --model-args)")
    p.add_argument("--data", help="package.module:DataModuleClass (called with --data-args)")
    p.add_argument("--model-args", default="{}", help="JSON keyword arguments for the model")
    p.add_argument("--data-args", default="{}", help="JSON keyword arguments for the data module")
    p.add_argument("--fail-on", choices=["error", "warning", "never"], default="error")
    p.set_defaults(func=main_preflight)
