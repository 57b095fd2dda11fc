"""GradientCheck: compare the analytic gradient with a centred numeric one, in float64."""

from __future__ import annotations

import contextlib
import io
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_recipe._probe import (
    HookSet,
    ProbeSkip,
    StepFn,
    StepResult,
    UserStepError,
    copy_module,
    default_dtype,
    is_manual_optimization,
    preserved_rng,
    run_step,
    seed_rngs,
)
from lightning_recipe._validate import check_int, check_number
from lightning_recipe.batch import Getter, to_dtype
from lightning_recipe.checks._float64 import _double_plain_state, _Float32IsFloat64, _keep_stop_gradients
from lightning_recipe.checks.base import FirstBatchCheck
from lightning_recipe.findings import Severity

#: float64 machine epsilon
EPS64 = float(torch.finfo(torch.float64).eps)
#: safety factor of the round-off allowance K * eps * |f| / h (docs/thresholds.md#gradient-check)
ROUNDOFF_FACTOR = 100.0
#: a disagreeing coordinate is retried with h / KINK_RETRY while that stays >= MIN_STEP
KINK_RETRY = 10.0
MIN_STEP = 1e-7
#: tensors whose gradient norm is below this fraction of the largest one weigh less in the
#: projection round (their direction would otherwise move them by huge steps)
PROJECTION_FLOOR = 1e-3
#: the name the projection round's result goes by
PROJECTION = "every tensor (projected)"
#: float inputs are moved by this fraction of their std so no exact tie (a constant image
#: background feeding max-pool) sits on the check point; much larger than any step h
INPUT_JITTER = 1e-3


