"""Reading the logits and targets of the real training step, on chosen steps only.

:class:`StepCapture` pushes a :class:`~lightning_recipe._probe.LossCapture` mode when a
training batch starts and pops it when the step hands its loss to the backward pass, so the
callback sees the loss calls of the user's own step (the inputs after any augmentation the
data pipeline made, the model in training mode) without a copy or a second forward pass. The
mode only records: every call runs unchanged, so the run stays bit-identical. Compiled models
are left alone (a function mode would make dynamo recompile them).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lightning_recipe._probe import LossCall, LossCapture, StepResult


def is_compiled(module: nn.Module) -> bool:
    """True for a module run through ``torch.compile`` (whole or in parts)."""
    if module.__dict__.get("_compiler_ctx"):
        return True
    try:
        from torch._dynamo.eval_frame import OptimizedModule
    except Exception:  # pragma: no cover - torch without dynamo
        return False
    return any(isinstance(m, OptimizedModule) for m in module.modules())


class StepCapture:
    """Capture the loss calls of one real training step.

    Example::

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if due:
                self.capture.start(pl_module)

        def on_before_backward(self, trainer, pl_module, loss):
            result = self.capture.stop(loss)   # StepResult or None
    """

    def __init__(self) -> None:
        self._mode: LossCapture | None = None

    @property
    def active(self) -> bool:
        return self._mode is not None

    def start(self, module: nn.Module) -> bool:
        """Start recording (False for a compiled model, or when already recording)."""
        if self._mode is not None or is_compiled(module):
            return False
        mode = LossCapture()
        mode.__enter__()
        self._mode = mode
        return True

    def stop(self, loss: Tensor | None = None) -> StepResult | None:
        """Stop recording if our mode is the innermost one (else wait for a later call); the
        loss calls of the step that reach the backward pass (outputs with a gradient)."""
        mode = self._mode
        if mode is None or not _on_top(mode):
            return None
        self._mode = None
        mode.__exit__(None, None, None)
        calls: list[LossCall] = [c for c in mode.calls if c.output.requires_grad] or mode.calls
        return StepResult(loss=loss if isinstance(loss, Tensor) else None, calls=calls)

    def abort(self) -> None:
        """Stop without a result (exceptions, teardown); safe to call any time."""
        mode = self._mode
        if mode is not None and _on_top(mode):
            self._mode = None
            mode.__exit__(None, None, None)


def _on_top(mode: LossCapture) -> bool:
    n = torch._C._len_torch_function_stack()
    return n > 0 and torch._C._get_function_stack_at(n - 1) is mode


def planned_steps(trainer: Any) -> int | None:
    """``trainer.estimated_stepping_batches`` when finite, else ``None``."""
    import math

    try:
        planned = float(trainer.estimated_stepping_batches)
    except Exception:
        return None
    return int(planned) if math.isfinite(planned) and planned > 0 else None


#: keys under which a batch may carry the dataset indices of its samples
INDEX_KEYS = ("index", "indices", "idx", "sample_idx", "sample_index", "id", "ids")


def batch_indices(batch: Any, n: int) -> Tensor | None:
    """The dataset indices a batch carries (a mapping key of :data:`INDEX_KEYS`), or ``None``."""
    if isinstance(batch, dict):
        for key in INDEX_KEYS:
            value = batch.get(key)
            ok = isinstance(value, Tensor) and value.dim() == 1 and value.numel() == n
            if ok and not value.is_floating_point():
                return value.detach()
    return None
