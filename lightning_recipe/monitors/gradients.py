"""GradientMonitor: per-layer gradient and weight histograms, gradient norms, vanishing / exploding
gradients through depth, and NaN/Inf gradients."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_recipe import _sharded, stats, tensorboard
from lightning_recipe._validate import check_int
from lightning_recipe.callback import guarded
from lightning_recipe.findings import Severity
from lightning_recipe.monitors.activations import (
    HISTOGRAM_BINS,
    HISTOGRAM_SAMPLES,
    ForwardOrder,
    iter_param_layers,
)
from lightning_recipe.monitors.base import TrendMonitor

#: layers left out of the depth profile: their gradients are sparse by construction (only the
#: rows of the tokens in the batch), so a small relative gradient says nothing about depth
SPARSE_GRADIENT_TYPES: tuple[type[nn.Module], ...] = (nn.Embedding, nn.EmbeddingBag)


@dataclass
class _ParamInfo:
    layer: str
    name: str
    is_weight: bool


@dataclass
class _Record:
    """What one optimizer's ``on_before_optimizer_step`` left on a logging step (device tensors)."""

    optimizer: int
    infos: list[_ParamInfo]
    grad_norms: Tensor
    weight_norms: Tensor
    #: sharded parameters: each tensor's fraction of distinct elements per rank (see _sharded)
    shares: Tensor | None = None