class GradientCheck(FirstBatchCheck):
    """Gradient check (cs231n): analytic vs centred numeric gradients on a float64 copy.

    A custom layer or ``torch.autograd.Function`` whose ``backward`` is wrong (a factor of 2, the
    wrong sign, a forgotten term) trains, badly, without any error. On the first training batch
    the check compares autograd with ``(f(x + h) - f(x - h)) / 2h`` on a float64 copy of the model
    in eval mode, ``f`` being the data loss (regularisers left out) with every RNG reseeded before
    each evaluation, on a few samples and a few coordinates of every parameter tensor and of a
    float input. Float64 round-off is allowed for, stop-gradients (``detach``, ``no_grad``) count
    as design, and a coordinate on a kink (ReLU, max-pool) is retried with smaller steps and
    counted as a kink, not a failure. A model that cannot run in float64 is skipped.

    Reports ``gradcheck-failed`` with the relative error ``|a - n| / max(|a|, |n|)``: an error above
    ``error_above``, a warning above ``warn_above`` (cs231n's bands), naming the tensors above the
    bands and where in forward order the faulty backward sits (``figures["relative_error"]`` holds
    the worst error per module and tensor). Coordinates are visited round-robin over the tensors
    within ``max_seconds``; what the budget left out is a ``check-skipped`` info finding.

    Thresholds: see docs/thresholds.md#gradient-check.

    Args:
        num_samples: samples of the first batch to use (>= 1).
        coords_per_tensor: coordinates checked per parameter tensor and in the input (>= 1).
        step_size: the finite-difference step ``h`` (in (0, 1e-2]).
        warn_above: relative error above which a gradient is suspicious.
        error_above: relative error above which a gradient is wrong (> ``warn_above``).
        max_seconds: time budget of the evaluations (> 0).
        seed: seed of the coordinate choice and of every evaluation of ``f``.
        get_input, get_target, step_fn, on_error: see :class:`FirstBatchCheck`.

    Example::

        trainer = L.Trainer(callbacks=[GradientCheck()])
        trainer.fit(model, datamodule)
        # [gradcheck-failed] The analytic gradient disagrees with the centred numeric one (float64,
        # 2 samples, h=1e-05): worst relative error per tensor input 1.1, features.0.weight 0.16,
        # ...; check the backward of the custom autograd Functions / layers between 'head.2.bias'
        # and 'head.4.weight' in forward order.
    """

    codes = ("gradcheck-failed",)

    what = "check the gradients"

    def __init__(
        self,
        num_samples: int = 2,
        coords_per_tensor: int = 3,
        step_size: float = 1e-5,
        warn_above: float = 1e-4,
        error_above: float = 1e-2,
        max_seconds: float = 10.0,
        seed: int = 0,
        *,
        get_input: Getter | None = None,
        get_target: Getter | None = None,
        step_fn: StepFn | None = None,
        on_error: str = "warn",
    ) -> None:
        super().__init__(get_input=get_input, get_target=get_target, step_fn=step_fn, on_error=on_error)
        check_int("num_samples", num_samples)
        check_int("coords_per_tensor", coords_per_tensor)
        check_number("step_size", step_size, 0.0, 1e-2, low_open=True)
        check_number("warn_above", warn_above, 0.0, 1.0, low_open=True)
        check_number("error_above", error_above, 0.0, 10.0, low_open=True)
        if error_above <= warn_above:
            raise ValueError(
                f"`error_above` must be larger than `warn_above`, got {error_above!r} <= {warn_above!r}"
            )
        check_number("max_seconds", max_seconds, 0.0, None, low_open=True)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"`seed` must be an int, got {seed!r}")
        self.num_samples = num_samples
        self.coords_per_tensor = coords_per_tensor
        self.step_size = float(step_size)
        self.warn_above = float(warn_above)
        self.error_above = float(error_above)
        self.max_seconds = float(max_seconds)
        self.seed = seed

    # ------------------------------------------------------------------ one-shot API
    def check(self, trainer: Any | None, module: nn.Module, batch: Any) -> None:
        """Gradient-check the model on the first samples of ``batch`` (also with ``trainer=None``)."""
        start = time.perf_counter()
        if self.step_fn is None and is_manual_optimization(module):
            raise ProbeSkip(
                "the module uses manual optimisation, so its training_step steps the optimizers; "
                "pass step_fn=lambda model, batch: loss to check the gradients"
            )
        sub = self.adapter.slice(batch, self.num_samples)
        n = self.adapter.batch_size(sub)
        model = copy_module(module, trainer)
        try:
            model.double()
        except Exception as exc:
            raise ProbeSkip(f"the model cannot be cast to float64 ({type(exc).__name__}: {exc})") from exc
        _double_plain_state(model)
        model.eval()
        batch64 = self._generic_point(to_dtype(sub, torch.float64))
        with preserved_rng(), default_dtype(torch.float64), _Float32IsFloat64():
            run = _Run(self, model, batch64, n, start)
            run.analytic()
            run.numeric()
        self._judge(trainer, run, time.perf_counter() - start)

    def _generic_point(self, batch: Any) -> Any:
        """Jitter a float input by ``INPUT_JITTER`` of its std (seeded), so the check runs at a
        generic point. Images with constant backgrounds put max-pool and ReLU exactly on ties;
        several tied kinks summed through a conv are not one kink, no step size removes them,
        and autograd's tie-break matches neither one-sided slope (docs/thresholds.md#gradient-check)."""
        x = self.adapter.input(batch)
        if not x.is_floating_point():
            return batch
        gen = torch.Generator().manual_seed(self.seed)
        scale = float(x.detach().std()) if x.numel() > 1 else 0.0
        noise = torch.randn(x.shape, generator=gen, dtype=x.dtype).to(x.device)
        return self.adapter.with_input(batch, x + INPUT_JITTER * (scale or 1.0) * noise)

    # ------------------------------------------------------------------ judging
    def _judge(self, trainer: Any | None, run: _Run, seconds: float) -> None:
        worst = run.worst()
        grouped: dict[str, dict[str, float]] = {}
        for name, rel in worst.items():
            mod, _, leaf = name.rpartition(".")
            grouped.setdefault(mod or name, {})[leaf if mod else "value"] = rel
        kinks = sum(1 for c in run.coords if c.kink)
        self.figures.update(
            {
                "relative_error": grouped,
                "max_relative_error": max(worst.values(), default=0.0),
                "coordinates": len(run.coords),
                "kinks": kinks,
                "evaluations": run.evaluations,
                "samples": run.n,
                "loss": run.f0,
                "loss_fn": run.loss_name,
                "step_size": self.step_size,
                "roundoff_allowance": run.allowance(run.f0, self.step_size),
                "seconds": seconds,
            }
        )
        proj = run.projected
        if proj is not None:
            self.figures["projection"] = {
                "relative_error": 0.0 if proj.kink else proj.rel,
                "tensors": run.projected_tensors,
                "analytic": proj.analytic,
                "numeric": proj.numeric,
                "kink": proj.kink,
            }
        if run.left_out:
            self._report_budget(trainer, run)
        bad = {k: v for k, v in worst.items() if v > self.warn_above}
        if not bad:
            if proj is not None and not proj.kink and proj.rel > self.warn_above:
                self._report_projection(trainer, run, proj)
            return
        severity = Severity.ERROR if max(bad.values()) > self.error_above else Severity.WARNING
        self._report_failure(trainer, run, bad, worst, severity)

    def _report_failure(
        self,
        trainer: Any | None,
        run: _Run,
        bad: dict[str, float],
        worst: dict[str, float],
        severity: Severity,
    ) -> None:
        order = run.forward_order()
        failing = sorted(bad, key=order)
        passing = sorted((k for k in worst if k not in bad), key=order)
        deepest = failing[-1]
        after = [p for p in passing if order(p) > order(deepest)]
        top = max(
            (c for c in run.coords if not c.kink and c.tensor in bad),
            key=lambda c: c.rel,
        )
        where = (
            f"between '{deepest}' and '{after[0]}' in forward order"
            if after
            else f"at or after '{deepest}' (up to the loss)"
        )
        listed = ", ".join(f"{k} {bad[k]:.2g}" for k in failing[:6])
        more = f" and {len(failing) - 6} more" if len(failing) > 6 else ""
        verdict = "wrong" if severity is Severity.ERROR else "suspicious"
        message = (
            f"The analytic gradient disagrees with the centred numeric one (float64, {run.n} samples, "
            f"h={self.step_size:g}): worst relative error per tensor {listed}{more}, so the gradient is "
            f"{verdict} (relative error > {self.error_above:g} is wrong, > {self.warn_above:g} suspicious); "
            f"e.g. {top.tensor}{list(top.index)}: analytic {top.analytic:.6g} vs numeric {top.numeric:.6g}. "
            f"{len(passing)} tensor{'s' if len(passing) != 1 else ''} pass; check the backward of the custom "
            f"autograd Functions / layers {where}."
        )
        evidence = {
            "worst_relative_error": {k: bad[k] for k in failing},
            "passing": passing,
            "worst_coordinate": {
                "tensor": top.tensor,
                "index": list(top.index),
                "analytic": top.analytic,
                "numeric": top.numeric,
                "relative_error": top.rel,
                "step_size": top.h,
            },
            "faulty_backward_after": deepest,
            "faulty_backward_before": after[0] if after else None,
            "samples": run.n,
            "loss": run.f0,
            "thresholds": {"warn_above": self.warn_above, "error_above": self.error_above},
        }
        self.report(trainer, "gradcheck-failed", severity, message, evidence)

    def _report_projection(self, trainer: Any | None, run: _Run, proj: _Coord) -> None:
        severity = Severity.ERROR if proj.rel > self.error_above else Severity.WARNING
        verdict = "wrong" if severity is Severity.ERROR else "suspicious"
        checked = len({c.tensor for c in run.coords})
        message = (
            f"The analytic gradient disagrees with the centred numeric one along a direction through "
            f"all {run.projected_tensors} tensors with a gradient (float64, {run.n} samples, h={proj.h:g}): "
            f"relative error {proj.rel:.2g} (analytic {proj.analytic:.6g} vs numeric {proj.numeric:.6g}), so "
            f"the gradient is {verdict} (> {self.error_above:g} is wrong, > {self.warn_above:g} suspicious); "
            f"the coordinates checked within the budget ({len(run.coords)}, in {checked} tensors) all "
            "agree, so the faulty backward is in a tensor they missed: raise max_seconds to locate it."
        )
        evidence = {
            "projection": self.figures.get("projection"),
            "samples": run.n,
            "loss": run.f0,
            "thresholds": {"warn_above": self.warn_above, "error_above": self.error_above},
        }
        self.report(trainer, "gradcheck-failed", severity, message, evidence)

    def _report_budget(self, trainer: Any | None, run: _Run) -> None:
        missing = sorted({name for name, _ in run.left_out})
        unchecked = [m for m in missing if m not in {c.tensor for c in run.coords}]
        reason = (
            f"the {self.max_seconds:g} s budget ran out after {len(run.coords)} of "
            f"{len(run.coords) + len(run.left_out)} coordinates ({run.evaluations} evaluations)"
        )
        self.figures["budget"] = reason
        self.figures["unchecked_tensors"] = unchecked
        if run.projected is not None:
            # every tensor with a gradient was checked along the projection: a measurement
            # with fewer coordinates than asked for, not a skip (figures keep what was cut)
            return
        detail = (
            f"; {len(unchecked)} tensors were not checked at all: {', '.join(unchecked[:8])}"
            if unchecked
            else ""
        )
        self.report(
            trainer,
            "check-skipped",
            Severity.INFO,
            f"GradientCheck checked only part of the gradients: {reason}{detail}; raise max_seconds or "
            "lower coords_per_tensor.",
            {"reason": reason, "unchecked_tensors": unchecked, "checked": len(run.coords)},
        )


