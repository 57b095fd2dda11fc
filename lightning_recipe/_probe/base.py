"""What every probe shares: the skip exception and the step function type."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

StepFn = Callable[[nn.Module, Any], Any]


class ProbeSkip(Exception):
    """A check cannot run on this model / batch; the message is the reason shown to the user."""
