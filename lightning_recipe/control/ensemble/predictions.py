"""Averaging the members' predictions, and the per-batch loss and accuracy sums of every member,
the averaged weights and every candidate ensemble.

Predictions are averaged in the space the loss reads: probabilities for classifiers (computed in
log space so a confident member cannot underflow), outputs for regression. The averaged
prediction goes back through the user's own loss call (:meth:`LossCall.recompute`).
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_recipe._probe import CLASS_LOSSES, LossCall, ProbeSkip, class_scores

BINARY = ("binary_cross_entropy", "binary_cross_entropy_with_logits")
#: losses whose input is a log-probability already
LOG_PROB = ("nll_loss", "kl_div")
#: the sums kept per row: loss total, loss count, correct, accuracy count
STATS = 4


def _class_dim(x: Tensor) -> int:
    return 1 if x.dim() > 1 else 0


def to_log_space(name: str, x: Tensor) -> Tensor:
    """The members' predictions in the space where they are averaged, stacked on a new dim 0.

    Classifiers are averaged as probabilities, computed in log space (``logsumexp``) so that a
    confident member cannot underflow to log(0); regression outputs and scores as they are.
    """
    x = x.detach().float()
    if name == "cross_entropy":
        return x.log_softmax(dim=_class_dim(x))
    if name == "binary_cross_entropy_with_logits":
        return torch.stack([F.logsigmoid(x), F.logsigmoid(-x)])  # log p, log (1 - p)
    return x  # nll_loss / kl_div inputs are log-probabilities already; the rest is averaged as is


def average(name: str, stacked: Tensor, subset: list[int], like: Tensor) -> Tensor:
    """The subset's averaged prediction, in the loss input's own space (logits stay logits)."""
    idx = torch.as_tensor(subset, device=stacked.device)
    part = stacked.index_select(0, idx)
    if name in ("cross_entropy", *LOG_PROB):
        out = torch.logsumexp(part, dim=0) - math.log(len(subset))  # log of the mean probability
    elif name == "binary_cross_entropy_with_logits":
        lse = torch.logsumexp(part, dim=0)  # (2, ...): log sum p, log sum (1 - p)
        out = lse[0] - lse[1]  # logit of the mean probability
    else:
        out = part.mean(dim=0)
    return out.to(like.dtype) if like.is_floating_point() else out


def _loss_total(call: LossCall, out: Tensor, n: int) -> Tensor:
    reduction = call.kwargs.get("reduction", "mean")
    out = out.detach().float()
    if reduction == "sum":
        return out.sum()
    return out.mean() * n


def _batch_size(x: Tensor) -> int:
    return int(x.shape[0]) if x.dim() > 0 else 1


def _correct(name: str, x: Tensor, call: LossCall) -> tuple[Tensor, Tensor]:
    """(correct, counted) on the device for a prediction ``x`` in the loss input's space."""
    zero = torch.zeros((), device=x.device)
    if name in CLASS_LOSSES:
        view = class_scores(replace(call, input=x))
        if view is None or view.target is None:
            return zero, zero
        t = view.target
        valid = (t >= 0) & (t < view.num_classes)
        hit = (view.scores.argmax(dim=1) == t) & valid
        return hit.sum().float(), valid.sum().float()
    if name in BINARY and isinstance(call.target, Tensor) and call.target.numel() == x.numel():
        t = call.target.reshape(x.shape).float()
        valid = (t == 0) | (t == 1)
        cut = 0.0 if name == "binary_cross_entropy_with_logits" else 0.5
        hit = ((x > cut).float() == t) & valid
        return hit.sum().float(), valid.sum().float()
    return zero, zero


def _stats(call: LossCall, x: Tensor, out: Tensor) -> Tensor:
    n = _batch_size(call.input)
    total = _loss_total(call, out, n)
    correct, counted = _correct(call.name, x, call)
    count = torch.full((), float(n), device=total.device)
    return torch.stack([total, count, correct.to(total.device), counted.to(total.device)])


def batch_rows(calls: list[LossCall], subsets: list[list[int]]) -> Tensor:
    """Rows: every member, the averaged model, every candidate ensemble -> [loss*n, n, correct, counted].

    ``calls`` are the members' loss calls on one batch (the current model first), then the
    averaged model's."""
    name = calls[0].name
    if any(c.name != name or c.input.shape != calls[0].input.shape for c in calls):
        raise ProbeSkip("the ensemble members' loss calls differ in function or shape; cannot average them")
    rows = [_stats(c, c.input.detach(), c.output) for c in calls]
    base = calls[0]
    stacked = torch.stack([to_log_space(name, c.input) for c in calls[:-1]])  # members, not the average
    for subset in subsets:
        mean = average(name, stacked, subset, base.input)
        rows.append(_stats(base, mean, base.recompute(mean)))
    return torch.stack(rows)
