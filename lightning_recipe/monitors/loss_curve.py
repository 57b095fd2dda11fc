"""LossCurveMonitor: read the training loss curve the way cs231n does, and watch the LR schedule."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from lightning_recipe import stats, tensorboard
from lightning_recipe._probe import find_loss, is_manual_optimization
from lightning_recipe._validate import check_number
from lightning_recipe.callback import guarded
from lightning_recipe.findings import Severity
from lightning_recipe.monitors.base import StepMonitor, Streaks

#: losses kept between two logging steps before they are folded into a running sum on the device
MAX_PENDING = 1024
#: a rise this many times the divergence margin is reported at once, without waiting for patience
EXPLOSION = 20.0
#: ``lr-decayed-early`` needs the rates below the floor for this fraction of the planned steps
LR_SUSTAIN = 0.05
#: below this fraction of the rate it is heading for, a rising learning rate is a warm-up
WARMUP_FRACTION = 0.1


class LossCurveMonitor(StepMonitor):
    """Watch the training loss curve and the learning-rate schedule.

    cs231n: a loss that explodes says the learning rate is too high, a flat curve that it is too
    low (or that something is broken), and a NaN is a bug; Karpathy: "don't trust learning rate
    decay defaults". The monitor keeps a reference to each step's loss (no sync) and, on each
    logging step, logs the mean training loss of the interval as ``recipe/loss/train`` (and
    ``recipe/loss/train_log10``) and each param group's rate as ``recipe/lr/opt<i>_group<j>``.

    Reports:
        * ``non-finite-loss`` (error): a NaN/Inf loss, with the first step it appeared;
        * ``loss-diverged`` (error): the interval mean rose above its best by more than both
          ``(divergence_factor - 1) x |best|`` and half the progress since the first batch, on
          ``patience`` logging steps in a row, or at once if it rose 20x more than that;
        * ``loss-not-decreasing`` (warning): after ``2 x window`` logging steps and ``min_steps``
          steps, the mean of the latest ``window`` interval means is less than ``flat_tolerance``
          below that of the first ``window``, on ``patience`` logging steps (not during warm-up);
        * ``lr-decayed-early`` (warning): every group's rate fell below ``lr_floor`` of its peak for
          5% of the planned steps, before ``lr_deadline`` of them (``ReduceLROnPlateau`` groups and
          runs of unknown length are left out).

    Thresholds: see docs/thresholds.md#loss-curve.

    Args:
        every_n_steps: logging interval in optimizer steps; ``None`` follows
            ``Trainer(log_every_n_steps)``.
        divergence_factor: see ``loss-diverged`` (default 4).
        flat_tolerance: see ``loss-not-decreasing`` (default 0.01).
        window: interval means per window of the flatness test (default 5).
        min_steps: optimizer steps before the flatness test may fire (default 100).
        patience: consecutive logging steps a condition must hold (default 3).
        lr_floor: fraction of the peak learning rate for ``lr-decayed-early`` (default 0.01).
        lr_deadline: fraction of the planned steps for ``lr-decayed-early`` (default 0.5).
        on_error: ``"warn"`` or ``"raise"``.

    Example::

        trainer = L.Trainer(callbacks=[LossCurveMonitor()], log_every_n_steps=50)
    """

    codes = ("loss-diverged", "loss-not-decreasing", "lr-decayed-early", "non-finite-loss")
    what = "read the loss curve"

    #: place of this callback's charts in the Recipe section (lower first)
    chart_rank = 0

    needs_full_copy = False  # never runs the model on a copy

    def __init__(
        self,
        every_n_steps: int | None = None,
        divergence_factor: float = 4.0,
        flat_tolerance: float = 0.01,
        window: int = 5,
        min_steps: int = 100,
        patience: int = 3,
        lr_floor: float = 0.01,
        lr_deadline: float = 0.5,
        *,
        on_error: str = "warn",
    ) -> None:
        super().__init__(every_n_steps, on_error=on_error)
        check_number("divergence_factor", divergence_factor, low=1.0, low_open=True)
        check_number("flat_tolerance", flat_tolerance, low=0.0, high=1.0, low_open=True, high_open=True)
        check_number("lr_floor", lr_floor, low=0.0, high=1.0, low_open=True, high_open=True)
        check_number("lr_deadline", lr_deadline, low=0.0, high=1.0, low_open=True)
        for name, value, least in (
            ("window", window, 1),
            ("min_steps", min_steps, 0),
            ("patience", patience, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"`{name}` must be an int >= {least}, got {value!r}")
        self.divergence_factor = float(divergence_factor)
        self.flat_tolerance = float(flat_tolerance)
        self.window = window
        self.min_steps = min_steps
        self.patience = patience
        self.lr_floor = float(lr_floor)
        self.lr_deadline = float(lr_deadline)
        self.streaks = Streaks()
        # curve state (checkpointed)
        self.initial: float | None = None
        self.best: float | None = None
        self.best_step = -1
        self._first_step = 0
        self._first_window: list[float] = []
        self._recent: list[tuple[int, float]] = []
        self._intervals = 0
        self._lr_peak: dict[str, float] = {}
        self._lr_done = False
        self._lr_low_since: int | None = None
        self._diverged_values: list[float] = []
        # per-fit, never checkpointed
        self._pending: list[Tensor] = []
        self._pending_steps: list[int] = []
        self._folded: Tensor | None = None
        self._folded_steps: list[int] = []
        self._scale = 1.0
        self._batch_step = 0
        self._planned: float = math.inf
        self._no_loss_batches = 0
        self._loss_batches = 0  # batches whose step returned a loss (a step may skip one: None)
        self._plateau: set[int] = set()  # ids of the optimizers a ReduceLROnPlateau drives
        self._lr_prev: dict[str, float] = {}  # each group's rate at the previous logging step
        self._lr_last: dict[str, float] = {}  # each group's rate at the previous batch
        self._warming_now = False
        # the losses of an unfinished interval, carried over from a checkpoint (host floats)
        self._carry: dict[str, Any] | None = None
        # the resumable state taken before the end-of-training tail was flushed
        self._resume_state: dict[str, Any] | None = None

    # ------------------------------------------------------------------ hooks
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self.teardown_diagnostics()
        self._resume_state = None
        # Lightning hands on_train_batch_end the loss divided by accumulate_grad_batches
        accumulate = int(getattr(trainer, "accumulate_grad_batches", 1) or 1)
        self._scale = 1.0 if is_manual_optimization(pl_module) else float(accumulate)
        try:
            self._planned = float(trainer.estimated_stepping_batches)
        except Exception:
            self._planned = math.inf
        self._plateau = _plateau_optimizers(trainer)
        self._lr_prev, self._lr_last, self._warming_now = {}, {}, False

    @guarded
    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._batch_step = trainer.global_step  # the step whose forward pass gives this batch's loss
        if not self._lr_done:
            self._check_lr(trainer, logging=False)  # the rates this step will use (host floats)

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # not @guarded: every rank reaches the vote below on the same steps, also a rank whose
        # monitor turned itself off (run_safely then does nothing), so with on_error="raise" under
        # DDP an error finding on any rank stops all of them together and none waits alone
        self.run_safely(trainer, "on_train_batch_end", self._collect, outputs)
        if self._due_now(trainer):
            self.mark_logged(trainer)
            with self.rank_consistent_errors(trainer):
                self.run_safely(trainer, "on_train_batch_end", self._flush, trainer)

    def _collect(self, outputs: Any) -> None:
        loss = _loss_of(outputs)
        if loss is not None:
            self._loss_batches += 1
            self._pending.append(loss)  # a reference to a detached tensor: no copy, no kernel
            self._pending_steps.append(self._batch_step)
            if len(self._pending) >= MAX_PENDING:
                self._fold()
        else:
            self._no_loss_batches += 1

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        with self.rank_consistent_errors(trainer):
            if self._pending or self._folded is not None or self._carry is not None:
                # the tail since the last logging step is logged and judged, but a checkpoint
                # written after this hook (ModelCheckpoint's save_last) keeps the state from before
                # it, tail losses included: a resumed run finishes that interval as a straight run
                # would, instead of counting a partial one
                self.run_safely(trainer, "on_train_end", self._flush_tail, trainer)
        self.teardown_diagnostics()

    def teardown_diagnostics(self) -> None:
        self._pending, self._pending_steps = [], []
        self._folded, self._folded_steps = None, []

    def _due_now(self, trainer: Any) -> bool:
        """A logging step: the global step reached the next multiple of the interval (with several
        optimizers per batch under manual optimisation it moves by more than one per batch). It
        depends on the step only, never on whether the monitor is on, so every DDP rank agrees."""
        step, n = trainer.global_step, self.interval(trainer)
        return step // n > max(self._last_logged_step, 0) // n

    # ------------------------------------------------------------------ collecting
    def _fold(self) -> None:
        """Reduce the kept losses on the device (no sync) into [sum, count, bad, first_bad, first]."""
        chunk = _chunk_stats(self._pending, self._scale)
        offset = len(self._folded_steps)
        self._folded = chunk if self._folded is None else _merge(self._folded, chunk, offset)
        self._folded_steps += self._pending_steps
        self._pending, self._pending_steps = [], []

    def _flush_tail(self, trainer: Any) -> None:
        interval = self._interval_stats()  # the one host transfer of the tail
        self._resume_state = self._resumable_state(interval)
        self._flush(trainer, interval)

    def _flush(self, trainer: Any, interval: tuple[dict[str, float] | None, list[int]] | None = None) -> None:
        host, steps = interval if interval is not None else self._interval_stats()
        self._folded, self._folded_steps, self._carry = None, [], None
        if host is None:
            self._no_loss(trainer)
            return
        first_bad = host["first_bad"]
        bad_step = steps[int(first_bad)] if math.isfinite(first_bad) and 0 <= first_bad < len(steps) else None
        self._judge(trainer, host, bad_step, len(steps), steps[0] if steps else trainer.global_step)

    def _interval_stats(self) -> tuple[dict[str, float] | None, list[int]]:
        """The losses since the last logging step (a carried-over start included) as host floats
        ``{sum, count, bad, first_bad, first}`` (one transfer) and their steps; ``(None, [])`` if
        there are none. Leaves them in place."""
        if self._pending:
            self._fold()
        carry = self._carry
        if self._folded is None:
            if carry is None:
                return None, []
            return {k: float(carry[k]) for k in _STAT_KEYS}, [int(s) for s in carry["steps"]]
        folded = self._folded
        host = stats.to_host({k: folded[i] for i, k in enumerate(_STAT_KEYS)})
        steps = list(self._folded_steps)
        if carry is None:
            return host, steps
        old_steps = [int(s) for s in carry["steps"]]
        first_bad = (
            carry["first_bad"] if math.isfinite(carry["first_bad"]) else host["first_bad"] + len(old_steps)
        )
        merged = {
            "sum": carry["sum"] + host["sum"],
            "count": carry["count"] + host["count"],
            "bad": carry["bad"] + host["bad"],
            "first_bad": first_bad,
            "first": carry["first"],
        }
        return merged, old_steps + steps

    # ------------------------------------------------------------------ verdicts
    def _judge(
        self, trainer: Any, host: dict[str, float], bad_step: int | None, n: int, first_step: int
    ) -> None:
        step = trainer.global_step
        if self.initial is None and math.isfinite(host["first"]):
            self.initial, self._first_step = host["first"], first_step
        if host["bad"] > 0 and not self.has_reported("non-finite-loss"):
            self._report_non_finite(trainer, host, bad_step, n)
        scalars = self._check_lr(trainer, logging=True)
        if host["count"] <= 0:
            tensorboard.log_scalars(trainer, scalars)
            return
        mean = host["sum"] / host["count"]
        scalars["recipe/loss/train"] = mean
        if mean > 0:
            scalars["recipe/loss/train_log10"] = math.log10(mean)
        tensorboard.log_scalars(trainer, scalars)
        self._intervals += 1
        if len(self._first_window) < self.window:
            self._first_window.append(mean)
        self._recent = (
            [*self._recent[-(self.window - 1) :], (step, mean)] if self.window > 1 else [(step, mean)]
        )
        self._judge_divergence(trainer, step, mean)
        self._judge_flat(trainer, step)
        self.figures.update({"loss": mean, "initial_loss": self.initial, "best_loss": self.best})

    def _judge_divergence(self, trainer: Any, step: int, mean: float) -> None:
        initial = self.initial if self.initial is not None else mean
        if self.best is None:
            self.best, self.best_step = initial, self._first_step
        if mean < self.best:
            self.best, self.best_step = mean, step
        best = self.best
        rise = mean - best
        needed = max((self.divergence_factor - 1.0) * abs(best), 0.5 * (initial - best))
        diverged = rise > 0 and rise > needed
        count = self.streaks.update("diverged", diverged)
        self._diverged_values = [*self._diverged_values[-(self.patience - 1) :], mean] if diverged else []
        explosive = diverged and rise > EXPLOSION * needed
        if (count < self.patience and not explosive) or self.has_reported("loss-diverged"):
            return
        values = ", ".join(f"{v:.4g}" for v in self._diverged_values)
        n = len(self._diverged_values)
        over = f"the last {n} logging intervals" if n > 1 else "the last logging interval"
        times = f" ({mean / best:.3g}x the best)" if best > 0 else ""
        self.report(
            trainer,
            "loss-diverged",
            Severity.ERROR,
            f"The training loss diverged: its mean over {over} was {values}, against a best of "
            f"{best:.4g} (step {self.best_step}) and {initial:.4g} at the first step{times}: the learning "
            "rate is probably too high; lower it (try 3-10x), add warm-up or gradient clipping.",
            {
                "losses": list(self._diverged_values),
                "best": best,
                "best_step": self.best_step,
                "initial": initial,
                "divergence_factor": self.divergence_factor,
            },
        )

    def _judge_flat(self, trainer: Any, step: int) -> None:
        if self._intervals < 2 * self.window or step < self.min_steps:
            return
        if self._warming_now:  # a loss that barely moves at 1e-3 of the target rate is no verdict
            self.figures["flat_test"] = "not judged: the learning rate is still warming up"
            return
        self.figures["flat_test"] = "judged"
        ref = sum(self._first_window) / len(self._first_window)
        now = sum(v for _, v in self._recent) / len(self._recent)
        if ref == 0:
            return
        improvement = (ref - now) / abs(ref)
        count = self.streaks.update("flat", improvement < self.flat_tolerance)
        self.figures["relative_improvement"] = improvement
        if count >= self.patience and not self.has_reported("loss-not-decreasing"):
            lrs = sorted({v for k, v in self.figures.items() if k.startswith("lr/")})
            lr_text = ", ".join(f"{v:.3g}" for v in lrs) or "unknown"
            if improvement < -self.flat_tolerance:
                advice = (
                    "the updates make it worse: lower the learning rate, and check that gradients "
                    "are zeroed between steps and that the loss is minimised, not maximised"
                )
            else:
                advice = (
                    f"raise the learning rate (now {lr_text}) or look for a bug (frozen or detached "
                    "parameters, labels that do not match the inputs); try to overfit one batch first"
                )
            self.report(
                trainer,
                "loss-not-decreasing",
                Severity.WARNING,
                f"The training loss is not decreasing: after {step} steps its recent mean is {now:.4g}, "
                f"{-improvement:+.1%} against {ref:.4g} over the first {self.window} logging intervals "
                f"(a drop of less than {self.flat_tolerance:.0%} counts as flat): {advice}.",
                {
                    "first_window_mean": ref,
                    "recent_mean": now,
                    "relative_improvement": improvement,
                    "steps": step,
                    "learning_rates": lrs,
                },
            )

    def _report_non_finite(self, trainer: Any, host: dict[str, float], bad_step: int | None, n: int) -> None:
        bad = int(host["bad"])
        where = f"at step {bad_step}" if bad_step is not None else "in this interval"
        self.report(
            trainer,
            "non-finite-loss",
            Severity.ERROR,
            f"The training loss became NaN/Inf {where} ({bad} of the last {n} batches non-finite): lower "
            "the learning rate, and look for log(0), division by zero, sqrt of a negative, or fp16 "
            "overflow (use bf16 or a GradScaler).",
            {"first_step": bad_step, "non_finite_batches": bad, "batches": n},
            step=bad_step,
        )

    def _no_loss(self, trainer: Any) -> None:
        # an interval of skipped batches (the step returned None) is no reason to give up a curve
        # that other batches feed
        if self._no_loss_batches and not self._loss_batches:
            self.skip(
                trainer,
                "training_step returned neither a tensor nor a dict with 'loss' (manual optimisation?); "
                "return the loss from training_step to get the loss-curve checks",
                once=True,
                batches_without_loss=self._no_loss_batches,
            )

    # ------------------------------------------------------------------ learning rate
    def _check_lr(self, trainer: Any, logging: bool) -> dict[str, float]:
        """Track each group's peak LR; report when all fell below ``lr_floor`` of their peak and
        stayed there, none rising, for ``LR_SUSTAIN`` of the planned steps, before the deadline.
        Returns the LR scalars (on logging steps), and on logging steps notes a warm-up."""
        scalars: dict[str, float] = {}
        judged: list[tuple[float, float]] = []
        lrs: dict[str, float] = {}
        rose = False
        warming = False
        for i, opt in enumerate(getattr(trainer, "optimizers", None) or []):
            on_plateau = id(getattr(opt, "optimizer", opt)) in self._plateau
            for j, group in enumerate(getattr(opt, "param_groups", [])):
                lr = group.get("lr")
                if isinstance(lr, Tensor):
                    if not logging:
                        return scalars  # reading it would sync: only on logging steps
                    lr = float(lr)
                if lr is None:
                    continue
                lr = float(lr)
                key = f"opt{i}_group{j}"
                lrs[key] = lr
                peak = self._lr_peak[key] = max(self._lr_peak.get(key, 0.0), lr)
                if logging:
                    scalars[f"recipe/lr/{key}"] = lr
                    self.figures[f"lr/{key}"] = lr
                    warming = self._warming(key, group, lr, peak) or warming
                if peak > 0 and not on_plateau:  # a plateau scheduler decays when the metric asks
                    judged.append((lr, peak))
                    rose = rose or lr > self._lr_last.get(key, lr)
                self._lr_last[key] = lr
        if logging:
            self._warming_now = warming
        if self._lr_done or not judged:
            if not self._lr_done and self._plateau and lrs:
                self.figures["lr_check"] = "not judged: ReduceLROnPlateau sets every learning rate"
            return scalars
        step = trainer.global_step
        if not 0 < self._planned < math.inf:
            self._lr_done = True
            self.figures["lr_check"] = (
                "not judged: the number of planned steps is unknown (max_epochs=-1, or a dataloader "
                "without a length)"
            )
            return scalars
        if step >= self.lr_deadline * self._planned:
            self._lr_done = True
            return scalars
        if rose or not all(lr < self.lr_floor * peak for lr, peak in judged):
            self._lr_low_since = None  # a rising rate is a warm-up or a cycle, not a decay
            return scalars
        if self._lr_low_since is None:
            self._lr_low_since = step
        if step - self._lr_low_since >= max(1, math.ceil(LR_SUSTAIN * self._planned)):
            self._lr_done = True
            self._report_lr(trainer, step, lrs)
        return scalars

    def _warming(self, key: str, group: dict[str, Any], lr: float, peak: float) -> bool:
        """A warm-up in progress: the rate is below ``WARMUP_FRACTION`` of the rate it is heading
        for (``initial_lr`` of a warm-up scheduler, ``max_lr`` of OneCycleLR, the peak so far) and
        rising (at its highest so far, or above its value at the previous logging step)."""
        prev, self._lr_prev[key] = self._lr_prev.get(key), lr
        target = max(peak, _group_float(group, "initial_lr"), _group_float(group, "max_lr"))
        rising = lr >= peak or (prev is not None and lr > prev)
        return rising and lr < WARMUP_FRACTION * target

    def _report_lr(self, trainer: Any, step: int, lrs: dict[str, float]) -> None:
        planned = int(self._planned)
        since = self._lr_low_since if self._lr_low_since is not None else step
        parts = ", ".join(
            f"{k} {lrs[k]:.3g} (peak {self._lr_peak[k]:.3g})" for k in lrs if self._lr_peak.get(k)
        )
        self.report(
            trainer,
            "lr-decayed-early",
            Severity.WARNING,
            f"By step {step} of {planned} planned ({step / planned:.1%}) every learning rate had been "
            f"below {self.lr_floor:.0%} of its peak since step {since} ({parts}): the rest of the run "
            "barely trains; check the scheduler's interval ('step' vs 'epoch') and its milestones / "
            "T_max / step_size, which are in scheduler steps.",
            {
                "step": step,
                "low_since_step": since,
                "planned_steps": planned,
                "learning_rates": lrs,
                "peaks": dict(self._lr_peak),
            },
        )

    # ------------------------------------------------------------------ layout and resume
    def tensorboard_charts(self) -> dict[str, dict[str, tuple[str, list[str]]]]:
        return {
            "Recipe": {
                "Training loss (interval mean)": ("Multiline", [r"recipe/loss/train$"]),
                "Training loss (log10)": ("Multiline", [r"recipe/loss/train_log10"]),
                "Learning rate per param group": ("Multiline", [r"recipe/lr/.*"]),
            }
        }

    def state_dict(self) -> dict[str, Any]:
        if self._resume_state is not None:  # saved after on_train_end: the state before the tail
            return dict(self._resume_state)
        return self._resumable_state()

    def _resumable_state(
        self, interval: tuple[dict[str, float] | None, list[int]] | None = None
    ) -> dict[str, Any]:
        """The checkpoint state, with the losses of the unfinished interval (one host transfer
        when there are any, unless ``interval`` was read already), so a resumed run completes it."""
        host, steps = interval if interval is not None else self._interval_stats()
        carry = None if host is None else {**host, "steps": steps}
        return {
            **super().state_dict(),
            "carry": carry,
            "streaks": self.streaks.state_dict(),
            "initial": self.initial,
            "best": self.best,
            "best_step": self.best_step,
            "first_step": self._first_step,
            "first_window": list(self._first_window),
            "recent": [list(r) for r in self._recent],
            "intervals": self._intervals,
            "lr_peak": dict(self._lr_peak),
            "lr_done": self._lr_done,
            "lr_low_since": self._lr_low_since,
            "diverged_values": list(self._diverged_values),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.streaks.load_state_dict(state_dict.get("streaks", {}))
        self.initial = _opt_float(state_dict.get("initial"))
        self.best = _opt_float(state_dict.get("best"))
        self.best_step = int(state_dict.get("best_step", -1))
        self._first_step = int(state_dict.get("first_step", 0))
        self._first_window = [float(v) for v in state_dict.get("first_window", [])]
        self._recent = [(int(s), float(v)) for s, v in state_dict.get("recent", [])]
        self._intervals = int(state_dict.get("intervals", 0))
        self._lr_peak = {str(k): float(v) for k, v in state_dict.get("lr_peak", {}).items()}
        self._lr_done = bool(state_dict.get("lr_done", False))
        low = state_dict.get("lr_low_since")
        self._lr_low_since = None if low is None else int(low)
        self._diverged_values = [float(v) for v in state_dict.get("diverged_values", [])]
        carry = state_dict.get("carry")
        self._carry = None if carry is None else {**carry, "steps": [int(s) for s in carry["steps"]]}
        self._resume_state = None


# ---------------------------------------------------------------------------- helpers
#: the interval statistics, in the order of the folded vector (see :func:`_chunk_stats`)
_STAT_KEYS = ("sum", "count", "bad", "first_bad", "first")


def _loss_of(outputs: Any) -> Tensor | None:
    """The loss in what ``training_step`` returned (``_probe.find_loss``), detached; ``None`` for
    no loss, an empty or a non-floating one."""
    loss = find_loss(outputs)
    if loss is None or loss.numel() == 0 or not (loss.is_floating_point() or loss.is_complex()):
        return None
    return loss.detach()


def _chunk_stats(items: list[Tensor], scale: float) -> Tensor:
    """[sum of finite, count finite, count non-finite, index of first non-finite (inf if none),
    first value] of the kept losses, on the device."""
    device = items[0].device
    vals = torch.stack([t.float().reshape(()) if t.numel() == 1 else t.float().mean() for t in items])
    vals = vals.to(device) * scale
    finite = torch.isfinite(vals)
    idx = torch.arange(len(items), device=device, dtype=torch.float32)
    first_bad = torch.where(finite, torch.full_like(idx, math.inf), idx).min()
    zero = torch.zeros((), device=device)
    return torch.stack(
        [
            torch.where(finite, vals, zero).sum(),
            finite.sum().float(),
            (~finite).sum().float(),
            first_bad,
            vals[0],
        ]
    )


def _merge(a: Tensor, b: Tensor, offset: int) -> Tensor:
    return torch.stack([a[0] + b[0], a[1] + b[1], a[2] + b[2], torch.minimum(a[3], b[3] + offset), a[4]])


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _group_float(group: dict[str, Any], key: str) -> float:
    """A param group's float entry (``initial_lr``, ``max_lr``), 0.0 if absent or not a float."""
    value = group.get(key)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


def _plateau_optimizers(trainer: Any) -> set[int]:
    """Ids of the optimizers a ``ReduceLROnPlateau`` scheduler drives (duck-typed config)."""
    out: set[int] = set()
    for config in getattr(trainer, "lr_scheduler_configs", None) or []:
        scheduler = getattr(config, "scheduler", None)
        if getattr(config, "reduce_on_plateau", False) or type(scheduler).__name__ == "ReduceLROnPlateau":
            optimizer = getattr(scheduler, "optimizer", None)
            if optimizer is not None:
                out.add(id(getattr(optimizer, "optimizer", optimizer)))
    return out
