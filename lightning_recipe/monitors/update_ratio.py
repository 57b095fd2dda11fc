"""UpdateRatioMonitor: norm(update) / norm(weight) per parameter, cs231n's "want ~1e-3"."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lightning_recipe import _sharded, stats, tensorboard
from lightning_recipe._probe import track_hook, untrack_hook
from lightning_recipe.callback import guarded
from lightning_recipe.findings import Severity
from lightning_recipe.monitors.base import StepMonitor, Streaks

GRANULARITIES = ("auto", "parameter", "layer")
#: "auto" logs one scalar per parameter up to this many trainable tensors, else one per layer
AUTO_MAX_PARAMETERS = 32
#: a parameter group counts as "at its learning rate" while lr >= this fraction of its peak
ACTIVE_LR_FRACTION = 0.1
MAX_NAMES_IN_MESSAGE = 8


@dataclass
class _Pending:
    """The snapshot of one optimizer's parameters, taken just before its step."""

    index: int
    params: list[Tensor]
    names: list[str]
    lr_active: list[bool]
    lrs: list[float]
    snapshot: list[Tensor]
    weight_norms: Tensor
    found_inf: Tensor | None
    scaler: bool
    step: int
    #: sharded parameters: per tensor, the fraction of the ranks that hold distinct elements
    #: (``None``: whole tensors on every rank, norms are final)
    shares: Tensor | None = None


@dataclass
class _Sample:
    """One optimizer's measurement on a logging step, still on the device."""

    index: int
    names: list[str]
    lr_active: list[bool]
    lrs: list[float]
    weight_norms: Tensor
    update_norms: Tensor
    found_inf: Tensor | None
    scaler: bool
    step: int
    shares: Tensor | None = None


@dataclass
class _Measured:
    """The host view of a logging step."""

    names: list[str] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    updates: list[float] = field(default_factory=list)
    active: list[bool] = field(default_factory=list)
    lrs: dict[int, list[float]] = field(default_factory=dict)
    skipped: list[int] = field(default_factory=list)


