"""Reading a loss call: class scores, probabilities, and the know-nothing reference prediction."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_recipe import _losses
from lightning_recipe._losses import ModuleLossCall
from lightning_recipe._probe.capture import CLASS_LOSSES, REGRESSION_LOSSES, LossCall


@dataclass
class ClassScores:
    """Class scores and integer targets from a classification loss call, flattened to (N, C)."""

    scores: Tensor  # (N, C)
    target: Tensor | None  # (N,) integer classes, or None (probability targets)
    num_classes: int
    class_dim: int


def class_scores(call: LossCall) -> ClassScores | None:
    """View a classification loss call as (N, C) scores; ``None`` if it is not one."""
    if call.name not in CLASS_LOSSES:
        return None
    x = call.input.detach()
    if x.dim() == 1:  # unbatched (C,)
        x = x.unsqueeze(0)
        tgt = call.target.reshape(1) if isinstance(call.target, Tensor) else None
        return ClassScores(x, tgt, x.shape[1], 1)
    if x.dim() < 2:
        return None
    c = x.shape[1]
    scores = x.movedim(1, -1).reshape(-1, c)
    target = call.target if isinstance(call.target, Tensor) else None
    if target is not None and not target.is_floating_point():
        target = target.reshape(-1)
        if target.numel() != scores.shape[0]:
            target = None
    elif target is not None:
        target = None  # probability targets: no integer classes
    return ClassScores(scores, target, c, 1)


def scores_by_shape(pred: Any, target: Any) -> ClassScores | None:
    """Class scores read by shape, for a loss that is not a known classification loss (a custom
    loss module, a loss written by hand): an ``(N, C)`` floating-point prediction next to ``N``
    integer labels in ``[0, C)``; ``None`` otherwise."""
    if isinstance(target, (tuple, list)) and target and isinstance(target[0], Tensor):
        target = target[0]  # (target, weight)
    if not (isinstance(pred, Tensor) and isinstance(target, Tensor)) or pred.dim() != 2:
        return None
    n, c = pred.shape
    if not pred.is_floating_point() or target.is_floating_point() or target.numel() != n or c < 2 or n == 0:
        return None
    labels = target.reshape(-1)
    if int(labels.min()) < 0 or int(labels.max()) >= c:
        return None
    return ClassScores(pred.detach(), labels, c, 1)


def class_view(call: Any) -> ClassScores | None:
    """:func:`class_scores` of a known classification loss call, else :func:`scores_by_shape` of
    a module / step loss call's prediction and target."""
    if call is None:
        return None
    if isinstance(call, LossCall):
        return class_scores(call)
    view = scores_by_shape(call.input, call.target)
    if view is not None or not isinstance(call, ModuleLossCall) or call.kind == "step":
        return view
    try:  # scores in another layout (class dim not last, probabilities): as log-probabilities
        read = _losses.prediction_view(call)
    except Exception:
        return None
    if read is None or read[0] != "classification":
        return None
    _, probs, target = read
    return ClassScores(probs.clamp_min(1e-12).log(), target, int(probs.shape[1]), 1)


#: the reference kinds :func:`know_nothing` returns
CHANCE, MEAN_PREDICTOR = _losses.CHANCE, _losses.MEAN_PREDICTOR


def chance_input(call: LossCall) -> Tensor | None:
    """The prediction of a classifier that knows nothing (uniform over the classes) in the input
    format of the loss in ``call``; ``None`` for other losses."""
    x = call.input.detach()
    if call.name in ("cross_entropy", "multi_margin_loss", "binary_cross_entropy_with_logits"):
        return torch.zeros_like(x)
    if call.name == "nll_loss":
        c = x.shape[1] if x.dim() > 1 else x.shape[0]
        return torch.full_like(x, -math.log(c))
    if call.name == "binary_cross_entropy":
        return torch.full_like(x, 0.5)
    return None


def know_nothing(call: LossCall | ModuleLossCall | None) -> tuple[Tensor, str] | None:
    """The know-nothing prediction for the loss in ``call`` and which reference it is: uniform
    class scores (:data:`CHANCE`) for classification losses, the target mean
    (:data:`MEAN_PREDICTOR`) for regression losses with float targets; ``None`` otherwise."""
    if call is None or not isinstance(call, LossCall):
        return None
    base = chance_input(call)
    if base is not None:
        return base, CHANCE
    target = call.target
    if (
        call.name in REGRESSION_LOSSES
        and isinstance(target, Tensor)
        and target.is_floating_point()
        and target.numel() > 0
    ):
        mean = target.detach().float().mean().to(call.input.dtype)
        return mean.expand_as(call.input.detach()), MEAN_PREDICTOR
    return None


def know_nothing_loss(call: LossCall | ModuleLossCall | None) -> tuple[Tensor, str] | None:
    """The loss of :func:`know_nothing`'s prediction through the same loss call (same target,
    weights, reduction), and which reference it is; for any other loss (a custom module, a
    metric, a distribution's likelihood, a functional loss without a known chance level) the
    user's own loss with the prediction replaced by a constant (``_losses.know_nothing_loss``:
    the target mean, uniform class scores or the batch-mean prediction, the lowest); ``None``
    when there is none."""
    if call is None:
        return None
    ref = know_nothing(call) if isinstance(call, LossCall) else None
    if ref is None:
        return _losses.know_nothing_loss(call)
    with torch.no_grad():
        return call.recompute(ref[0]), ref[1]


def rounding_eps(dtype: torch.dtype) -> float:
    """Machine epsilon of a floating dtype (float32's for anything else): the relative rounding
    step that tolerances on values computed in that dtype must allow for."""
    try:
        return float(torch.finfo(dtype).eps) if dtype.is_floating_point else float(torch.finfo().eps)
    except TypeError:
        return float(torch.finfo().eps)


def looks_like_probabilities(call: LossCall) -> dict[str, float] | None:
    """Evidence that a loss expecting logits / log-probabilities got probabilities.

    ``cross_entropy`` and ``multi_margin_loss`` expect logits, ``nll_loss`` log-probabilities:
    rows that lie in [0, 1] and sum to 1 are a softmax output (raw scores never do that).
    ``binary_cross_entropy_with_logits`` expects logits; values alone cannot tell a sigmoid
    output from small logits at init, so it is flagged only when the input is the output of a
    ``sigmoid`` call seen during the step.
    Rows must sum to 1 within ``max(1e-3, 2 * eps)`` of the input's dtype: probabilities rounded
    to bfloat16 (eps 2^-7) sum to 1 only within eps / 2.
    Returns ``None`` when the input does not look like probabilities.
    """
    x = call.input.detach().float()
    if x.numel() == 0 or not bool(torch.isfinite(x).all()):
        return None
    lo, hi = float(x.min()), float(x.max())
    if call.name in CLASS_LOSSES:
        view = class_scores(call)
        if view is None or view.num_classes < 2:
            return None
        sums = view.scores.float().sum(dim=1)
        smin, smax = float(sums.min()), float(sums.max())
        tol = max(1e-3, 2 * rounding_eps(call.input.dtype))
        if lo >= -1e-6 and hi <= 1 + 1e-6 and abs(smin - 1) < tol and abs(smax - 1) < tol:
            return {"min": lo, "max": hi, "row_sum_min": smin, "row_sum_max": smax}
        return None
    squashed = call.name == "binary_cross_entropy_with_logits" and call.squashed_by == "sigmoid"
    if squashed and lo >= 0.0 and hi <= 1.0:
        return {"min": lo, "max": hi, "count": float(x.numel()), "produced_by": "sigmoid"}
    return None
