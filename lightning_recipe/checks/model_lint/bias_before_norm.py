"""``bias-before-norm``: a Linear/Conv with ``bias=True`` whose output goes straight into a
BatchNorm, which subtracts the mean and cancels the bias.

Found by tensor identity in :class:`~lightning_recipe.checks.model_lint.forward_probe.ForwardProbe`
(not by module order, which says nothing about the data flow).
"""

from __future__ import annotations

from lightning_recipe.checks.model_lint._common import Lint
from lightning_recipe.checks.model_lint.forward_probe import ForwardProbe
from lightning_recipe.findings import Severity


def bias_before_norm(probe: ForwardProbe) -> list[Lint]:
    """One finding per (layer, BatchNorm) pair."""
    return [
        Lint(
            "bias-before-norm",
            Severity.INFO,
            f"{conv} has bias=True and its output goes straight into the BatchNorm {norm}, which "
            "subtracts the mean and cancels the bias: use bias=False there (fewer parameters, "
            "same model).",
            {"layer": conv, "norm": norm},
            key=f"bias-before-norm:{conv}",
        )
        for conv, norm in probe.bias_before_norm
    ]
