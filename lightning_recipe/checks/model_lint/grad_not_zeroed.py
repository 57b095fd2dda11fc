"""``grad-not-zeroed``: an optimizer step that used gradients carried over from the step before.

A parameter whose gradient was never seen cleared (``None`` or zero at a ``backward``) between
two steps of its optimizer (read by
:class:`~lightning_recipe.checks.model_lint.grad_watch.GradWatch`). Gradient accumulation is
healthy: the first backward after the step sees cleared gradients.
"""

from __future__ import annotations

from lightning_recipe.checks.model_lint._common import Lint, name_list
from lightning_recipe.findings import Severity


def carried_over(carried: list[str], steps: int) -> Lint | None:
    """The finding for the parameters stepped with carried-over gradients, if any."""
    if not carried:
        return None
    return Lint(
        "grad-not-zeroed",
        Severity.WARNING,
        f"{len(carried)} parameter(s) were stepped with gradients carried over from the "
        f"previous optimizer step (never cleared between two steps in the first {steps}): "
        f"{name_list(carried)}; call optimizer.zero_grad() after each optimizer.step() "
        "(gradient accumulation: zero after the step, not never).",
        {"count": len(carried), "names": carried, "steps": steps},
    )
