"""Per-trainer shared state of the suite and small rank / trainer helpers.

Several recipe callbacks on one trainer share a few things: the TensorBoard writer lookup, the
custom-scalars layout they build together, whether the report was written. That state lives
here, keyed weakly by the trainer, so no callback owns it and none must be added first.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

_STATES: weakref.WeakKeyDictionary[Any, TrainerState] = weakref.WeakKeyDictionary()


@dataclass
class TrainerState:
    """What the suite shares per trainer (never checkpointed: it is rebuilt each fit)."""

    writer: Any = None
    writer_looked_up: bool = False
    layout: dict[str, dict[str, list]] = field(default_factory=dict)
    layout_written: bool = False
    findings_written: int = 0
    findings_step: int = -1
    findings_pending: bool = False
    report_written: bool = False
    snapshot_written: bool = False
    #: the first training batch, fetched once for steps that take ``dataloader_iter``
    peeked_batch: Any = None


def trainer_state(trainer: Any) -> TrainerState:
    """The shared state for ``trainer`` (created on first use)."""
    try:
        state = _STATES.get(trainer)
        if state is None:
            state = _STATES[trainer] = TrainerState()
        return state
    except TypeError:  # not weak-referenceable (a stand-in trainer): keep it on the object
        state = getattr(trainer, "_lightning_recipe_state", None)
        if state is None:
            state = TrainerState()
            try:
                trainer._lightning_recipe_state = state
            except AttributeError:
                pass
        return state


def reset_trainer_state(trainer: Any) -> None:
    """Forget the shared state (at each fit start, so a second ``fit`` starts clean)."""
    try:
        _STATES.pop(trainer, None)
    except TypeError:
        if hasattr(trainer, "_lightning_recipe_state"):
            trainer._lightning_recipe_state = TrainerState()


def recipe_callbacks_of(trainer: Any) -> list[Any]:
    """The recipe callbacks on ``trainer``, in the trainer's order.

    Found by duck typing (a callback that keeps recipe findings), so this low-level module needs no
    callback class and callbacks of either Lightning namespace are found alike."""
    return [
        cb
        for cb in getattr(trainer, "callbacks", None) or []
        if callable(getattr(cb, "_recipe_findings", None))
    ]


def reports_code(trainer: Any | None, code: str) -> bool:
    """True when a recipe callback on ``trainer`` declares ``code`` among the codes it reports
    (its ``codes`` attribute): lets one callback leave a verdict to another without importing it."""
    return trainer is not None and any(
        code in getattr(cb, "codes", ()) for cb in recipe_callbacks_of(trainer)
    )


def is_global_zero(trainer: Any | None) -> bool:
    """True on the process that writes files and prints (rank zero), also without a trainer."""
    if trainer is not None:
        return bool(getattr(trainer, "is_global_zero", True))
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


def global_step(trainer: Any | None) -> int:
    """``trainer.global_step``, or 0 without a trainer (``preflight``)."""
    return int(getattr(trainer, "global_step", 0) or 0) if trainer is not None else 0


def world_size(trainer: Any | None) -> int:
    """Number of processes taking part in training (1 without a trainer)."""
    return int(getattr(trainer, "world_size", 1) or 1) if trainer is not None else 1
