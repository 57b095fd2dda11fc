"""What every lint of ModelLintCheck shares: the finding a lint asks for, and name lists."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from lightning_recipe.findings import Severity

#: how many names a message lists before "and N more"
MAX_NAMES = 6


@dataclass(frozen=True)
class Lint:
    """A finding one lint asks ModelLintCheck to report, once per ``key`` (default: the code)."""

    code: str
    severity: Severity
    message: str
    evidence: dict[str, Any]
    key: str | None = None


def name_list(names: list[str]) -> str:
    """The first :data:`MAX_NAMES` names, then "and N more"."""
    shown = ", ".join(names[:MAX_NAMES])
    return shown + (f" and {len(names) - MAX_NAMES} more" if len(names) > MAX_NAMES else "")


def opt_params(optimizer: Any) -> Iterator[Tensor]:
    """The tensors in an optimizer's param groups."""
    for group in getattr(optimizer, "param_groups", []):
        yield from group["params"]