class GradientMonitor(TrendMonitor):
    """Per-layer gradient norms and histograms; vanishing, exploding and non-finite gradients.

    cs231n: plot gradient histograms for all layers; deep nets suffer from vanishing and exploding
    gradients. On each logging step the monitor reads the gradients in ``on_before_optimizer_step``
    (after accumulation, unscaled under AMP, all-reduced under DDP) and logs, per layer (a module
    that owns parameters), ``recipe/grad_norm/<layer>``, ``recipe/grad_relative/<layer>``
    (``norm(grad) / norm(weight)``: how fast the layer learns), ``recipe/grad_depth_ratio`` (first
    layer over last hidden layer, ``/opt<i>`` per optimizer) and gradient and weight histograms.
    At the end of training it checks the last gradients for NaN/Inf once more.

    Reports ``vanishing-gradients`` / ``exploding-gradients`` (warnings) when the depth ratio is
    below ``vanishing_ratio`` / above ``exploding_ratio`` on ``patience`` consecutive logging steps
    (embeddings, the output layer and ``exclude`` left out; two hidden layers needed), and
    ``non-finite-gradients`` (error) with the layers holding NaN/Inf in forward order, the deepest
    being where backprop met it first (under an fp16 ``GradScaler`` only after ``patience``
    logging steps in a row).

    Thresholds: see docs/thresholds.md#gradients.

    Args:
        every_n_steps: logging interval in optimizer steps (``None``: ``log_every_n_steps``).
        vanishing_ratio: depth ratio below which gradients count as vanishing (0 < x < 1).
        exploding_ratio: depth ratio above which gradients count as exploding (> 1).
        patience: consecutive logging steps a condition must hold (>= 1).
        histograms: log gradient and weight histograms.
        check_every_step: a sync-free every-step NaN/Inf flag, read on the next logging step (one
            grouped norm over the gradients per optimizer step; default off).
        exclude: layer names to leave out of the depth profile (e.g. a first layer over
            bag-of-words inputs, whose gradient is sparse).
        on_error: ``"warn"`` or ``"raise"`` (``non-finite-gradients`` is an error finding).

    Example::

        trainer = L.Trainer(callbacks=[GradientMonitor(every_n_steps=100)])
        trainer.fit(model, datamodule)  # warns "[vanishing-gradients] ... 3.3e-06x ..."
    """

    codes = ("exploding-gradients", "non-finite-gradients", "vanishing-gradients")

    #: place of this callback's charts in the Recipe section (lower first)
    chart_rank = 50

    needs_full_copy = False  # never runs the model on a copy

    def __init__(
        self,
        every_n_steps: int | None = None,
        vanishing_ratio: float = 1e-3,
        exploding_ratio: float = 1e2,
        patience: int = 3,
        *,
        histograms: bool = True,
        check_every_step: bool = False,
        exclude: Sequence[str] = (),
        on_error: str = "warn",
    ) -> None:
        super().__init__(every_n_steps, on_error=on_error)
        if _bad_number(vanishing_ratio) or not 0 < vanishing_ratio < 1:
            raise ValueError(f"`vanishing_ratio` must be a number in (0, 1), got {vanishing_ratio!r}")
        if _bad_number(exploding_ratio) or not exploding_ratio > 1 or math.isinf(exploding_ratio):
            raise ValueError(f"`exploding_ratio` must be a finite number > 1, got {exploding_ratio!r}")
        for name, value in (("histograms", histograms), ("check_every_step", check_every_step)):
            if not isinstance(value, bool):
                raise TypeError(f"`{name}` must be a bool, got {type(value).__name__}")
        if isinstance(exclude, str) or not all(isinstance(e, str) for e in exclude):
            raise TypeError(f"`exclude` must be a list of layer names (str), got {exclude!r}")
        self.vanishing_ratio = float(vanishing_ratio)
        self.exploding_ratio = float(exploding_ratio)
        self.patience = check_int("patience", patience)
        self.histograms = histograms
        self.check_every_step = check_every_step
        self.exclude = frozenset(exclude)
        self._armed = False
        self._order = ForwardOrder()
        self._records: list[_Record] = []
        self._params: dict[int, _ParamInfo] = {}
        self._modules: dict[str, nn.Module] = {}
        self._hist = tensorboard.HistogramBatch(HISTOGRAM_BINS, HISTOGRAM_SAMPLES)
        self._nf_count: Tensor | None = None
        self._nf_first: Tensor | None = None
        self._step = 0  # the global step of the batch being measured
        self._shard_kind: str | None = None
        self._final_done = False

    # ------------------------------------------------------------------ hooks
    @guarded
    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if not self.due(trainer):
            return
        self.mark_logged(trainer)
        self._step = trainer.global_step
        self._arm(pl_module)

    @guarded
    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        if self._armed:
            self._capture(trainer, optimizer)
        elif self.check_every_step and not _has_grad_scaler(trainer):
            self._flag_non_finite(trainer, optimizer)

    @guarded
    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._order.detach()  # the forward of this batch has run
        if self._armed and self._records:
            self._armed = False
            self._finish(trainer, pl_module)
        if not self._final_done and _last_batch(trainer):
            self._final_done = True
            self._final_check(trainer, pl_module)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._final_done = False
        self._shard_kind = _sharded.kind(pl_module, trainer)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if not self._final_done:  # stopped by a callback that runs after this one
            self._final_done = True
            self.run_safely(trainer, "on_train_end", self._final_check, trainer, pl_module)
        self.teardown_diagnostics()

    def _final_check(self, trainer: Any, model: nn.Module) -> None:
        """One last NaN/Inf check of the gradients the last optimizer step left behind (and of
        the every-step flag), on the batch after which training stops: a NaN loss often stops a
        run (early stopping) before the next logging step would have seen the gradients."""
        if self.has_reported("non-finite-gradients") or _has_grad_scaler(trainer):
            return
        if not self._params:
            self._arm(model)
            self._order.detach()
            self._armed = False
        params = [p for p in model.parameters() if p.grad is not None and p.grad.layout == torch.strided]
        params = [p for p in params if id(p) in self._params]
        kind = self._shard_kind
        parts = [stats.norms([_sharded.local(p.grad) for p in params])] if params else []
        if parts and kind is not None:
            parts[0] = parts[0].square() * self._shares(params, parts[0].device)
        device = parts[0].device if parts else None
        if self._nf_count is not None:
            device = device or self._nf_count.device
            parts.append(torch.stack([self._nf_count, self._nf_first]).float().to(device))
        if not parts:
            return
        vec = torch.cat(parts)
        if kind is not None:  # one all-reduce: whole-tensor norms and every rank's flags
            vec = _sharded.all_reduce_sum(vec)
            if params:
                vec[: len(params)] = vec[: len(params)].sqrt()
        host = stats.vector_to_host(vec)  # one transfer
        nf_steps = nf_first = 0
        if self._nf_count is not None:
            nf_steps, nf_first = int(host[-2]), int(host[-1])
            host = host[:-2]
            self._nf_count.zero_()
            self._nf_first.fill_(-1)
        bad = {self._params[id(p)].layer for p, v in zip(params, host) if not math.isfinite(v)}
        layers = sorted(bad, key=self._order.sort_key(model)) if self._order.index else sorted(bad)
        self._step = max(0, trainer.global_step - 1)  # the last optimizer step
        self._judge_non_finite(
            trainer, layers, len({self._params[id(p)].layer for p in params}), nf_steps, nf_first
        )

    def teardown_diagnostics(self) -> None:
        self._order.detach()
        self._armed = False
        self._records = []
        self._hist = tensorboard.HistogramBatch(HISTOGRAM_BINS, HISTOGRAM_SAMPLES)

    # ------------------------------------------------------------------ logging step: arm
    def _arm(self, model: nn.Module) -> None:
        _sharded.ensure_resharded(model)  # index the sharded parameters the optimizer steps
        self._armed = True
        self._records = []
        self._hist = tensorboard.HistogramBatch(HISTOGRAM_BINS, HISTOGRAM_SAMPLES)
        self._params, self._modules = {}, {}
        layers = []
        for name, module in iter_param_layers(model):
            for pname, p in module.named_parameters(recurse=False):
                full = f"{name}.{pname}" if name else pname
                self._params[id(p)] = _ParamInfo(name or pname, full, p.dim() >= 2)
            self._modules[name] = module
            if module is not model:
                layers.append(module)
        self._order.attach(layers)

    # ------------------------------------------------------------------ logging step: read (device)
    def _capture(self, trainer: Any, optimizer: Any) -> None:
        params = _grad_params(optimizer)
        params = [p for p in params if id(p) in self._params]
        if not params:
            return
        index = _optimizer_index(trainer, optimizer, len(self._records))
        if any(r.optimizer == index for r in self._records):
            return  # the same optimizer stepping twice in one batch: its first step is measured
        infos = [self._params[id(p)] for p in params]
        grads = [_sharded.local(p.grad) for p in params]
        weights = [_sharded.local(p.detach()) for p in params]
        record = _Record(
            optimizer=index,
            infos=infos,
            grad_norms=stats.norms(grads),
            weight_norms=stats.norms(weights),
        )
        if self._shard_kind is not None:
            record.shares = self._shares(params, record.grad_norms.device)
        if self.histograms:
            if self._shard_kind is not None:  # a rank with an empty shard still queues each tag
                weights = [_placeholder(w) for w in weights]
                grads = [_placeholder(g) for g in grads]
            for info, w in zip(infos, weights):
                self._hist.add(f"recipe/weights/{info.name}", [w])
            by_layer: dict[str, list[Tensor]] = {}
            for info, g in zip(infos, grads):
                by_layer.setdefault(info.layer, []).append(g)
            for layer, gs in by_layer.items():
                self._hist.add(f"recipe/gradients/{layer}", gs)
        self._records.append(record)

    def _shares(self, params: list[Tensor], device: torch.device) -> Tensor:
        world = _sharded.world_size()
        kind = self._shard_kind
        return torch.tensor(
            [_sharded.shards(p, kind) / world for p in params], device=device, dtype=torch.float32
        )

    def _flag_non_finite(self, trainer: Any, optimizer: Any) -> None:
        grads = [_sharded.local(p.grad) for p in _grad_params(optimizer)]
        if not grads:
            return
        bad = _any_non_finite(grads)
        if self._nf_count is None or self._nf_count.device != bad.device:
            self._nf_count = torch.zeros((), dtype=torch.int64, device=bad.device)
            self._nf_first = torch.full((), -1, dtype=torch.int64, device=bad.device)
        self._nf_first = torch.where(bad & (self._nf_first < 0), int(trainer.global_step), self._nf_first)
        self._nf_count += bad

    # ------------------------------------------------------------------ logging step: one sync
    def _finish(self, trainer: Any, model: nn.Module) -> None:
        records, self._records = self._records, []
        if self._shard_kind is not None:
            self._whole_tensor_norms(records)
        key = self._order.sort_key(model) if self._order.index else None
        values: dict[str, Tensor] = {}
        profiles: list[tuple[_Record, list[str], dict[str, bool]]] = []
        for rec in records:
            layers, is_profile = self._layer_values(rec, key, values)
            profiles.append((rec, layers, is_profile))
        if self._nf_count is not None:
            values["__nf_count"] = self._nf_count
            values["__nf_first"] = self._nf_first
        host = stats.to_host(values)  # the one device-to-host transfer
        if self._nf_count is not None:
            self._nf_count.zero_()
            self._nf_first.fill_(-1)
        self._hist.flush(tensorboard.get_writer(trainer), self._step)
        nf_steps = int(host.pop("__nf_count", 0))
        nf_first = int(host.pop("__nf_first", -1))
        scalars = dict(host)
        several = len({r.optimizer for r in records}) > 1
        bad_layers: list[str] = []
        checked = 0
        for rec, layers, is_profile in profiles:
            norms = [host[f"recipe/grad_norm/{layer}"] for layer in layers]
            checked += len(layers)
            bad_layers += [layer for layer, v in zip(layers, norms) if not math.isfinite(v)]
            ratio = self._depth(trainer, rec, layers, is_profile, host, several)
            if ratio is not None:
                suffix = f"/opt{rec.optimizer}" if several else ""
                scalars[f"recipe/grad_depth_ratio{suffix}"] = ratio
        tensorboard.log_scalars(trainer, scalars, step=self._step)
        self.figures["logging_steps"] = int(self.figures.get("logging_steps", 0)) + 1
        self.figures["layers"] = checked
        self._judge_non_finite(trainer, bad_layers, checked, nf_steps, nf_first)

    def _whole_tensor_norms(self, records: list[_Record]) -> None:
        """Sharded parameters: shard norms -> norms of the whole tensors, and the every-step
        non-finite counts of all ranks, in one all-reduce (on logging steps only)."""
        device = records[0].grad_norms.device
        parts = []
        for r in records:
            shares = r.shares.to(device) if r.shares is not None else 1.0
            parts += [r.grad_norms.to(device).square() * shares, r.weight_norms.to(device).square() * shares]
        if self._nf_count is not None:
            parts.append(self._nf_count.reshape(1).float().to(device))
        # the histograms' samples of every rank's shards ride along (whole-tensor histograms)
        items = list(self._hist._items)
        packed, per = _sharded.pack_samples([v for _, v in items], HISTOGRAM_SAMPLES, device)
        head = sum(p.numel() for p in parts)
        total = _sharded.all_reduce_sum(torch.cat([*parts, packed]).float())
        pos = 0
        for r in records:
            n = len(r.infos)
            r.grad_norms = total[pos : pos + n].sqrt()
            r.weight_norms = total[pos + n : pos + 2 * n].sqrt()
            pos += 2 * n
        if self._nf_count is not None:
            self._nf_count = total[pos].round().to(self._nf_count.dtype).to(self._nf_count.device)
        whole = _sharded.unpack_samples(total[head:], len(items), per)
        self._hist._items = [(tag, sample) for (tag, _), sample in zip(items, whole)]

    def _layer_values(
        self, rec: _Record, key: Any, values: dict[str, Tensor]
    ) -> tuple[list[str], dict[str, bool]]:
        """Per-layer norms on the device; returns the layers in forward order and which of them
        belong to the depth profile."""
        layers = list(dict.fromkeys(info.layer for info in rec.infos))
        if key is not None:
            layers.sort(key=key)
        pos = {layer: i for i, layer in enumerate(layers)}
        device = rec.grad_norms.device
        idx = torch.tensor([pos[i.layer] for i in rec.infos], device=device)
        weight = torch.tensor([i.is_weight for i in rec.infos], device=device, dtype=torch.float32)
        g2, w2 = rec.grad_norms.square(), rec.weight_norms.square()
        zeros = torch.zeros(len(layers), device=device)
        layer_norm = zeros.index_add(0, idx, g2).sqrt()
        wg = zeros.index_add(0, idx, g2 * weight).sqrt()
        ww = zeros.index_add(0, idx, w2 * weight).sqrt()
        relative = wg / ww  # nan/inf where a layer has no (or all-zero) weight tensors
        is_profile: dict[str, bool] = {}
        has_weight = {i.layer for i in rec.infos if i.is_weight}
        for layer, i in pos.items():
            values[f"recipe/grad_norm/{layer}"] = layer_norm[i]
            module = self._modules.get(layer)
            profile = (
                layer in has_weight
                and module is not None
                and layer != ""
                and not isinstance(module, SPARSE_GRADIENT_TYPES)
                and layer not in self.exclude
            )
            is_profile[layer] = profile
            if profile:
                values[f"recipe/grad_relative/{layer}"] = relative[i]
        return layers, is_profile

    # ------------------------------------------------------------------ judging (host floats)
    def _depth(
        self,
        trainer: Any,
        rec: _Record,
        layers: list[str],
        is_profile: dict[str, bool],
        host: dict[str, float],
        several: bool,
    ) -> float | None:
        profile = [layer for layer in layers if is_profile[layer]]
        opt = f"opt{rec.optimizer}"
        if len(profile) < 3:
            self.figures.setdefault("depth_profile", {})[opt] = (
                f"not judged: {len(profile)} layer(s) with weights (needs 2 hidden + the output layer)"
            )
            return None
        first, last = profile[0], profile[-2]
        rf, rl = host[f"recipe/grad_relative/{first}"], host[f"recipe/grad_relative/{last}"]
        if not (math.isfinite(rf) and math.isfinite(rl)) or rf <= 0 or rl <= 0:
            return None  # a dead / frozen / non-finite layer: other findings say it
        ratio = rf / rl
        self.figures.setdefault("depth_profile", {})[opt] = {
            "first": first,
            "last_hidden": last,
            "ratio": ratio,
            "layers": len(profile),
        }
        # the first layer's own kind deeper down (the same projection of a repeated block):
        # a gradient small in one kind of parameter in every block alike (attention query/key
        # weights at init) is not a depth trend, so vanishing needs both ratios below the limit
        kind_ratio = self._kind_ratio(profile, host)
        if kind_ratio is not None:
            self.figures["depth_profile"][opt]["same_kind_ratio"] = kind_ratio
        vanishing = ratio < self.vanishing_ratio and (kind_ratio is None or kind_ratio < self.vanishing_ratio)
        step = self._step
        for code, cond in (
            ("vanishing-gradients", vanishing),
            ("exploding-gradients", ratio > self.exploding_ratio),
        ):
            k = f"{code}:{opt}"
            hist = self._history.setdefault(k, [])
            hist.append((step, ratio))
            del hist[: -self.patience]
            if self.streaks.update(k, cond) >= self.patience and not self.has_reported(code):
                self._report_depth(trainer, code, first, last, list(hist), len(profile), opt, several)
        return ratio

    def _kind_ratio(self, profile: list[str], host: dict[str, float]) -> float | None:
        """Relative gradient of the first profile layer over that of the deepest hidden layer of
        the same kind (same name up to block indices, same module type); ``None`` when the first
        layer's kind does not repeat."""
        first = profile[0]
        kind = _kind(first, self._modules.get(first))
        same = [p for p in profile[1:-1] if _kind(p, self._modules.get(p)) == kind]
        if not same:
            return None
        rf, rl = host[f"recipe/grad_relative/{first}"], host[f"recipe/grad_relative/{same[-1]}"]
        if not (math.isfinite(rf) and math.isfinite(rl)) or rf <= 0 or rl <= 0:
            return None
        return rf / rl

    def _report_depth(
        self,
        trainer: Any,
        code: str,
        first: str,
        last: str,
        hist: list[tuple[int, float]],
        depth: int,
        opt: str,
        several: bool,
    ) -> None:
        ratio = hist[-1][1]
        seq = ", ".join(f"{v:.2g}" for _, v in hist)
        where = f" (optimizer {opt[3:]})" if several else ""
        evidence = {
            "ratio": ratio,
            "first_layer": first,
            "last_hidden_layer": last,
            "history": hist,
            "profiled_layers": depth,
            "optimizer": int(opt[3:]),
            "vanishing_ratio": self.vanishing_ratio,
            "exploding_ratio": self.exploding_ratio,
            "patience": self.patience,
        }
        span = f"steps {hist[0][0]}..{hist[-1][0]}: {seq}"
        if code == "vanishing-gradients":
            msg = (
                f"Gradients vanish through depth{where}: relative to its weights the first layer "
                f"{first!r} gets {ratio:.2g}x the gradient of the last hidden layer {last!r} on "
                f"{len(hist)} logging steps in a row ({span}; limit {self.vanishing_ratio:g}, healthy "
                "nets measure 0.02-26), so the early layers barely learn; use ReLU-family activations, "
                "residual connections, normalisation layers or a Kaiming/Xavier init."
            )
        else:
            msg = (
                f"Gradients explode through depth{where}: relative to its weights the first layer "
                f"{first!r} gets {ratio:.3g}x the gradient of the last hidden layer {last!r} on "
                f"{len(hist)} logging steps in a row ({span}; limit {self.exploding_ratio:g}x, healthy "
                "nets measure 0.02-26); lower the learning rate, clip gradients and check the init "
                "(large weights in tanh/sigmoid layers make backprop grow layer by layer, and a "
                "saturated layer with large weights gets a tiny relative gradient)."
            )
        self.report(trainer, code, Severity.WARNING, msg, evidence, step=self._step)

    def _judge_non_finite(
        self, trainer: Any, bad: list[str], checked: int, nf_steps: int, nf_first: int
    ) -> None:
        scaler = _has_grad_scaler(trainer)
        self.figures["non_finite_layers"] = len(bad)
        if scaler:
            if self.streaks.update("non-finite", bool(bad)) < self.patience:
                return
        elif not bad and nf_steps == 0:
            return
        if self.has_reported("non-finite-gradients"):
            return
        step = self._step
        evidence: dict[str, Any] = {
            "layers": bad,
            "layers_checked": checked,
            "steps_between_logging": nf_steps,
            "grad_scaler": scaler,
        }
        tips = (
            "look for NaN/Inf in the data, log(0), sqrt(0), division by zero, the norm of a zero "
            "vector, torch.where over a branch that is NaN where it is not selected, or fp16 "
            "overflow, and lower the learning rate."
        )
        if nf_steps:
            evidence["first_step"] = nf_first
        if bad:
            evidence.update({"first_in_forward_order": bad[0], "deepest": bad[-1]})
            despite = f" (seen on {self.patience} logging steps in a row despite the GradScaler)"
            earlier = f"; they first appeared between logging steps, at step {nf_first}"
            msg = (
                f"Non-finite gradients (NaN/Inf) at step {step} in {len(bad)} of {checked} layers: the "
                f"deepest is {bad[-1]!r}, where backprop met them first (they start there or in the loss), "
                f"and every layer before it inherits them, down to {bad[0]!r}, the first in forward order"
                + (despite if scaler else "")
                + (earlier if nf_steps else "")
                + f"; {tips}"
            )
        else:
            msg = (
                f"Non-finite gradients (NaN/Inf) on {nf_steps} optimizer step(s) between logging steps, "
                f"first at step {nf_first}; the per-layer check runs on logging steps only (lower "
                f"every_n_steps to see which layer); {tips}"
            )
        self.report(trainer, "non-finite-gradients", Severity.ERROR, msg, evidence, step=step)

    # ------------------------------------------------------------------ charts and resume
    def tensorboard_charts(self) -> dict[str, dict[str, tuple[str, list[str]]]]:
        return {
            "Recipe": {
                "Relative gradient norm per layer (norm(grad) / norm(weight))": (
                    "Multiline",
                    [r"recipe/grad_relative/.*"],
                ),
                "Gradient depth ratio (first / last hidden layer)": (
                    "Multiline",
                    [r"recipe/grad_depth_ratio.*"],
                ),
            }
        }