# ---------------------------------------------------------------------------- the measurement
@dataclass
class _Coord:
    tensor: str
    index: tuple[int, ...]
    analytic: float
    numeric: float
    rel: float
    h: float
    kink: bool = False


@dataclass
class _Target:
    """A tensor whose coordinates are checked: a parameter of the copy or the input."""

    name: str
    value: Tensor
    grad: Tensor
    is_input: bool = False
    picks: list[tuple[int, ...]] = field(default_factory=list)


class _Run:
    """One gradient check: the analytic pass, then the numeric evaluations."""

    def __init__(self, owner: GradientCheck, model: nn.Module, batch: Any, n: int, start: float) -> None:
        self.owner = owner
        self.model = model
        self.batch = batch
        self.n = n
        self.start = start
        self.adapter = owner.adapter
        self.targets: list[_Target] = []
        self.coords: list[_Coord] = []
        self.left_out: list[tuple[str, tuple[int, ...]]] = []
        self.evaluations = 0
        self.call_index: int | None = None
        #: the position of the loss among the module / distribution loss calls, when it is one
        self.module_index: int | None = None
        self.loss_name = "training_step"
        self.f0 = 0.0
        self._order: dict[str, int] = {}
        self._x: Tensor | None = None
        #: the projection round's result (``None`` when no tensor has a gradient)
        self.projected: _Coord | None = None
        self.projected_tensors = 0
        self._direction: list[tuple[_Target, Tensor]] = []

    # -------------------------------------------------------------- f
    def reseed(self) -> None:
        seed_rngs(self.owner.seed)

    def data_loss(self, result: StepResult) -> Tensor | None:
        """The loss call found in the analytic pass (same position), else the data loss."""
        if self.call_index is not None and self.call_index < len(result.calls):
            out = result.calls[self.call_index].output
            return out if out.dim() == 0 else out.mean()
        if self.module_index is not None and self.module_index < len(result.module_calls):
            return result.module_calls[self.module_index].output.reshape(())
        return result.data_loss

    def f(self, batch: Any) -> float:
        """The data loss at ``batch``, from the same seed every time; what the step prints is
        swallowed (it runs dozens of times on the copy)."""
        self.reseed()
        self.evaluations += 1
        with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
            result = run_step(self.model, batch, self.owner.step_fn)
        loss = self.data_loss(result)
        if loss is None:
            raise ProbeSkip("training_step returned no loss on the float64 copy")
        return float(loss)

    # -------------------------------------------------------------- analytic
    def analytic(self) -> None:
        try:
            self._gradients(with_input=True)
        except _InputGraphBroken:
            # an in-place operation on a tensor computed from the input (a scaler normalising
            # the batch in place) breaks the graph only because the check made the input
            # require a gradient: check the parameters alone
            self.targets = []
            self._x = None
            self._gradients(with_input=False)
        self._check_reproducible()

    def _gradients(self, with_input: bool) -> None:
        x = self.adapter.input(self.batch)
        batch = self.batch
        leaf = None
        if x.is_floating_point() and with_input:
            leaf = x.detach().clone().requires_grad_(True)
            batch = self.adapter.with_input(self.batch, leaf)
            self._x = x.detach()
        params = [(name, p) for name, p in self.model.named_parameters() if p.requires_grad]
        if not params and leaf is None:
            raise ProbeSkip("the model has no trainable parameters and the input is not float")
        self.reseed()
        with _DtypeWatch(self.model) as watch:
            try:
                with torch.enable_grad(), _keep_stop_gradients():
                    result = run_step(self.model, batch, self.owner.step_fn)
            except UserStepError as why:
                raise ProbeSkip(
                    f"{why} (the float64 copy); a model that cannot run in float64 cannot be gradient-checked"
                ) from why
            except ProbeSkip:
                raise
            except Exception as exc:
                raise ProbeSkip(
                    f"training_step failed on the float64 copy of the model ({type(exc).__name__}: {exc}); "
                    "a model that cannot run in float64 cannot be gradient-checked"
                ) from exc
        self.evaluations += 1
        main = result.main_call
        if main is not None:
            self.call_index = next((i for i, c in enumerate(result.calls) if c is main), None)
            self.module_index = next((i for i, c in enumerate(result.module_calls) if c is main), None)
            self.loss_name = main.name
        loss = result.data_loss
        if loss is None:
            raise ProbeSkip("training_step returned None on the first batch")
        if loss.dtype != torch.float64 or watch.low:
            where = f"module '{watch.low[0]}'" if watch.low else "the loss"
            raise ProbeSkip(
                f"the model cannot run in float64: {where} still computes in "
                f"{watch.low_dtype or loss.dtype} on the float64 copy (a hard-coded .float()?), and a "
                "float32 gradient check would give false alarms"
            )
        if not loss.requires_grad:
            raise ProbeSkip("the data loss does not depend on any trainable parameter or the input")
        self._order = watch.param_order(self.model)
        inputs = ([leaf] if leaf is not None else []) + [p for _, p in params]
        try:
            grads = torch.autograd.grad(loss, inputs, allow_unused=True)
        except RuntimeError as exc:
            if leaf is not None and params and "inplace" in str(exc):
                raise _InputGraphBroken(str(exc)) from exc
            raise ProbeSkip(
                f"autograd failed on the float64 copy of the model ({type(exc).__name__}: {exc})"
            ) from exc
        names = (["input"] if leaf is not None else []) + [name for name, _ in params]
        values = ([x.detach()] if leaf is not None else []) + [p for _, p in params]
        for name, value, grad in zip(names, values, grads):
            g = torch.zeros_like(value) if grad is None else grad.detach()
            self.targets.append(_Target(name, value, g, is_input=name == "input" and leaf is not None))

    def _check_reproducible(self) -> None:
        self.f0 = self.f(self.batch)
        again = self.f(self.batch)
        if abs(again - self.f0) > ROUNDOFF_FACTOR * EPS64 * max(abs(self.f0), abs(again)):
            raise ProbeSkip(
                f"the data loss is not reproducible: two evaluations at the same point gave {self.f0:.10g} "
                f"and {again:.10g} although every RNG was reseeded (state changed by the step, or a random "
                "generator of the model's own), so finite differences would measure noise"
            )
        self._pick()

    def _pick(self) -> None:
        gen = torch.Generator().manual_seed(self.owner.seed)
        m = self.owner.coords_per_tensor
        for t in self.targets:
            numel = t.value.numel()
            if numel == 0:
                continue
            pool_size = min(numel, 8 * m)
            if numel <= 4096:
                pool = torch.randperm(numel, generator=gen)[:pool_size]
            else:
                pool = torch.unique(torch.randint(0, numel, (pool_size,), generator=gen))
                pool = pool[torch.randperm(len(pool), generator=gen)]
            flat = t.grad.reshape(-1)[pool.to(t.grad.device)].abs().cpu()
            first = int(torch.argmax(flat))
            chosen = [int(pool[first])] + [int(v) for i, v in enumerate(pool.tolist()) if i != first]
            shape = tuple(t.value.shape)
            t.picks = [_unravel(c, shape) for c in chosen[:m]]

    # -------------------------------------------------------------- numeric
    def projection(self) -> None:
        """Round 0, whatever the budget: the derivative along one direction through every tensor
        with a gradient, ``d_t = g_t / (|g_t| max(|g_t|, floor))`` scaled to a largest entry of
        1, so each tensor adds about as much to the analytic ``g . d`` (a wrong backward in any
        of them moves the sum) for two evaluations (PyTorch's fast gradcheck projects the same
        way). The coordinate rounds then localise what it finds, as the budget allows."""
        live = [t for t in self.targets if t.grad.numel() and bool((t.grad != 0).any())]
        if not live:
            return
        norms = [float(t.grad.norm()) for t in live]
        floor = PROJECTION_FLOOR * max(norms)
        dirs = [t.grad / (n * max(n, floor)) for t, n in zip(live, norms)]
        scale = max(float(d.abs().max()) for d in dirs)
        dirs = [d / scale for d in dirs]
        a = sum(float((t.grad * d).sum()) for t, d in zip(live, dirs))
        self._direction = list(zip(live, dirs))
        self.projected_tensors = len(live)
        h = self.owner.step_size
        first = last = self._measure_direction(a, h)
        while last.rel > self.owner.warn_above and h / KINK_RETRY >= MIN_STEP * 0.999:
            h /= KINK_RETRY
            last = self._measure_direction(a, h)
            if last.rel <= self.owner.warn_above:
                last.kink = True
                self.projected = last
                return
        first.kink = last.kink
        self.projected = first

    def _f_along(self, step: float) -> float:
        batch = self.batch
        saved: list[tuple[Tensor, Tensor]] = []
        with torch.no_grad():
            for t, d in self._direction:
                if t.is_input:
                    assert self._x is not None
                    batch = self.adapter.with_input(self.batch, self._x + step * d)
                else:
                    saved.append((t.value, t.value.detach().clone()))
                    t.value.add_(step * d)
        try:
            return self.f(batch)
        finally:
            with torch.no_grad():
                for value, old in saved:
                    value.copy_(old)

    def _measure_direction(self, a: float, h: float) -> _Coord:
        fp, fm = self._f_along(h), self._f_along(-h)
        n = (fp - fm) / (2 * h)
        allow = self.allowance(max(abs(fp), abs(fm), abs(self.f0)), h)
        rel = relative_error(a, n, allow)
        kink = rel > self.owner.warn_above and _at_kink(a, fp, self.f0, fm, h, allow)
        return _Coord(PROJECTION, (), a, n, rel, h, kink)

    def numeric(self) -> None:
        self.projection()
        rounds = max((len(t.picks) for t in self.targets), default=0)
        queue = [(t, t.picks[r]) for r in range(rounds) for t in self.targets if r < len(t.picks)]
        for pos, (target, index) in enumerate(queue):
            if time.perf_counter() - self.start > self.owner.max_seconds:
                self.left_out = [(t.name, i) for t, i in queue[pos:]]
                return
            self.coords.append(self._check_coord(target, index))

    def _f_at(self, target: _Target, index: tuple[int, ...], value: float) -> float:
        if target.is_input:
            assert self._x is not None
            x = self._x.clone()
            x[index] = value
            return self.f(self.adapter.with_input(self.batch, x))
        p = target.value
        with torch.no_grad():
            old = p[index].clone()
            p[index] = value
        try:
            return self.f(self.batch)
        finally:
            with torch.no_grad():
                p[index] = old

    def _check_coord(self, target: _Target, index: tuple[int, ...]) -> _Coord:
        """Measure one coordinate. A disagreement is retried with steps h/10, h/100, ... down to
        MIN_STEP: an artefact of the step (a kink crossed, curvature) goes away once the step is
        small enough, a wrong gradient does not. A coordinate still disagreeing at the smallest
        step counts as a kink only if ``x`` sits on one (the one-sided slopes differ and the
        analytic gradient is one of them)."""
        x0 = float(target.value.detach()[index])
        a = float(target.grad[index])
        h = self.owner.step_size
        first = last = self._measure(target, index, x0, a, h)
        while last.rel > self.owner.warn_above and h / KINK_RETRY >= MIN_STEP * 0.999:
            h /= KINK_RETRY
            last = self._measure(target, index, x0, a, h)
            if last.rel <= self.owner.warn_above:
                last.kink = True  # explained: the larger step crossed a kink
                return last
        first.kink = last.kink
        return first

    def _measure(self, target: _Target, index: tuple[int, ...], x0: float, a: float, h: float) -> _Coord:
        fp = self._f_at(target, index, x0 + h)
        fm = self._f_at(target, index, x0 - h)
        f0 = self.f0
        n = (fp - fm) / (2 * h)
        allow = self.allowance(max(abs(fp), abs(fm), abs(f0)), h)
        rel = relative_error(a, n, allow)
        return _Coord(
            target.name,
            index,
            a,
            n,
            rel,
            h,
            rel > self.owner.warn_above and _at_kink(a, fp, f0, fm, h, allow),
        )

    @staticmethod
    def allowance(f: float, h: float) -> float:
        """Round-off allowance of a centred difference: ROUNDOFF_FACTOR * eps * |f| / h."""
        return ROUNDOFF_FACTOR * EPS64 * max(abs(f), 1e-300) / h

    # -------------------------------------------------------------- summaries
    def worst(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for c in self.coords:
            if c.kink:
                out.setdefault(c.tensor, 0.0)
                continue
            out[c.tensor] = max(out.get(c.tensor, 0.0), c.rel)
        return out

    def forward_order(self) -> Any:
        order = self._order

        def key(name: str) -> int:
            if name == "input":
                return -1
            return order.get(name, len(order))

        return key


def relative_error(analytic: float, numeric: float, allowance: float = 0.0) -> float:
    """cs231n's ``|a - n| / max(|a|, |n|)`` (0 when both are 0), not counting the part of
    ``|a - n|`` up to ``allowance`` (the float round-off of the numeric gradient)."""
    scale = max(abs(analytic), abs(numeric))
    if scale == 0.0:
        return 0.0
    return max(abs(analytic - numeric) - allowance, 0.0) / scale


class _DtypeWatch:
    """Forward hooks on every submodule: the first differentiable output that is not float64
    (outputs that do not require a gradient, e.g. metrics, do not count), and the order in
    which modules first ran (to place parameters in forward order)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.low: list[str] = []
        self.low_dtype: torch.dtype | None = None
        self.ran: list[nn.Module] = []
        self._seen: set[int] = set()
        self._hooks = HookSet()

    def __enter__(self) -> _DtypeWatch:
        for name, m in self.model.named_modules():
            self._hooks.forward(m, self._pre_hook, pre=True)
            self._hooks.forward(m, self._hook(name or "<model>"))
        return self

    def __exit__(self, *exc: Any) -> None:
        self._hooks.remove()

    def _pre_hook(self, mod: nn.Module, args: Any) -> None:
        if id(mod) not in self._seen:
            self._seen.add(id(mod))
            self.ran.append(mod)

    def _hook(self, name: str) -> Any:
        def hook(mod: nn.Module, args: Any, out: Any) -> None:
            for t in _tensors(out):
                if t.is_floating_point() and t.requires_grad and t.dtype != torch.float64 and not self.low:
                    self.low.append(name)
                    self.low_dtype = t.dtype

        return hook

    def param_order(self, model: nn.Module) -> dict[str, int]:
        """Parameter name -> rank of the module owning it, in the order modules started."""
        rank = {id(m): i for i, m in enumerate(self.ran)}
        out: dict[str, int] = {}
        for name, _ in model.named_parameters():
            mod_name = name.rpartition(".")[0]
            mod = model.get_submodule(mod_name) if mod_name else model
            out[name] = rank.get(id(mod), len(rank))
        return out


# ---------------------------------------------------------------------------- helpers
class _InputGraphBroken(Exception):
    """Autograd failed only because the input was made to require a gradient."""


def _at_kink(a: float, fp: float, f0: float, fm: float, h: float, allow: float) -> bool:
    """True when ``[x - h, x + h]`` crosses a kink: the one-sided slopes differ by more than
    round-off (on a smooth piece they differ by only h * |f''|) and the analytic gradient is
    one of them (the slope of the piece ``x`` lies on), not their mean."""
    up, down = (fp - f0) / h, (f0 - fm) / h
    gap = abs(up - down)
    return gap > 4 * allow and min(abs(a - up), abs(a - down)) <= 0.25 * gap + 2 * allow


def _tensors(value: Any) -> Iterator[Tensor]:
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)


def _unravel(flat: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    out = []
    for size in reversed(shape):
        out.append(flat % size)
        flat //= size
    return tuple(reversed(out))
