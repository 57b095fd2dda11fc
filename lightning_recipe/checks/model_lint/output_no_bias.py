"""``output-no-bias``: the layer whose output is the loss input has no bias; and, when no
LossAtInitCheck is on the trainer, ``softmax-before-loss``: that input is already probabilities.

Both read the end of the model from
:class:`~lightning_recipe.checks.model_lint.forward_probe.ForwardProbe`.
"""

from __future__ import annotations

from lightning_recipe.checks.model_lint._common import Lint
from lightning_recipe.checks.model_lint.forward_probe import ForwardProbe
from lightning_recipe.findings import Severity


def output_no_bias(probe: ForwardProbe) -> Lint | None:
    if probe.output_layer is None or probe.output_layer_has_bias is not False:
        return None
    return Lint(
        "output-no-bias",
        Severity.INFO,
        f"The output layer {probe.output_layer} has no bias, so it cannot start at the "
        f'target mean or the class priors ("init well"); use bias=True unless the weights '
        "are tied on purpose.",
        {"layer": probe.output_layer, "loss_fn": probe.loss_fn},
    )


def softmax_before_loss(probe: ForwardProbe) -> Lint | None:
    """The loss input is already probabilities (the detector LossAtInitCheck uses)."""
    p = probe.probabilities
    if p is None:
        return None
    return Lint(
        "softmax-before-loss",
        Severity.ERROR,
        f"The input of {probe.loss_fn} is already probabilities (values in "
        f"[{p['min']:.3g}, {p['max']:.3g}]"
        + (f", rows summing to {p['row_sum_min']:.4f}..{p['row_sum_max']:.4f}" if "row_sum_min" in p else "")
        + f") but {probe.loss_fn} expects "
        + ("log-probabilities" if probe.loss_fn == "nll_loss" else "raw logits")
        + "; remove the softmax/sigmoid at the end of the model (the loss applies it itself).",
        {**p, "loss_fn": probe.loss_fn},
    )