class UpdateRatioMonitor(StepMonitor):
    """Watch the ratio of the update to the weights, cs231n's "ratio of weights:updates".

    cs231n: the ratio of the update magnitudes to the value magnitudes "should be somewhere around
    1e-3"; far lower, the learning rate might be too low, far higher, likely too high. The *update*
    is the change the optimizer really made (momentum, Adam, weight decay and clipping included):
    the parameters are copied before the step and compared after it, every step for the first
    ``dense_steps`` steps, then every ``every_n_steps``. Logged in log10 (custom scalars have no log
    axis; -3 means 1e-3): ``recipe/update_ratio/<name>``, ``recipe/update_ratio_summary/median``,
    ``.../fraction_low`` / ``fraction_high`` (plain fractions), the band lines and a histogram.
    Groups whose learning rate is below 10% of its peak (warm-up, a schedule's tail) and steps the
    GradScaler skipped are left out. Sharded parameters: each rank copies its own shard and the
    whole-tensor norms are summed in one all-reduce per measuring step.

    Reports (warnings, each from ``patience`` consecutive measurements) ``update-ratio-high``: the
    median ratio above ``high``; ``update-ratio-low``: the median below ``low`` on every measurement
    since the start (a later fall is convergence or a dead net, not a low rate);
    ``params-not-updating``: a parameter in an optimizer that changed by exactly zero on every
    measurement since the start.

    Thresholds: see docs/thresholds.md#update-ratio.

    Args:
        every_n_steps: logging interval in optimizer steps; ``None`` follows
            ``Trainer(log_every_n_steps)``.
        granularity: ``"auto"`` (per parameter up to 32 trainable tensors, else per layer),
            ``"parameter"`` or ``"layer"`` (the module owning the parameters; the layer's ratio
            is computed from the norms of all its parameters together).
        low: median ratio below which ``update-ratio-low`` is reported (default 1e-5).
        high: median ratio above which ``update-ratio-high`` is reported (default 1.0).
        patience: consecutive measurements a condition must hold (default 3).
        dense_steps: the first optimizer steps measured every step (default 10; 0 turns it off).
        max_snapshot_mb: largest copy of parameters kept during one optimizer step (default 256);
            a larger model is measured on a rotating subset of its tensors, a larger tensor never.
        histogram: log the histogram of log10 ratios (default True).
        on_error: ``"warn"`` or ``"raise"``.

    Example::

        trainer = L.Trainer(callbacks=[UpdateRatioMonitor(every_n_steps=50)], log_every_n_steps=50)
    """

    codes = ("params-not-updating", "update-ratio-high", "update-ratio-low")

    #: place of this callback's charts in the Recipe section (lower first)
    chart_rank = 20

    needs_full_copy = False  # never runs the model on a copy

    def __init__(
        self,
        every_n_steps: int | None = None,
        granularity: str = "auto",
        low: float = 1e-5,
        high: float = 1.0,
        patience: int = 3,
        dense_steps: int = 10,
        max_snapshot_mb: float = 256.0,
        histogram: bool = True,
        *,
        on_error: str = "warn",
    ) -> None:
        super().__init__(every_n_steps, on_error=on_error)
        if granularity not in GRANULARITIES:
            raise ValueError(f"`granularity` must be one of {GRANULARITIES}, got {granularity!r}")
        for name, value in (("low", low), ("high", high)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ValueError(f"`{name}` must be a positive finite number, got {value!r}")
        if low >= high:
            raise ValueError(f"`low` must be below `high`, got low={low!r}, high={high!r}")
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise ValueError(f"`patience` must be a positive int, got {patience!r}")
        if isinstance(dense_steps, bool) or not isinstance(dense_steps, int) or dense_steps < 0:
            raise ValueError(f"`dense_steps` must be a non-negative int, got {dense_steps!r}")
        if (
            isinstance(max_snapshot_mb, bool)
            or not isinstance(max_snapshot_mb, (int, float))
            or not max_snapshot_mb > 0
        ):
            raise ValueError(f"`max_snapshot_mb` must be a positive number, got {max_snapshot_mb!r}")
        if not isinstance(histogram, bool):
            raise TypeError(f"`histogram` must be a bool, got {type(histogram).__name__}")
        self.granularity = granularity
        self.low = float(low)
        self.high = float(high)
        self.patience = patience
        self.dense_steps = dense_steps
        self.max_snapshot_mb = float(max_snapshot_mb)
        self.histogram = histogram
        self.streaks = Streaks()
        self._reported_params: set[str] = set()
        #: module name -> (its one-shot forward pre-hook, [ran since]) for parameters seen unchanged
        self._watched: dict[str, tuple[Any, list[bool]]] = {}
        self._moved: set[str] = set()  # parameters seen changing: a gradient reaches them
        self._offsets: dict[int, int] = {}
        self._peak_lr: dict[str, float] = {}
        self._history: list[tuple[int, float]] = []
        self._judged_samples = 0
        # per-fit, never checkpointed
        self._names: dict[int, str] = {}
        self._trainable = 0
        self._shard_kind: str | None = None
        self._batch_count = 0
        self._decided_batch = -1
        self._batch_due = False
        self._pending: dict[int, _Pending] = {}
        self._samples: list[_Sample] = []
        #: how many snapshots were taken (tests and benchmarks read it)
        self.snapshots_taken = 0

    # ------------------------------------------------------------------ hooks
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._shard_kind = _sharded.kind(pl_module, trainer)
        _sharded.ensure_resharded(pl_module)  # name the sharded parameters the optimizer steps
        self._names = {id(p): n for n, p in pl_module.named_parameters()}
        self._trainable = sum(1 for p in pl_module.parameters() if p.requires_grad)
        self._batch_count = 0
        self._decided_batch = -1

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._batch_count += 1

    @guarded
    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        if self._pending:
            self._finish_pending()
        if self._decided_batch != self._batch_count:
            self._decided_batch = self._batch_count
            self._batch_due = self._due_now(trainer)
            if self._batch_due:
                self.mark_logged(trainer)
        if not self._batch_due:
            return
        index = _optimizer_index(trainer, optimizer)
        if index in {s.index for s in self._samples}:
            return  # one measure per optimizer per logging batch
        self._snapshot(trainer, optimizer, index)

    @guarded
    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._pending and not self._samples:
            return
        self._finish_pending()
        samples, self._samples = self._samples, []
        self._publish(trainer, samples)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self.teardown_diagnostics()

    def teardown_diagnostics(self) -> None:
        self._pending = {}
        self._samples = []
        for handle, _ in self._watched.values():
            untrack_hook(handle)

    # ------------------------------------------------------------------ when
    def _due_now(self, trainer: Any) -> bool:
        """A logging step: the global step crossed a multiple of the interval since the last one
        (with several optimizers per batch the global step moves by more than one per batch)."""
        if not self.active:
            return False
        step, n = trainer.global_step, self.interval(trainer)
        if step < self.dense_steps and step != self._last_logged_step:
            return True
        if self._last_logged_step < 0:
            return step % n == 0
        return step // n > self._last_logged_step // n

    # ------------------------------------------------------------------ measuring
    def _snapshot(self, trainer: Any, optimizer: Any, index: int) -> None:
        params, names, active, lrs, shares = self._select(optimizer, index)
        if not params:
            return
        found_inf, scaler = _scaler_found_inf(trainer, optimizer)
        snapshot = _copy(params)
        self.snapshots_taken += 1
        weight_norms = stats.norms(snapshot)
        self._pending[index] = _Pending(
            index=index,
            params=params,
            names=names,
            lr_active=active,
            lrs=lrs,
            snapshot=snapshot,
            weight_norms=weight_norms,
            found_inf=found_inf,
            scaler=scaler,
            step=trainer.global_step,
            shares=shares,
        )

    def _select(
        self, optimizer: Any, index: int
    ) -> tuple[list[Tensor], list[str], list[bool], list[float], Tensor | None]:
        """The trainable parameters of ``optimizer`` to copy (a rotating subset within budget):
        their local shards when sharded, and each one's share of the whole tensor."""
        entries: list[tuple[Tensor, str, bool]] = []
        lrs: list[float] = []
        seen: set[int] = set()
        for g, group in enumerate(optimizer.param_groups):
            lr = _lr_value(group)
            key = f"{index}/{g}"
            peak = max(self._peak_lr.get(key, 0.0), _lr_value(group, "initial_lr") or 0.0, lr or 0.0)
            self._peak_lr[key] = peak
            lrs.append(lr if lr is not None else float("nan"))
            active = lr is None or peak == 0.0 or lr >= ACTIVE_LR_FRACTION * peak
            for j, p in enumerate(group["params"]):
                if not isinstance(p, Tensor) or not p.requires_grad or id(p) in seen:
                    continue
                seen.add(id(p))
                name = self._names.get(id(p)) or f"optimizer{index}.group{g}.param{j}"
                entries.append((p, name, active))
        budget = self.max_snapshot_mb * 2**20
        kind = self._shard_kind
        # sharded: the size of a rank's shard in the same number on every rank (the subsets
        # must match across ranks, the all-reduce adds them element by element)
        sizes = [_sharded.global_nbytes(p, kind) // _sharded.shards(p, kind) for p, _, _ in entries]
        if sum(sizes) <= budget:
            chosen = list(range(len(entries)))
        else:
            chosen = self._rotating_subset(index, sizes, budget, [name for _, name, _ in entries])
        shares = None
        if kind is not None:
            world = _sharded.world_size()
            device = _sharded.local(entries[chosen[0]][0]).device if chosen else None
            shares = torch.tensor(
                [_sharded.shards(entries[i][0], kind) / world for i in chosen],
                dtype=torch.float32,
                device=device,
            )
        return (
            [_sharded.local(entries[i][0].detach()) for i in chosen],
            [entries[i][1] for i in chosen],
            [entries[i][2] for i in chosen],
            lrs,
            shares,
        )

    def _rotating_subset(self, index: int, sizes: list[int], budget: float, names: list[str]) -> list[int]:
        """A contiguous window of tensors within ``budget``, starting where the last one stopped."""
        n = len(sizes)
        start = self._offsets.get(index, 0) % max(n, 1)
        chosen: list[int] = []
        used = 0.0
        too_big = {names[i] for i in range(n) if sizes[i] > budget}
        if too_big:
            self.figures["unmeasured"] = sorted(set(self.figures.get("unmeasured", [])) | too_big)
        for k in range(n):
            i = (start + k) % n
            if sizes[i] > budget:
                continue
            if used + sizes[i] > budget:
                self._offsets[index] = i
                break
            chosen.append(i)
            used += sizes[i]
        else:
            self._offsets[index] = start
        self.figures["rotating_subset"] = True
        return sorted(chosen)

    def _finish_pending(self) -> None:
        pending, self._pending = self._pending, {}
        for p in pending.values():
            diffs = _difference(p.params, p.snapshot)
            update_norms = stats.norms(diffs, device=p.weight_norms.device)
            del diffs
            self._samples.append(
                _Sample(
                    index=p.index,
                    names=p.names,
                    lr_active=p.lr_active,
                    lrs=p.lrs,
                    weight_norms=p.weight_norms,
                    update_norms=update_norms,
                    found_inf=p.found_inf,
                    scaler=p.scaler,
                    step=p.step,
                    shares=p.shares,
                )
            )

    # ------------------------------------------------------------------ publishing
    def _publish(self, trainer: Any, samples: list[_Sample]) -> None:
        if not samples:
            return
        if self._shard_kind is not None:
            _whole_tensor_norms(samples)
        measured = _to_host(samples)
        step = trainer.global_step
        measured_step = min(s.step for s in samples)
        if not measured.names:
            self._note_skipped(trainer, measured)
            return
        ratios = [_ratio(u, w) for u, w in zip(measured.updates, measured.weights)]
        scalars = self._unit_scalars(measured, ratios)
        usable = [r for r, a in zip(ratios, measured.active) if a and r is not None]
        summary = _summary(usable, self.low, self.high)
        scalars.update(self._summary_scalars(summary))
        for i, lrs in measured.lrs.items():
            for g, lr in enumerate(lrs):
                self.figures[f"lr/opt{i}_group{g}"] = lr
        tensorboard.log_scalars(trainer, scalars)
        if self.histogram:
            self._write_histogram(trainer, ratios, step)
        self._judge(trainer, measured, ratios, summary, measured_step)
        self._note_skipped(trainer, measured)

    def _unit_scalars(self, m: _Measured, ratios: list[float | None]) -> dict[str, float]:
        out: dict[str, float] = {}
        if self._per_parameter(len(m.names)):
            for name, r in zip(m.names, ratios):
                if r is not None:
                    out[f"recipe/update_ratio/{name}"] = _log10(r)
            return out
        layers: dict[str, list[float]] = {}
        for name, u, w in zip(m.names, m.updates, m.weights):
            acc = layers.setdefault(_layer_of(name), [0.0, 0.0])
            acc[0] += u * u
            acc[1] += w * w
        for layer, (u2, w2) in layers.items():
            r = _ratio(math.sqrt(u2), math.sqrt(w2))
            if r is not None:
                out[f"recipe/update_ratio/{layer}"] = _log10(r)
        return out

    def _per_parameter(self, count: int) -> bool:
        if self.granularity == "auto":
            return (self._trainable or count) <= AUTO_MAX_PARAMETERS
        return self.granularity == "parameter"

    def _summary_scalars(self, summary: dict[str, float]) -> dict[str, float]:
        out = {
            "recipe/update_ratio_summary/band_low": math.log10(self.low),
            "recipe/update_ratio_summary/band_high": math.log10(self.high),
            "recipe/update_ratio_summary/target": -3.0,
        }
        if summary:
            out["recipe/update_ratio_summary/median"] = _log10(summary["median"])
            out["recipe/update_ratio_summary/fraction_low"] = summary["fraction_low"]
            out["recipe/update_ratio_summary/fraction_high"] = summary["fraction_high"]
        return out

    def _write_histogram(self, trainer: Any, ratios: list[float | None], step: int) -> None:
        writer = tensorboard.get_writer(trainer)
        values = [_log10(r) for r in ratios if r is not None and r > 0]
        if writer is None or not values:
            return
        hb = tensorboard.HistogramBatch(bins=32, max_samples=max(32, len(values)))
        hb.add("recipe/update_ratio_summary/log10_ratios", torch.tensor(values))  # already on the host
        hb.flush(writer, step)

    # ------------------------------------------------------------------ verdicts
    def _judge(
        self, trainer: Any, m: _Measured, ratios: list[float | None], summary: dict[str, float], step: int
    ) -> None:
        """Update the trends with this logging step (``step``: the optimizer step measured)."""
        if summary:
            median = summary["median"]
            self._history = [*self._history[-(self.patience - 1) :], (step, median)]
            self.figures.update(
                {
                    "median_ratio": median,
                    "fraction_low": summary["fraction_low"],
                    "fraction_high": summary["fraction_high"],
                    "parameters_measured": summary["count"],
                }
            )
            self._judged_samples += 1
            high = self.streaks.update("high", median > self.high)
            low = self.streaks.update("low", median < self.low)
            if high >= self.patience and not self.has_reported("update-ratio-high"):
                self._report_band(trainer, "high", m, ratios, summary)
            # too low only if it was low from the first sample on: a ratio that fell later comes
            # from convergence (or from a net killed by a too-high rate), not from a low rate
            from_start = low == self._judged_samples
            if low >= self.patience and from_start and not self.has_reported("update-ratio-low"):
                self._report_band(trainer, "low", m, ratios, summary)
        self._judge_zero(trainer, m)

    def _report_band(
        self, trainer: Any, side: str, m: _Measured, ratios: list[float | None], summary: dict[str, float]
    ) -> None:
        history = self._history[-self.patience :]
        medians = [v for _, v in history]
        lrs = sorted({lr for lrs in m.lrs.values() for lr in lrs if lr == lr})
        lr_text = ", ".join(f"{lr:.3g}" for lr in lrs) or "unknown"
        ranked = sorted(
            ((r, n) for r, n, a in zip(ratios, m.names, m.active) if r is not None and a),
            reverse=side == "high",
        )
        worst = [f"{n} {r:.2g}" for r, n in ranked[:3]]
        evidence = {
            "median_ratio": summary["median"],
            "medians": medians,
            "steps": [s for s, _ in history],
            "threshold": self.high if side == "high" else self.low,
            "fraction_low": summary["fraction_low"],
            "fraction_high": summary["fraction_high"],
            "learning_rates": lrs,
            "extreme_parameters": worst,
        }
        span = f"steps {history[0][0]}..{history[-1][0]}" if len(history) > 1 else f"step {history[0][0]}"
        values = ", ".join(f"{v:.3g}" for v in medians)
        if side == "high":
            decades = math.log10(summary["median"] / 1e-3) if summary["median"] > 0 else float("nan")
            msg = (
                f"The median update/weight ratio was {values} on {len(medians)} logging steps in a row "
                f"({span}), above {self.high:.2g} and ~{decades:.1f} decades above the ~1e-3 rule of "
                f"thumb (largest: {', '.join(worst)}): the learning rate ({lr_text}) is probably too "
                "high; lower it (about 10x per decade above 1e-3) or add warm-up."
            )
            code = "update-ratio-high"
        else:
            decades = math.log10(1e-3 / summary["median"]) if summary["median"] > 0 else float("inf")
            msg = (
                f"The median update/weight ratio was {values} on {len(medians)} logging steps in a row "
                f"({span}), below {self.low:.2g} and ~{decades:.1f} decades under the ~1e-3 rule of "
                f"thumb (smallest: {', '.join(worst)}): the learning rate ({lr_text}) is probably too "
                "low; raise it (about 10x per decade below 1e-3)."
            )
            code = "update-ratio-low"
        self.report(trainer, code, Severity.WARNING, msg, evidence)

    def _judge_zero(self, trainer: Any, m: _Measured) -> None:
        """Parameters that changed by exactly 0 on every measurement since the start, at an active
        learning rate. Zero later is not "no gradient": once a run converges, its updates fall
        below half a float32 ulp of the weights (Adam memorising its data: gradients ~1e-13,
        exact-zero updates from step ~150), and a group whose scheduled rate is ~0 (a warm-up
        from 0, ReduceLROnPlateau at its floor) changes nothing either."""
        newly: list[str] = []
        for name, u, w, active in zip(m.names, m.updates, m.weights, m.active):
            if not math.isfinite(w) or not active or name in self._moved:
                continue
            if u != 0.0:
                self._moved.add(name)
            count = self.streaks.update(f"zero:{name}", u == 0.0)
            if count == 1 and u == 0.0:
                self._watch_module(trainer, name)
            if count >= self.patience and name not in self._reported_params:
                newly.append(name)
        if not newly:
            return
        self._reported_params.update(newly)
        # a parameter whose module never ran a forward since it was first seen still is not a
        # training failure (a branch unused by design, an option turned off): an info
        idle = [n for n in newly if self._module_of(n) in self._idle_modules]
        newly = [n for n in newly if n not in idle]
        if idle:
            self.report(
                trainer,
                "params-not-updating",
                Severity.INFO,
                f"{len(idle)} trainable parameter tensor(s) never changed because their modules never ran a "
                f"forward ({', '.join(idle[:MAX_NAMES_IN_MESSAGE])}"
                f"{' and more' if len(idle) > MAX_NAMES_IN_MESSAGE else ''}): unused by design they only "
                "cost memory; if they should be part of the model, call them in forward.",
                {"parameters": idle, "kind": "never-ran"},
            )
        if not newly:
            return
        shown = ", ".join(newly[:MAX_NAMES_IN_MESSAGE]) + (
            f" and {len(newly) - MAX_NAMES_IN_MESSAGE} more" if len(newly) > MAX_NAMES_IN_MESSAGE else ""
        )
        total = len(m.names)
        self.report(
            trainer,
            "params-not-updating",
            Severity.WARNING,
            f"{len(newly)} of {total} trainable parameter tensors in the optimizer changed by exactly 0 "
            f"on {self.patience} logging steps in a row ({shown}): no gradient reaches them (an unused "
            "layer, a detach(), a branch not in the loss) or their param group has lr=0; "
            "check the forward pass and the optimizer's param groups.",
            {"parameters": newly, "measured": total, "logging_steps": self.patience},
        )

    @staticmethod
    def _module_of(name: str) -> str:
        return name.rpartition(".")[0]

    @property
    def _idle_modules(self) -> set[str]:
        return {n for n, (_, ran) in self._watched.items() if not ran[0]}

    def _watch_module(self, trainer: Any, name: str) -> None:
        """A one-shot forward pre-hook on the module owning ``name``: did it run at all?"""
        owner = self._module_of(name)
        if owner in self._watched:
            return
        try:
            module = trainer.lightning_module.get_submodule(owner) if owner else trainer.lightning_module
        except Exception:
            return
        ran = [False]

        def mark(mod: Any, args: Any) -> None:
            ran[0] = True
            untrack_hook(handle)

        handle = track_hook(module.register_forward_pre_hook(mark))
        self._watched[owner] = (handle, ran)

    def _note_skipped(self, trainer: Any, m: _Measured) -> None:
        if not m.skipped:
            return
        self.figures["scaler_skipped_samples"] = int(self.figures.get("scaler_skipped_samples", 0)) + len(
            m.skipped
        )

    # ------------------------------------------------------------------ layout and resume
    def tensorboard_charts(self) -> dict[str, dict[str, tuple[str, list[str]]]]:
        return {
            "Recipe": {
                "Update ratio, log10 norm(update)/norm(weight) (want ~-3; band = flag limits)": (
                    "Multiline",
                    [
                        r"recipe/update_ratio/.*",
                        r"recipe/update_ratio_summary/(median|band_low|band_high|target)",
                    ],
                ),
                "Update ratio: fraction of parameters outside the band": (
                    "Multiline",
                    [r"recipe/update_ratio_summary/fraction_(low|high)"],
                ),
            }
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "streaks": self.streaks.state_dict(),
            "reported_params": sorted(self._reported_params),
            "moved": sorted(self._moved),
            "offsets": {str(k): v for k, v in self._offsets.items()},
            "peak_lr": dict(self._peak_lr),
            "history": [list(h) for h in self._history],
            "judged_samples": self._judged_samples,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.streaks.load_state_dict(state_dict.get("streaks", {}))
        self._reported_params = set(state_dict.get("reported_params", []))
        self._moved = set(state_dict.get("moved", []))
        self._offsets = {int(k): int(v) for k, v in state_dict.get("offsets", {}).items()}
        self._peak_lr = {str(k): float(v) for k, v in state_dict.get("peak_lr", {}).items()}
        self._history = [(int(s), float(v)) for s, v in state_dict.get("history", [])]
        self._judged_samples = int(state_dict.get("judged_samples", 0))


# ---------------------------------------------------------------------------- helpers
def _optimizer_index(trainer: Any, optimizer: Any) -> int:
    inner = getattr(optimizer, "optimizer", optimizer)  # LightningOptimizer wraps the real one
    for i, opt in enumerate(getattr(trainer, "optimizers", None) or []):
        if opt is inner or opt is optimizer or getattr(opt, "optimizer", None) is inner:
            return i
    return 0


def _lr_value(group: dict[str, Any], key: str = "lr") -> float | None:
    """A group's learning rate as a float, or ``None`` if it is a tensor (reading it would sync)."""
    value = group.get(key)
    if value is None or isinstance(value, Tensor):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _scaler_found_inf(trainer: Any, optimizer: Any) -> tuple[Tensor | None, bool]:
    """Whether a GradScaler found inf/NaN gradients for ``optimizer`` (it will skip the step),
    as a device tensor (no sync). ``found_inf_per_device`` is filled by ``scaler.unscale_``,
    which Lightning calls just before ``on_before_optimizer_step``."""
    scaler = getattr(getattr(trainer, "precision_plugin", None), "scaler", None)
    if scaler is None or not getattr(scaler, "is_enabled", lambda: False)():
        return None, False
    inner = getattr(optimizer, "optimizer", optimizer)
    try:
        state = scaler._per_optimizer_states[id(inner)]
        found = list(state["found_inf_per_device"].values())
    except (AttributeError, KeyError, TypeError):
        return None, True
    if not found:
        return None, True
    return torch.stack([f.reshape(()).float().to(found[0].device) for f in found]).sum(), True


def _copy(params: list[Tensor]) -> list[Tensor]:
    try:
        return list(torch._foreach_mul(params, 1.0))
    except (RuntimeError, TypeError, AttributeError):
        return [p.clone() for p in params]


def _difference(params: list[Tensor], snapshot: list[Tensor]) -> list[Tensor]:
    try:
        return list(torch._foreach_sub(params, snapshot))
    except (RuntimeError, TypeError, AttributeError):
        return [p - s for p, s in zip(params, snapshot)]


def _whole_tensor_norms(samples: list[_Sample]) -> None:
    """Sharded parameters: turn every sample's shard norms into norms of the whole tensors, with
    one all-reduce for all of them (every rank reaches it on the same logging steps)."""
    device = samples[0].weight_norms.device
    parts = []
    for s in samples:
        shares = s.shares.to(device) if s.shares is not None else 1.0
        parts += [s.weight_norms.to(device).square() * shares, s.update_norms.to(device).square() * shares]
    total = _sharded.all_reduce_sum(torch.cat(parts).float()).sqrt()
    pos = 0
    for s in samples:
        n = len(s.names)
        s.weight_norms, s.update_norms = total[pos : pos + n], total[pos + n : pos + 2 * n]
        pos += 2 * n


def _to_host(samples: list[_Sample]) -> _Measured:
    """Every sample's norms (and GradScaler flags) in one device-to-host transfer."""
    device = samples[0].weight_norms.device
    parts: list[Tensor] = []
    for s in samples:
        flag = s.found_inf if s.found_inf is not None else torch.zeros((), device=device)
        parts += [s.weight_norms.to(device), s.update_norms.to(device), flag.reshape(1).float().to(device)]
    host = stats.vector_to_host(torch.cat(parts))
    out = _Measured()
    pos = 0
    for s in samples:
        n = len(s.names)
        weights, updates = host[pos : pos + n], host[pos + n : pos + 2 * n]
        found_inf = host[pos + 2 * n]
        pos += 2 * n + 1
        out.lrs[s.index] = s.lrs
        finite_updates = [u for u in updates if math.isfinite(u)]
        all_zero = bool(finite_updates) and len(finite_updates) == n and not any(finite_updates)
        if found_inf > 0 or (s.scaler and s.found_inf is None and all_zero):
            out.skipped.append(s.index)  # the GradScaler skipped this step: nothing to judge
            continue
        out.names += s.names
        out.weights += weights
        out.updates += updates
        out.active += s.lr_active
    return out


def _ratio(update: float, weight: float) -> float | None:
    """norm(update) / norm(weight); ``None`` when undefined (zero or non-finite weight);
    ``inf`` when the update itself is not finite (the step produced NaN/Inf weights)."""
    if not math.isfinite(weight) or weight <= 0.0:
        return None
    if not math.isfinite(update):
        return math.inf
    return update / weight


def _log10(value: float) -> float:
    if value <= 0.0:
        return -12.0  # an exact zero update, drawn at the bottom of the chart
    if math.isinf(value):
        return 12.0
    return max(-12.0, min(12.0, math.log10(value)))


def _summary(ratios: list[float], low: float, high: float) -> dict[str, float]:
    if not ratios:
        return {}
    ordered = sorted(ratios)
    n = len(ordered)
    median = ordered[n // 2] if n % 2 else 0.5 * (ordered[n // 2 - 1] + ordered[n // 2])
    if math.isnan(median):
        median = math.inf
    return {
        "median": median,
        "fraction_low": sum(r < low for r in ordered) / n,
        "fraction_high": sum(r > high for r in ordered) / n,
        "count": float(n),
    }


def _layer_of(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else name
