"""Reading a sequence loss: which target sits where, and which input position holds it.

Shared by :class:`~lightning_recipe.checks.future_leak.FutureLeakCheck` and
:class:`~lightning_recipe.checks.padding.PaddingCheck`. A loss call sees targets in one of a few
layouts -- ``(B*T,)`` against ``(B*T, V)`` scores, ``(B, T)`` against ``(B, V, T)``, element-wise
regression targets ``(B, T)`` / ``(B, T, F)`` -- and the model reads sequences ``(B, S)`` (token
ids, or their embedding) or ``(B, S, F)`` (float features). :func:`target_views` puts every
target on a ``(B, T)`` grid, with the index of the loss-input row that predicts it, in the
batch-first and time-first orders the flat layout allows; :func:`align` finds the shift ``k``
with ``target[b, t] == input[b, t + k]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_recipe._probe import CLASS_LOSSES, REGRESSION_LOSSES, LossCall

#: a target value covering at least this share of the valid targets is left out of the
#: alignment (padding, a background class, zeros of a sparse series): it matches anywhere
DOMINANT_SHARE = 0.25
_BINARY_LOSSES = ("binary_cross_entropy_with_logits", "binary_cross_entropy")


@dataclass
class TargetView:
    """The loss targets on a ``(B, T)`` grid.

    Attributes:
        order: ``"bt"`` (flat index ``b * T + t``) or ``"tb"`` (``t * B + b``), or
            ``"bt[f]"`` for feature ``f`` of a ``(B, T, F)`` regression target.
        values: ``(B, T)`` target values.
        rows: ``(B, T)`` index of the loss-input row (class losses: a row of the ``(N, C)``
            scores; regression: an element of the flattened input) that is scored against it.
        valid: ``(B, T)`` False where the loss ignores the target (``ignore_index``).
    """

    order: str
    values: Tensor
    rows: Tensor
    valid: Tensor


def loss_rows(call: LossCall) -> Tensor | None:
    """The loss input as ``(N, C)`` rows, one per target element, or ``None``."""
    x = call.input
    target = call.target
    if not isinstance(target, Tensor):
        return None
    if call.name in CLASS_LOSSES:
        if target.is_floating_point() or x.dim() < 2:
            return None
        rows = x.movedim(1, -1).reshape(-1, x.shape[1])
        return rows if rows.shape[0] == target.numel() else None
    if call.name in REGRESSION_LOSSES or call.name in _BINARY_LOSSES:
        if x.numel() != target.numel() or x.numel() == 0:
            return None
        return x.reshape(-1, 1)
    return None


def ignore_index(call: LossCall) -> int | None:
    """The ``ignore_index`` of a class loss (-100 unless the call says otherwise)."""
    if call.name not in ("cross_entropy", "nll_loss"):
        return None
    value = call.kwargs.get("ignore_index")
    if value is None and len(call.args) > 4:
        value = call.args[4]  # cross_entropy(input, target, weight, size_average, ignore_index, ...)
    return -100 if value is None else int(value)


def target_views(call: LossCall, batch_size: int) -> list[TargetView]:
    """Every ``(B, T)`` reading of the call's target that its shape allows (see module doc)."""
    target = call.target
    if not isinstance(target, Tensor) or target.numel() == 0 or batch_size < 1:
        return []
    if loss_rows(call) is None:
        return []
    n, b = target.numel(), batch_size
    if n % b:
        return []
    t = target.detach()
    ignore = ignore_index(call)
    index = torch.arange(n, device=t.device).reshape(t.shape)
    views: list[TargetView] = []
    grids: list[tuple[str, Tensor, Tensor]] = []
    regression = t.is_floating_point()
    if regression and t.dim() >= 3 and t.shape[0] == b and t.shape[-1] > 1:
        flat_t, flat_i = t.reshape(b, -1, t.shape[-1]), index.reshape(b, -1, t.shape[-1])
        for f in range(min(t.shape[-1], 16)):
            grids.append((f"bt[{f}]", flat_t[..., f], flat_i[..., f]))
    else:
        if t.dim() == 1 or t.shape[0] == b:
            grids.append(("bt", t.reshape(b, -1), index.reshape(b, -1)))
        if n // b > 1 and (t.dim() == 1 or (t.dim() >= 2 and t.shape[1] == b and t.shape[0] != b)):
            grids.append(("tb", t.reshape(-1, b).t(), index.reshape(-1, b).t()))
    for order, values, rows in grids:
        valid = torch.ones_like(values, dtype=torch.bool)
        if ignore is not None and not regression:
            valid = values != ignore
        views.append(TargetView(order, values, rows, valid))
    return views