# ---------------------------------------------------------------------------- helpers
def _bad_number(value: Any) -> bool:
    return isinstance(value, bool) or not isinstance(value, (int, float)) or value != value


def _placeholder(t: Tensor) -> Tensor:
    """An empty shard as one NaN (left out of the histogram), so every rank queues every tag."""
    return t if t.numel() else torch.full((1,), float("nan"), device=t.device)


def _grad_params(optimizer: Any) -> list[Tensor]:
    """Parameters of ``optimizer`` that have a dense gradient, each once."""
    seen: set[int] = set()
    out: list[Tensor] = []
    for group in getattr(optimizer, "param_groups", []):
        for p in group["params"]:
            if id(p) in seen or p.grad is None or p.grad.layout != torch.strided:
                continue
            seen.add(id(p))
            out.append(p)
    return out


def _last_batch(trainer: Any) -> bool:
    """True on the batch after which training stops: a callback asked to stop, ``max_steps`` is
    reached, or the last batch of the last epoch (attribute reads only, no device work)."""
    if getattr(trainer, "should_stop", False):
        return True
    max_steps = getattr(trainer, "max_steps", -1)
    if isinstance(max_steps, int) and 0 < max_steps <= trainer.global_step:
        return True
    max_epochs = getattr(trainer, "max_epochs", None)
    return (
        bool(getattr(trainer, "is_last_batch", False))
        and isinstance(max_epochs, int)
        and max_epochs > 0
        and getattr(trainer, "current_epoch", 0) >= max_epochs - 1
    )


