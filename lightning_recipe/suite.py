"""``recipe_callbacks()``: the whole suite with sane defaults, one line to add to a Trainer."""

from __future__ import annotations

import inspect
from typing import Any

from lightning.pytorch.callbacks import Callback

from lightning_recipe.checks.batch_independence import BatchIndependenceCheck
from lightning_recipe.checks.data_inspection import DataInspectionCheck
from lightning_recipe.checks.gradient_check import GradientCheck
from lightning_recipe.checks.loss_at_init import LossAtInitCheck

#: (override name, class) for every callback of the suite, in the order they run
SUITE: list[tuple[str, type]] = [
    ("data_inspection", DataInspectionCheck),
    ("loss_at_init", LossAtInitCheck),
    ("batch_independence", BatchIndependenceCheck),
    ("gradient_check", GradientCheck),
]

#: arguments handed to every callback of the suite that accepts them
SHARED_ARGS = ("get_input", "get_target", "step_fn", "on_error")


def recipe_callbacks(
    *,
    get_input: Any = None,
    get_target: Any = None,
    step_fn: Any = None,
    on_error: str = "warn",
    verbose: bool = True,
    **overrides: Any,
) -> list[Callback]:
    """The full ``lightning_recipe`` suite, ready for ``Trainer(callbacks=...)``.

    Args:
        get_input: ``callable(batch) -> Tensor``, for batch layouts the suite cannot guess.
        get_target: ``callable(batch) -> Tensor | None``, likewise.
        step_fn: ``callable(model, batch) -> loss`` instead of ``training_step`` in the checks.
        on_error: ``"warn"`` or ``"raise"`` (stop the fit on an error finding).
        verbose: print the findings table at the end of fit (the JSON report and the
            TensorBoard text are written either way).
        **overrides: per callback, by its snake-case name (see :data:`SUITE`): a dict of
            arguments, ``False`` to leave it out, or a ready callback instance to use instead.

    Example::

        trainer = L.Trainer(callbacks=recipe_callbacks(loss_at_init={"tolerance": 0.5},
                                                       data_inspection=False))
    """
    known = {name for name, _ in SUITE}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(
            f"recipe_callbacks() got unknown callback name(s) {unknown}; allowed: {sorted(known)}"
        )
    shared = {"get_input": get_input, "get_target": get_target, "step_fn": step_fn, "on_error": on_error}
    out: list[Callback] = []
    for name, cls in SUITE:
        choice = overrides.get(name, {})
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
        kwargs.update(choice)
        out.append(cls(**kwargs))
    for cb in out:
        if hasattr(cb, "verbose"):
            cb.verbose = verbose
    return out