def dominant_value(values: Tensor, valid: Tensor) -> tuple[Tensor | None, float]:
    """The most frequent valid value and its share of the valid values."""
    v = values[valid]
    if v.numel() == 0:
        return None, 0.0
    uniq, counts = torch.unique(v, return_counts=True)
    i = int(counts.argmax())
    return uniq[i], float(counts[i]) / v.numel()


@dataclass
class Alignment:
    """``target[b, t] == input[b, t + shift, feature]`` on ``match`` of the compared positions."""

    view: TargetView
    source: int
    feature: int
    shift: int
    match: float
    chance: float
    kappa: float
    compared: int
    distinct: int
    #: (B, T) positions where the target equals the input it is aligned with
    hits: Tensor
    #: how many features the aligned source has per position
    source_features: int = 1


def _chance(y: Tensor, x: Tensor) -> float:
    """Probability that a target and an input value drawn independently are equal."""
    both = torch.cat([y, x])
    uniq, inverse = torch.unique(both, return_inverse=True)
    py = torch.bincount(inverse[: y.numel()], minlength=uniq.numel()).double() / max(y.numel(), 1)
    px = torch.bincount(inverse[y.numel() :], minlength=uniq.numel()).double() / max(x.numel(), 1)
    return float((py * px).sum())


def _common_dtype(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    """The less precise of two dtypes (float targets from float64 data vs float32 inputs made
    from the same numbers agree only once both are rounded to float32)."""
    if a == b or not (a.is_floating_point and b.is_floating_point):
        return a
    return a if torch.finfo(a).eps >= torch.finfo(b).eps else b


#: target positions per row that vote for the shifts worth comparing in full
_VOTERS = 4
#: most (feature, shift) candidates compared in full per target view and source
_MAX_CANDIDATES = 8
#: most elements of one (voters, S, F) comparison (bounded memory on long, wide inputs)
_MAX_ELEMENTS = 1 << 24


def _candidates(y: Tensor, valid: Tensor, src: Tensor, min_match: float) -> list[tuple[int, int]]:
    """(feature, shift) pairs worth comparing in full: the first valid targets of each row vote
    for every (shift, feature) where the input holds their value; kept are those that at least
    half the targets able to vote for them (``t + k < S``) voted for. One pass over
    ``(B * 4, S, F)`` (in chunks of :data:`_MAX_ELEMENTS`) instead of a comparison per shift and
    feature."""
    s_len, feats = src.shape[1], src.shape[2]
    rank = valid.long().cumsum(1)
    pick = valid & (rank <= _VOTERS)
    rows, ts = pick.nonzero(as_tuple=True)
    if rows.numel() == 0:
        return []
    votes = torch.zeros(s_len * feats, device=y.device)
    chunk = max(1, _MAX_ELEMENTS // max(s_len * feats, 1))
    for start in range(0, rows.numel(), chunk):
        r, t = rows[start : start + chunk], ts[start : start + chunk]
        p, s, f = (src[r] == y[r, t][:, None, None]).nonzero(as_tuple=True)
        shift = s - t[p]
        ok = shift >= 0
        votes.index_add_(0, shift[ok] * feats + f[ok], torch.ones(int(ok.sum()), device=y.device))
    votes = votes.view(s_len, feats)
    # how many voters could vote for shift k: those with t + k < S
    able = (ts[:, None] + torch.arange(s_len, device=y.device)[None, :] < s_len).sum(0).float()
    share = votes / able.clamp(min=1)[:, None]
    keep = (share >= min(0.5, min_match)) & (votes >= 1)
    ks, fs = keep.nonzero(as_tuple=True)
    order = share[ks, fs].argsort(descending=True)[:_MAX_CANDIDATES]
    return sorted((int(fs[i]), int(ks[i])) for i in order)


def _persistent(x: Tensor) -> bool:
    """At least half of a ``(B, S)`` input's values repeat the previous position's (padding and
    other values covering a quarter of the input left out)."""
    if x.shape[1] < 2:
        return False
    later = x[:, 1:]
    keep = torch.ones_like(later, dtype=torch.bool)
    dom, share = dominant_value(x, torch.ones_like(x, dtype=torch.bool))
    if dom is not None and share >= DOMINANT_SHARE:
        keep = later != dom
    if int(keep.sum()) == 0:
        return False
    return float(((later == x[:, :-1]) & keep).sum()) / int(keep.sum()) >= 0.5


def align(
    views: list[TargetView],
    sources: list[Tensor],
    *,
    min_match: float,
    min_kappa: float,
    min_compared: int,
    min_distinct: int,
    max_features: int = 64,
) -> list[Alignment]:
    """For each (target view, source) pair, the best shift ``k >= 0`` with
    ``target[b, t] == source[b, t + k, f]`` (see :class:`Alignment`), best first.

    ``sources`` are ``(B, S, F)`` value tensors (token ids as ``(B, S, 1)``). A candidate counts
    when the target equals the input on at least ``min_match`` of the compared positions, beats
    chance clearly (``kappa = (match - chance) / (1 - chance) >= min_kappa``, chance being the
    agreement of independently drawn target and input values), on at least ``min_compared``
    positions and ``min_distinct`` distinct values. Targets equal to a value that covers
    :data:`DOMINANT_SHARE` of them (padding, background) are left out: they match anywhere.
    ``k = 0`` is a candidate only where no ``k >= 1`` is: in data with long runs of one value
    the next target often equals the current input too. Token targets of a sequence must line
    up on at least 2 positions per row (a reversed sequence's first target is its last input);
    an alignment on a single position per row must hold on 99% of the rows. An input that
    repeats its previous value at least half the time is not aligned with anything (a
    persistent series repeats its last value into the horizon by itself)."""
    found: list[Alignment] = []
    for view in views:
        y_all = view.values
        integer = not y_all.is_floating_point()
        valid = view.valid.clone()
        dom, share = dominant_value(y_all, valid)
        if dom is not None and share >= DOMINANT_SHARE:
            valid &= y_all != dom
        b, t_len = y_all.shape
        for si, src in enumerate(sources):
            if src.dim() != 3 or src.shape[0] != b or src.is_floating_point() == integer:
                continue
            dtype = _common_dtype(y_all.dtype, src.dtype)
            s_len = src.shape[1]
            best: Alignment | None = None
            for f, k in _candidates(y_all.to(dtype), valid, src[:, :, :max_features].to(dtype), min_match):
                xf = src[:, :, f]
                t_cut = min(t_len, s_len - k)
                if t_cut < 1 or (integer and t_len > 1 and t_cut < 2):
                    # one target position per row lines up with the last input ids: a
                    # reversal or rotation task does that by design; a forecast window that
                    # overlaps the horizon by one step (float values) does not
                    continue
                v = valid[:, :t_cut]
                n = int(v.sum())
                if n < min_compared:
                    continue
                y = y_all[:, :t_cut].to(dtype)
                x = xf[:, k : k + t_cut].to(dtype)
                eq = (y == x) & v
                match = int(eq.sum()) / n
                # one position per row (a single-step target, the last input before the
                # horizon): a persistent series repeats its last value often, a copy always
                if match < (max(min_match, 0.99) if t_cut == 1 else min_match):
                    continue
                if _persistent(xf):
                    # the input mostly repeats its previous value: its next values repeat the
                    # last ones by themselves, and a batch cannot tell that from a copy
                    continue
                distinct = int(torch.unique(y[eq]).numel())
                if distinct < min_distinct:
                    continue
                chance = _chance(y[v], x[v])
                if chance >= 1.0:
                    continue
                kappa = (match - chance) / (1.0 - chance)
                if kappa < min_kappa:
                    continue
                better = (
                    best is None
                    or (best.shift == 0 and k > 0)
                    or ((k > 0 or best.shift == 0) and kappa > best.kappa)
                )
                if better:
                    full = torch.zeros_like(valid)
                    full[:, :t_cut] = eq
                    best = Alignment(view, si, f, k, match, chance, kappa, n, distinct, full, src.shape[2])
            if best is not None:
                found.append(best)
    return sorted(found, key=lambda a: -a.kappa)


def edge_runs(values: Tensor, pad: Tensor) -> tuple[Tensor, Tensor]:
    """Per row of a ``(B, T)`` grid, the length of the run of ``pad`` at its end and at its start."""
    is_pad = values == pad
    t_len = values.shape[1]
    # length of the trailing run: positions from the end until the first non-pad
    rev = is_pad.flip(1).int().cumprod(1)
    trailing = rev.sum(1)
    leading = is_pad.int().cumprod(1).sum(1)
    # a row made only of pad counts once (as trailing)
    leading = torch.where(trailing == t_len, torch.zeros_like(leading), leading)
    return trailing, leading


def row_runs(x: Tensor) -> Tensor:
    """Per row of a ``(B, S, ...)`` input, how many positions at its end repeat its last position."""
    if x.dim() < 2:
        return torch.zeros(x.shape[:1], dtype=torch.long, device=x.device)
    last = x[:, -1:]
    same = x == last
    if same.dim() > 2:
        same = same.flatten(2).all(-1)
    return same.flip(1).int().cumprod(1).sum(1)