def _optimizer_index(trainer: Any, optimizer: Any, default: int) -> int:
    for i, opt in enumerate(getattr(trainer, "optimizers", None) or []):
        if opt is optimizer or getattr(opt, "optimizer", None) is optimizer:
            return i
    return default


def _has_grad_scaler(trainer: Any) -> bool:
    """True when a GradScaler (fp16 AMP) is in use: it skips steps with inf gradients itself."""
    plugin = getattr(trainer, "precision_plugin", None)
    if plugin is None:
        plugin = getattr(getattr(trainer, "strategy", None), "precision_plugin", None)
    return getattr(plugin, "scaler", None) is not None


def _any_non_finite(tensors: list[Tensor]) -> Tensor:
    """A 0-d bool tensor on the first tensor's device: any NaN/Inf in ``tensors`` (no sync).

    One ``torch._foreach_norm`` per (device, dtype) group: a norm is finite iff every element
    is (values above ~1e19 overflow the float32 sum of squares and count too, rightly)."""
    groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    device = tensors[0].device
    flags = []
    for group in groups.values():
        try:
            norms = torch._foreach_norm(group)
        except (RuntimeError, TypeError, AttributeError):
            norms = [torch.linalg.vector_norm(g.float()) for g in group]
        flags.append(torch.stack(norms).isfinite().all().to(device))
    return torch.stack(flags).all().logical_not()


def _kind(layer: str, module: Any) -> tuple[str, str]:
    """A layer's kind: its name with block indices replaced by ``#``, and its module type."""
    return re.sub(r"\d+", "#", layer), type(module).__name__
