"""Reading the logits and targets of the real training step, on chosen steps only.

:class:`StepCapture` pushes a :class:`~lightning_recipe._probe.LossCapture` mode when a
training batch starts and pops it when the step hands its loss to the backward pass, so the
callback sees the loss calls of the user's own step (the inputs after any augmentation the
data pipeline made, the model in training mode) without a copy or a second forward pass. The
mode only records: every call runs unchanged, so the run stays bit-identical. Compiled models
are left alone (a function mode would make dynamo recompile them).
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import Tensor, nn

from lightning_recipe._probe import LossCall, LossCapture, StepResult, track_hook


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
        #: the first floating-point output of the model's forward in the last captured step
        self.forward_output: Tensor | None = None

    @property
    def active(self) -> bool:
        return self._mode is not None

    def start(self, module: nn.Module) -> bool:
        """Start recording (False for a compiled model, or when already recording)."""
        if self._mode is not None or is_compiled(module):
            return False
        mode = LossCapture(module)  # module losses and distribution likelihoods too (``_losses``)
        mode.__enter__()
        for handle in mode.modules._handles:
            track_hook(handle)
        self._mode = mode
        _LIVE.add(mode)
        return True

    def stop(self, loss: Tensor | None = None) -> StepResult | None:
        """Stop recording; the loss calls of the step that reach the backward pass (outputs with
        a gradient). Other captures of this module stacked above ours stay in place; a foreign
        mode above ours (the user's) makes it wait for a later call."""
        mode = self._mode
        if mode is None or not _remove(mode):
            return None
        self._mode = None
        out = mode.modules.forward_output
        # detached: the capture lives on a callback the module reaches through its trainer, and a
        # probe's deep copy of the module must not meet a non-leaf tensor there
        self.forward_output = out.detach() if out is not None else None
        calls: list[LossCall] = [c for c in mode.calls if c.output.requires_grad] or mode.calls
        result = mode.result(loss if isinstance(loss, Tensor) else None)
        module_calls = [c for c in result.module_calls if c.output.requires_grad] or result.module_calls
        return StepResult(loss=result.loss, calls=calls, module_calls=module_calls)

    def abort(self) -> None:
        """Stop without a result (exceptions, teardown); safe to call any time."""
        mode = self._mode
        if mode is not None and _remove(mode):
            self._mode = None


#: the recording modes of the captures in progress
_LIVE: weakref.WeakSet[LossCapture] = weakref.WeakSet()


def _remove(mode: LossCapture) -> bool:
    """Take ``mode`` off the torch-function mode stack, leaving the captures of this module that
    were pushed after it in place; False when it is not on the stack or a foreign mode is above."""
    n = torch._C._len_torch_function_stack()
    stack = [torch._C._get_function_stack_at(i) for i in range(n)]
    at = next((i for i, m in enumerate(stack) if m is mode), None)
    if at is None:
        _LIVE.discard(mode)
        return True  # already gone (popped by someone else): nothing to undo
    above = stack[at + 1 :]
    if any(m not in _LIVE for m in above):
        return False
    popped = [torch._C._pop_torch_function_stack() for _ in above]  # innermost first
    mode.__exit__(None, None, None)
    for m in reversed(popped):
        torch._C._push_on_torch_function_stack(m)
    _LIVE.discard(mode)
    return True


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
