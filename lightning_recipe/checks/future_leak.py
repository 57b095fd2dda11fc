"""FutureLeakCheck: does the output at a position see the input that holds its own target?"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_recipe._probe import (
    ProbeSkip,
    StepFn,
    UserStepError,
    copy_module,
    is_manual_optimization,
    preserved_rng,
    run_step,
    track_hook,
    untrack_hook,
)
from lightning_recipe.batch import BatchLayoutError, Getter
from lightning_recipe.checks._sequence import Alignment, align, loss_rows, target_views
from lightning_recipe.checks.base import FirstBatchCheck
from lightning_recipe.findings import Severity


class FutureLeakCheck(FirstBatchCheck):
    """Chart the dependencies along the time axis with backprop (Karpathy's recipe).

    "An autoregressive model accidentally takes the thing it's trying to predict as an input due
    to an off-by-one bug": a transformer language model called without its causal mask, logits and
    targets shifted differently (``logits[:, 1:]`` scored against ``tokens[:, 1:]`` when the model
    read all of ``tokens``), targets that are the input itself, a forecast window that includes the
    forecast day. The loss falls below what any honest model can reach and nothing raises. On the
    first training batch, on a copy in eval mode, the check finds the shift ``k`` with
    ``target[t] == input[t + k]`` (token ids at the first ``nn.Embedding``, or a float ``(B, S, F)``
    input; no alignment, nothing to chart) and back-propagates the scores of a few targets ``t`` to
    measure how much they depend on input position ``t + k``.

    Reports ``future-leak`` (error) when that dependence exceeds ``tolerance`` for ``k >= 1``: the
    output sees the future input that holds its own target. For ``k = 0`` (targets equal to the
    input) only when the model is otherwise causal: an autoregressive model trained without the
    shift. Bidirectional models with ``k = 0`` (denoisers, masked language models) stay quiet.

    Thresholds: see docs/thresholds.md#future-leak.

    Args:
        max_batch: cut the batch to at most this many samples (>= 1).
        num_positions: aligned positions probed per sample (>= 1), one backward pass each.
        tolerance: largest gradient (fraction of the sample's strongest) counted as float noise.
        min_match: smallest share of targets equal to the shifted input that counts as aligned.
        get_input, get_target, step_fn, on_error: see :class:`FirstBatchCheck`.

    Example::

        trainer = L.Trainer(callbacks=[FutureLeakCheck()])
        trainer.fit(model, datamodule)
        # [future-leak] The scores for target t depend on the input at position t+1 (embedding
        # 'emb'), which holds that very target ...
    """

    codes = ("future-leak",)

    what = "chart the dependencies along the time axis"

    def __init__(
        self,
        max_batch: int = 16,
        num_positions: int = 3,
        tolerance: float = 1e-4,
        min_match: float = 0.9,
        *,
        get_input: Getter | None = None,
        get_target: Getter | None = None,
        step_fn: StepFn | None = None,
        on_error: str = "warn",
    ) -> None:
        super().__init__(get_input=get_input, get_target=get_target, step_fn=step_fn, on_error=on_error)
        for name, value in (("max_batch", max_batch), ("num_positions", num_positions)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive int, got {value!r}")
        for name, value in (("tolerance", tolerance), ("min_match", min_match)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
                raise ValueError(f"`{name}` must be a number in (0, 1), got {value!r}")
        self.max_batch = max_batch
        self.num_positions = num_positions
        self.tolerance = float(tolerance)
        self.min_match = float(min_match)

    # ------------------------------------------------------------------ one-shot API
    def check(self, trainer: Any | None, module: nn.Module, batch: Any) -> None:
        """Chart the time dependencies on ``batch`` and report a leak (also with ``trainer=None``)."""
        start = time.perf_counter()
        if self.step_fn is None and is_manual_optimization(module):
            raise ProbeSkip(
                "the module uses manual optimisation, so its training_step steps the optimizers; "
                "pass step_fn=lambda model, batch: loss to chart the dependencies"
            )
        n = self.adapter.batch_size(batch)
        with preserved_rng():
            chart = self._chart(trainer, module, batch, n)
        self.figures["seconds"] = round(time.perf_counter() - start, 4)
        if not chart:
            return
        shown = next((one for one in chart if self._judge(trainer, one)), chart[0])
        known = [v for v in shown.later if v == v]
        self.figures.update(
            {
                "shift": shown.alignment.shift,
                "match": round(shown.alignment.match, 4),
                "reads": shown.source,
                "leak": max(shown.at),
                "later": max(known) if known else None,
            }
        )

    # ------------------------------------------------------------------ measuring
    def _chart(self, trainer: Any | None, module: nn.Module, batch: Any, n: int) -> list[_Chart] | None:
        k = min(n, self.max_batch)
        sizes = [k] if k == n else [k, n]
        for attempt, size in enumerate(sizes):
            model = copy_module(module, trainer)
            model.eval()
            for p in model.parameters():
                p.requires_grad_(False)
            sub = self.adapter.slice(batch, size) if size < n else batch
            try:
                return self._chart_on(model, sub, size)
            except ProbeSkip as why:
                if isinstance(why, UserStepError) and attempt + 1 < len(sizes):
                    continue  # the model may need the full batch (a hard-coded batch size)
                raise
            except Exception as exc:
                if attempt + 1 < len(sizes):
                    continue  # the model may need the full batch (a hard-coded batch size)
                raise ProbeSkip(
                    f"training_step failed on the model copy in eval mode ({type(exc).__name__}: {exc})"
                ) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def _chart_on(self, model: nn.Module, batch: Any, b: int) -> list[_Chart] | None:
        reader = _Reader(b)
        x = self.adapter.input(batch)
        if x.is_floating_point() and x.dim() in (2, 3) and x.shape[0] == b:
            leaf = x.detach().clone().requires_grad_(True)
            try:
                batch = self.adapter.with_input(batch, leaf)
                reader.sources.append(_Source("the input", leaf, leaf.detach(), False, x.dim() == 2))
            except BatchLayoutError:
                pass  # a computed get_input: only embeddings can be charted
        with reader.attached(model), torch.enable_grad():
            result = run_step(model, batch, self.step_fn)
        call = result.main_call
        if call is None or not isinstance(call.target, Tensor):
            self.figures["aligned"] = "no loss call with a target tensor"
            return None
        rows = loss_rows(call)
        views = target_views(call, b)
        if rows is None or not views or not reader.sources:
            self.figures["aligned"] = (
                "no sequence input (embedding of (B, S) ids or (B, S, F) floats)"
                if not reader.sources
                else f"the {call.name} call's targets are not per-position"
            )
            return None
        seq_views = [v for v in views if v.values.shape[1] > 1]
        one_views = [v for v in views if v.values.shape[1] == 1]
        options = {"min_match": self.min_match, "min_kappa": 0.5, "min_compared": 16, "min_distinct": 3}
        # a (B, S) float input is a sequence only when the targets are one too (else a table)
        found = align(seq_views, [s.values3 for s in reader.sources], **options)
        singles = [s.values3[:0] if s.tabular_like else s.values3 for s in reader.sources]
        found += align(one_views, singles, **options)
        found = [a for a in sorted(found, key=lambda a: -a.kappa) if a.shift > 0 or a.match >= 0.99][:3]
        self.figures["aligned"] = bool(found)
        if not found:
            return None
        if not rows.requires_grad:
            raise ProbeSkip(f"the input of {call.name} does not depend on the sequence the model reads")
        charts = []
        for al in found:
            chart = self._probe(rows, al, reader.sources[al.source], call.name)
            if chart is not None:
                charts.append(chart)
        if not charts:
            raise ProbeSkip(
                f"the scores passed to {call.name} do not depend on the input their targets are copied from"
            )
        self.figures["alignments"] = [
            {
                "reads": c.source,
                "shift": c.alignment.shift,
                "match": round(c.alignment.match, 4),
                "leak": max(c.at),
                "later": max([v for v in c.later if v == v], default=None),
            }
            for c in charts
        ]
        return charts

    def _probe(self, rows: Tensor, al: Alignment, source: _Source, loss_name: str) -> _Chart | None:
        b = al.hits.shape[0]
        s_len = source.values3.shape[1]
        picks: list[list[int]] = []
        for i in range(b):
            ts = al.hits[i].nonzero().flatten().tolist()
            if al.shift == 0:
                ts = [t for t in ts if t + 1 < s_len] or ts
            picks.append(_spread(ts, self.num_positions))
        g = torch.Generator(device="cpu").manual_seed(0)
        at, later, dead = [], [], 0
        for j in range(self.num_positions):
            chosen = [(i, p[j]) for i, p in enumerate(picks) if j < len(p)]
            if not chosen:
                break
            weights = torch.randn(len(chosen), rows.shape[1], generator=g).to(rows.device, rows.dtype)
            index = torch.tensor([int(al.view.rows[i, t]) for i, t in chosen], device=rows.device)
            objective = (rows[index] * weights).sum()
            (grad,) = torch.autograd.grad(objective, source.leaf, retain_graph=True, allow_unused=True)
            if grad is None:
                dead += len(chosen)
                continue
            mag = source.magnitude(grad)  # (B, S, F) on the sample-major grid
            for i, t in chosen:
                top = float(mag[i].max())
                if not (0 < top < float("inf")):  # no dependence at all, or NaN/Inf gradients
                    dead += 1
                    continue
                pos = min(t + al.shift, s_len - 1)
                feature = al.feature if mag.shape[2] > 1 else 0
                at.append(float(mag[i, pos, feature]) / top)
                later.append(float(mag[i, t + 1 :].max()) / top if t + 1 < s_len else float("nan"))
        if not at:
            return None
        return _Chart(al, source.name, loss_name, at, later, dead)

    # ------------------------------------------------------------------ verdict
    def _judge(self, trainer: Any | None, chart: _Chart) -> bool:
        """Report a leak seen in ``chart``; True if one was reported."""
        al = chart.alignment
        leak = max(chart.at)
        known = [v for v in chart.later if v == v]
        later = max(known) if known else float("nan")
        evidence = {
            "shift": al.shift,
            "match": al.match,
            "chance": al.chance,
            "positions_compared": al.compared,
            "reads": chart.source,
            "target_layout": al.view.order,
            "leak": leak,
            "leaks": chart.at,
            "later_dependence": later,
            "tolerance": self.tolerance,
        }
        where = f"{al.match:.0%} of {al.compared} positions"
        what = chart.source if chart.source == "the input" else f"the output of embedding '{chart.source}'"
        if al.view.values.shape[1] == 1 and al.shift >= 1 and leak > self.tolerance:
            feature = f", feature {al.feature}" if al.source_features > 1 else ""
            self.report(
                trainer,
                "future-leak",
                Severity.ERROR,
                f"The prediction depends on {what} at position {al.shift}{feature} (gradient {leak:.3g} of "
                f"the largest), and that position holds the target itself (target == input[{al.shift}] "
                f"on {al.match:.0%} of {al.compared} samples): the input window includes the value to "
                "predict, so the loss is meaningless; end the window before the first forecast step "
                "(an off-by-one in the slicing).",
                evidence,
            )
            return True
        if al.shift >= 1 and leak > self.tolerance:
            self.report(
                trainer,
                "future-leak",
                Severity.ERROR,
                f"The output scored against target t depends on {what} at position t+{al.shift} "
                f"(gradient {leak:.3g} of the largest; healthy causal models give exactly 0), and that "
                f"position holds the target itself (target[t] == input[t+{al.shift}] on {where}): the "
                "model sees what it is asked to predict and its loss is meaningless; add the causal mask "
                "(attention to positions <= t only), feed tokens[:, :-1] and score logits[:, t] against "
                "tokens[:, t+1] (not logits[:, 1:] of a model fed all tokens), or end a forecast window "
                "before the first forecast step.",
                evidence,
            )
            return True
        if al.shift == 0 and leak > self.tolerance and known and later <= self.tolerance:
            self.report(
                trainer,
                "future-leak",
                Severity.ERROR,
                f"Each target is the input at its own position (on {where}) and the model is causal "
                "(no output depends on a later position), so it is asked to predict a token it already "
                "reads: an autoregressive model trained without the shift; feed tokens[:, :-1] and use "
                "tokens[:, 1:] as the targets.",
                evidence,
            )
            return True
        return False


# ---------------------------------------------------------------------------- helpers
@dataclass
class _Source:
    """A sequence the model reads, as a leaf that takes a gradient."""

    name: str
    leaf: Tensor
    values: Tensor  # ids (B, S) / (S, B) or float (B, S[, F]), as read
    time_first: bool
    tabular_like: bool = False
    values3: Tensor = field(init=False)

    def __post_init__(self) -> None:
        v = self.values.t() if self.time_first else self.values
        self.values3 = v.unsqueeze(-1) if v.dim() == 2 else v

    def magnitude(self, grad: Tensor) -> Tensor:
        """Per (sample, position, feature) size of a gradient w.r.t. the leaf, sample-major."""
        g = grad.detach().float()
        if self.time_first:
            g = g.transpose(0, 1)
        if not self.values.is_floating_point():  # embedding output (B, S, D): one value per position
            return g.flatten(2).norm(dim=-1, keepdim=True)
        return (g.abs() if g.dim() == 3 else g.abs().unsqueeze(-1)).float()


class _Reader:
    """Replaces the output of every embedding called on ``(B, S)`` / ``(S, B)`` ids with a leaf
    that takes a gradient, and remembers the ids as a sequence the model reads."""

    def __init__(self, b: int) -> None:
        self.b = b
        self.sources: list[_Source] = []

    @contextmanager
    def attached(self, model: nn.Module) -> Iterator[None]:
        handles = [
            track_hook(m.register_forward_hook(self._hook(name or type(m).__name__)))
            for name, m in model.named_modules()
            if isinstance(m, nn.Embedding)
        ]
        try:
            yield
        finally:
            for h in handles:
                untrack_hook(h)

    def _hook(self, name: str) -> Any:
        def hook(mod: nn.Module, args: Any, out: Any) -> Any:
            ids = args[0] if args else None
            if not isinstance(ids, Tensor) or ids.dim() != 2 or ids.is_floating_point():
                return None
            if not isinstance(out, Tensor) or out.dim() != 3 or len(self.sources) >= 8:
                return None
            if ids.shape[0] == self.b:
                time_first = False
            elif ids.shape[1] == self.b:
                time_first = True
            else:
                return None
            leaf = out.detach().clone().requires_grad_(True)
            self.sources.append(_Source(name, leaf, ids.detach(), time_first))
            return leaf

        return hook


@dataclass
class _Chart:
    alignment: Alignment
    source: str
    loss: str
    at: list[float]
    later: list[float]
    dead: int


def _spread(items: list[int], m: int) -> list[int]:
    """``m`` items spread evenly over ``items`` (first and last included)."""
    if len(items) <= m:
        return items
    if m == 1:
        return [items[len(items) // 2]]
    return [items[round(j * (len(items) - 1) / (m - 1))] for j in range(m)]
