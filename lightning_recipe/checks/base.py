"""Shared machinery of the one-shot checks: run once on the first training batch."""

from __future__ import annotations

from typing import Any

from torch import nn

from lightning_recipe import _sharded
from lightning_recipe._probe import ProbeSkip, StepFn, batch_or_peek
from lightning_recipe.batch import BatchLayoutError, Getter
from lightning_recipe.callback import RecipeCallback


class FirstBatchCheck(RecipeCallback):
    """A check that measures once, on the first training batch, before any optimizer step.

    It sees the batch as Lightning hands it to ``training_step`` (after the transfer to the
    device). A resumed run that already ran the check does not run it again (the flag and the
    findings are in the checkpoint); a run that starts at a step > 0 without that state reports
    the skip. :meth:`check` does the work and can also be called without a trainer
    (``lightning_recipe.preflight``).

    Args:
        get_input: ``callable(batch) -> Tensor`` for batch layouts the guess cannot read.
        get_target: ``callable(batch) -> Tensor | None`` likewise for the target.
        step_fn: ``callable(model, batch) -> loss`` replacing ``model.training_step`` (needed
            for manual optimisation, where ``training_step`` steps the optimizers itself).
        on_error: ``"warn"`` (default) or ``"raise"`` to stop the fit with ``RecipeError`` on an
            error finding.
    """

    def __init__(
        self,
        *,
        get_input: Getter | None = None,
        get_target: Getter | None = None,
        step_fn: StepFn | None = None,
        on_error: str = "warn",
    ) -> None:
        super().__init__(on_error=on_error)
        self.read_batches_with(get_input, get_target, step_fn)
        self.done = False
        self._seen = 0

    #: how many of the first training batches the check looks at
    batches_needed = 1

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        # The gate counts batches only (the same on every rank), never the outcome, so under DDP
        # every rank reaches ``rank_consistent_errors`` the same number of times.
        if self._seen >= self.batches_needed:
            return
        self._seen += 1
        # a sharded model: gather its full weights for the copies (once per step, shared by
        # every check of this batch; a collective that every rank reaches here)
        _sharded.gather_point(trainer, pl_module, need=self.needs_full_copy)
        with self.rank_consistent_errors(trainer):
            self.run_safely(trainer, "on_train_batch_start", self._on_batch, trainer, pl_module, batch)
        if self._seen >= self.batches_needed:
            self.done = True

    def _on_batch(self, trainer: Any, pl_module: Any, batch: Any) -> None:
        try:  # ``training_step(self, dataloader_iter)``: Lightning hands callbacks no batch
            batch = batch_or_peek(trainer, pl_module, batch)
        except ProbeSkip as why:
            if not self.done:
                self.done = True
                self.skip(trainer, str(why))
            return
        self.first_batches(trainer, pl_module, batch)

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # free the gathered full weights of a sharded model once the optimizer has moved on
        _sharded.release_stale(trainer, pl_module)

    def first_batches(self, trainer: Any, pl_module: Any, batch: Any) -> None:
        """Called on each of the first ``batches_needed`` batches. Default: :meth:`run_check` on
        the first one, unless training resumed past the point where the check applies."""
        if self.done:
            return
        self.done = True
        if trainer.global_step > 0:
            self.skip(
                trainer, f"training resumed at step {trainer.global_step}, after the point where it applies"
            )
            return
        self.run_check(trainer, pl_module, batch)

    def run_check(self, trainer: Any | None, module: nn.Module, batch: Any) -> None:
        """Run :meth:`check`, turning a :class:`ProbeSkip` or unreadable batch into a skip."""
        try:
            self.check(trainer, module, batch)
        except (ProbeSkip, BatchLayoutError) as why:
            self.skip(trainer, str(why))

    def check(self, trainer: Any | None, module: nn.Module, batch: Any) -> None:
        """Measure on ``batch``; report findings with :meth:`report`. Subclasses implement it."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "done": self.done}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.done = bool(state_dict.get("done", False))
        self._seen = self.batches_needed if self.done else 0
