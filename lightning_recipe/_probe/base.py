"""What every probe shares: the skip exception and the step function type."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

StepFn = Callable[[nn.Module, Any], Any]


class ProbeSkip(Exception):
    """A check cannot run on this model / batch; the message is the reason shown to the user."""


class UserStepError(ProbeSkip):
    """The user's own step (or ``step_fn``) raised when a probe ran it on its copy of the model.

    Not a failure of the diagnostic: a step that asserts on trainer state, logs through a logger
    the copy has no access to, asks ``dataloader_iter`` for a second batch, or cannot read the
    batch the probe handed it. The diagnostic reports ``check-skipped`` with the step's own error;
    the original exception is kept as :attr:`error` (and as ``__cause__``).
    """

    def __init__(self, hook: str, error: BaseException) -> None:
        self.hook = hook
        self.error = error
        detail = str(error).strip().splitlines()[0] if str(error).strip() else ""
        if isinstance(error, StopIteration):
            detail = "it asked dataloader_iter for more batches than the one the check hands it"
        if len(detail) > 240:
            detail = detail[:237] + "..."
        super().__init__(
            f"your {hook} raised {type(error).__name__} when the check ran it on its own copy of the "
            f"model and batch{': ' + detail if detail else ''}"
        )
