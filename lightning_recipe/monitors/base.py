"""Shared machinery of the periodic monitors: when to log, and trends over logging steps."""

from __future__ import annotations

from typing import Any

from lightning_recipe.callback import RecipeCallback


def validate_interval(name: str, value: int | None) -> int | None:
    """Check an ``every_n_*`` argument: a positive int or ``None``."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive int or None, got {value!r}")
    return value


class StepMonitor(RecipeCallback):
    """A monitor that works every ``every_n_steps`` optimizer steps and does nothing in between.

    ``every_n_steps=None`` follows ``Trainer(log_every_n_steps=...)`` (default 50), so the
    monitor's charts line up with the user's. :meth:`due` is the cheap test to call at the top
    of a hook; :meth:`mark_logged` records that this step was handled (with gradient
    accumulation several batches share one ``global_step``: only the first one logs).

    Example::

        class MyMonitor(StepMonitor):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                if not self.due(trainer):
                    return
                self.mark_logged(trainer)
                ...  # attach hooks for this step only
    """

    def __init__(self, every_n_steps: int | None = None, *, on_error: str = "warn") -> None:
        super().__init__(on_error=on_error)
        self.every_n_steps = validate_interval("every_n_steps", every_n_steps)
        self._last_logged_step = -1

    def interval(self, trainer: Any) -> int:
        """The logging interval in optimizer steps."""
        return self.every_n_steps or int(getattr(trainer, "log_every_n_steps", 50) or 50)

    def due(self, trainer: Any) -> bool:
        """True on a logging step that was not handled yet (and while the monitor is on).

        A step is due when the global step reached a new multiple of the interval since the last
        handled one, so manual optimisation with k optimizers (the step moves by k per batch)
        still logs every interval. Do not put a collective behind it: it turns False on a rank
        whose monitor switched itself off after an internal error.
        """
        if not self.active:
            return False
        step, n, last = trainer.global_step, self.interval(trainer), self._last_logged_step
        if last < 0:
            return step % n == 0
        return step // n > last // n

    def mark_logged(self, trainer: Any) -> None:
        """Record that the current ``global_step`` was handled."""
        self._last_logged_step = trainer.global_step

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "last_logged_step": self._last_logged_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._last_logged_step = int(state_dict.get("last_logged_step", -1))


class TrendMonitor(StepMonitor):
    """A :class:`StepMonitor` whose findings come from per-key trends: :attr:`streaks` (logging
    steps in a row a condition held) and :attr:`history` (the recent ``(step, value)`` pairs
    behind a finding's message), both saved in checkpoints."""

    def __init__(self, every_n_steps: int | None = None, *, on_error: str = "warn") -> None:
        super().__init__(every_n_steps, on_error=on_error)
        self.streaks = Streaks()
        self._history: dict[str, list[tuple[int, float]]] = {}

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "streaks": self.streaks.state_dict(),
            "history": {k: [list(x) for x in v] for k, v in self._history.items()},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.streaks.load_state_dict(state_dict.get("streaks", {}))
        self._history = {
            str(k): [(int(s), float(v)) for s, v in hist] for k, hist in state_dict.get("history", {}).items()
        }


class Streaks:
    """Consecutive logging steps on which a condition held, per key (layer, parameter, ...).

    Findings come from a trend, not one noisy sample: report when ``update(key, cond)`` reaches
    the patience. Saved in checkpoints by the monitors that use it.
    """

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def update(self, key: str, condition: bool) -> int:
        """Count one more logging step for ``key`` if ``condition`` held, else reset; return it."""
        self.counts[key] = self.counts.get(key, 0) + 1 if condition else 0
        return self.counts[key]

    def state_dict(self) -> dict[str, int]:
        return dict(self.counts)

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.counts = {str(k): int(v) for k, v in state.items()}
