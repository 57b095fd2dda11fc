"""ClassPriorCheck: does an imbalanced classifier start at the class prior?"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_recipe import _context
from lightning_recipe._probe import (
    LossCall,
    ProbeSkip,
    StepFn,
    batch_or_peek,
    class_scores,
    copy_module,
    is_manual_optimization,
    preserved_rng,
    run_step,
)
from lightning_recipe._validate import check_int, check_number
from lightning_recipe.batch import BatchLayoutError, Getter
from lightning_recipe.callback import RecipeCallback
from lightning_recipe.findings import Severity

_SOFTMAX = ("cross_entropy", "nll_loss")
_BINARY = ("binary_cross_entropy_with_logits", "binary_cross_entropy")


class ClassPriorCheck(RecipeCallback):
    """Does a classifier on imbalanced classes start at the class prior? (the recipe's "init well")

    Karpathy: "if you have an imbalanced dataset of a ratio 1:10 of positives:negatives, set the
    bias on your logits such that your network predicts probability of 0.1 at initialization".
    A classifier that starts at uniform probabilities spends its first steps learning the prior,
    and the loss-at-init rule, which compares with the uniform chance loss, cannot see it. On the
    first training batch the check runs your ``training_step`` on a copy of the untouched model and
    keeps, per class, the loss the initial predictions give a sample of that class; it then counts
    the labels of the first ``num_batches`` training batches on the device (summed over DDP ranks)
    and compares the expected loss at init with the loss of predicting the prior (its entropy),
    with the loss call's class weights, ``pos_weight`` and label smoothing. One label per sample
    (or per output of a multi-label head) only; per-token and per-pixel losses are left alone.

    Reports ``class-prior-init`` (warning) when the init loss is at least ``max_ratio`` times the
    prior's loss on at least ``min_labels`` labels, with the bias to set: ``log p`` per class for
    softmax, ``log(p / (1 - p))`` for a sigmoid output.

    Thresholds: see docs/thresholds.md#class-prior.

    Args:
        max_ratio: init loss / prior loss from which it warns (> 1).
        min_labels: fewest labels counted before judging (>= 1).
        num_batches: training batches whose labels are counted at most (>= 1).
        get_input, get_target, step_fn, on_error: see :class:`~lightning_recipe.checks.base.FirstBatchCheck`.

    Example::

        trainer = L.Trainer(callbacks=[ClassPriorCheck()])
        trainer.fit(model, datamodule)  # warns "[class-prior-init] ... set the final bias to -3.89"
    """

    codes = ("class-prior-init",)
    what = "compare the loss at init with the class prior"

    def __init__(
        self,
        max_ratio: float = 1.75,
        min_labels: int = 100,
        num_batches: int = 200,
        *,
        get_input: Getter | None = None,
        get_target: Getter | None = None,
        step_fn: StepFn | None = None,
        on_error: str = "warn",
    ) -> None:
        super().__init__(on_error=on_error)
        self.max_ratio = check_number("max_ratio", max_ratio, 1.0, low_open=True)
        self.min_labels = check_int("min_labels", min_labels)
        self.num_batches = check_int("num_batches", num_batches)
        self.read_batches_with(get_input, get_target, step_fn)
        self.done = False
        self._batches = 0
        self._init: dict[str, Any] | None = None  # per-class init losses and the loss call's options
        self._counts: Tensor | None = None  # (K,) label counts (softmax) or (2, K) positives/totals
        self._count_from_batches = False

    # ------------------------------------------------------------------ hooks
    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self.done:
            return
        if self._batches == 0:
            if trainer.global_step > 0:
                self.done = True
                return
            self.run_safely(trainer, "on_train_batch_start", self._first_batch, trainer, pl_module, batch)
        elif self._init is not None and self._count_from_batches:
            self.run_safely(trainer, "on_train_batch_start", self._count, batch)

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.done:
            return
        self._batches += 1
        if self._batches >= self.num_batches:
            self._judge(trainer)

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if not self.done and self._batches > 0:
            self._judge(trainer)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if not self.done and self._batches > 0:  # a run stopped inside its first epoch
            self._judge(trainer)

    def teardown_diagnostics(self) -> None:
        self._init = None
        self._counts = None

    # ------------------------------------------------------------------ first batch
    def _first_batch(self, trainer: Any, pl_module: nn.Module, batch: Any) -> None:
        if self.step_fn is None and is_manual_optimization(pl_module):
            self.figures["note"] = "manual optimisation: pass step_fn=lambda model, batch: loss"
            return  # LossAtInitCheck reports the skip (it needs the same step_fn)
        try:
            batch = batch_or_peek(trainer, pl_module, batch)
            copy = copy_module(pl_module, trainer)
            with preserved_rng(), torch.no_grad():
                result = run_step(copy, batch, self.step_fn)
        except ProbeSkip as why:
            self.figures["note"] = str(why)
            return
        call = result.main_call
        if call is None or call.name not in (*_SOFTMAX, *_BINARY):
            self.figures["note"] = "not a classification loss" if call is not None else "no loss call seen"
            return
        try:
            n = self.adapter.batch_size(batch)
        except BatchLayoutError:
            n = None
        init = _per_class_init(call, n)
        if init is None:
            self.figures["note"] = (
                f"{call.name} gets more than one label per sample (per token or pixel) or soft targets; "
                "the class prior is judged on one label per sample"
            )
            return
        self._init = init
        target = init.pop("target")
        try:
            batch_target = self.adapter.target(batch)
        except BatchLayoutError:
            batch_target = None
        # count from every batch only when the batch's target is exactly what reaches the loss
        self._count_from_batches = batch_target is not None and _same_values(batch_target, target)
        self.figures["labels_from"] = "batches" if self._count_from_batches else "first batch"
        self._counts = _counts(init, target)

    def _count(self, batch: Any) -> None:
        if batch is None:  # ``training_step(self, dataloader_iter)``: the first batch's labels only
            return
        target = self.adapter.target(batch)
        if target is None or self._init is None or self._counts is None:
            return
        if target.numel() != self._init["per_batch"] * self.adapter.batch_size(batch):
            return
        self._counts += _counts(self._init, target.to(self._counts.device))

    # ------------------------------------------------------------------ judging
    def _judge(self, trainer: Any) -> None:
        self.done = True
        # every rank takes part in the same collectives, whatever it measured
        ready = self._init is not None and self._counts is not None and self.active
        if _context.world_size(trainer) > 1:
            if not trainer.strategy.reduce_boolean_decision(ready, all=True):
                self.teardown_diagnostics()
                return
            packed = torch.cat([self._counts.reshape(-1), self._init["loss"].reshape(-1)]).float()
            packed = trainer.strategy.reduce(packed, reduce_op="sum")
            k = self._counts.numel()
            self._counts = packed[:k].reshape(self._counts.shape)
            self._init["loss"] = packed[k:].reshape(self._init["loss"].shape) / _context.world_size(trainer)
        elif not ready:
            return
        self.run_safely(trainer, "judge", self._verdict, trainer)
        self.teardown_diagnostics()

    def _verdict(self, trainer: Any) -> None:
        init, counts = self._init, self._counts.double().cpu()
        loss = init["loss"].double().cpu()
        kind = init["kind"]
        if kind == "softmax":
            labels = float(counts.sum())
            eff = counts * init["weight"] if init["weight"] is not None else counts.clone()
            if float(eff.sum()) <= 0:
                return
            prior = eff / eff.sum()
            eps = init["smoothing"]
            if eps > 0:
                prior = (1 - eps) * prior + eps / prior.numel()
            init_loss = float((prior * loss).sum())
            prior_loss = float(_entropy(prior).sum())
            raw = counts / counts.sum()
            bias = [round(math.log(v), 3) if v > 0 else None for v in raw.tolist()]
            share = float(raw.max())
            detail = f"the largest class holds {share:.1%} of {labels:.0f} labels"
        else:
            pos, tot = counts[0], counts[1]
            labels = float(tot.sum())
            if labels <= 0:
                return
            p = (pos / tot.clamp_min(1)).clamp(0, 1)
            pw = init["pos_weight"]
            q = p * pw / (p * pw + (1 - p)) if pw is not None else p
            init_loss = float((q * loss[1] + (1 - q) * loss[0]).sum())
            prior_loss = float((_entropy(q) + _entropy(1 - q)).sum())
            pc = p.clamp(1e-6, 1 - 1e-6)
            bias = [round(math.log(v / (1 - v)), 3) for v in pc.tolist()]
            worst = int((p - 0.5).abs().argmax())
            detail = f"{float(p[worst]):.2%} of {float(tot[worst]):.0f} labels are positive" + (
                f" (output {worst} of {p.numel()})" if p.numel() > 1 else ""
            )
        ratio = init_loss / prior_loss if prior_loss > 0 else float("inf")
        self.figures.update(
            {
                "loss_fn": init["loss_fn"],
                "labels": labels,
                "init_loss": init_loss,
                "prior_loss": prior_loss,
                "ratio": ratio,
            }
        )
        evidence = {**self.figures, "max_ratio": self.max_ratio, "bias": bias[:20]}
        if labels < self.min_labels or ratio < self.max_ratio or init_loss - prior_loss < 0.05:
            return
        shown = ", ".join(f"{b:.3g}" for b in bias[:10] if b is not None)
        shown += ", ..." if len(bias) > 10 else ""
        how = (
            f"set the final layer's bias to log(p/(1-p)) = {shown}"
            if kind == "binary"
            else f"set the final layer's bias to the log class prior log(p) = [{shown}]"
        )
        self.report(
            trainer,
            "class-prior-init",
            Severity.WARNING,
            f"The classes are imbalanced ({detail}) but the model starts near uniform "
            f"probabilities: its expected loss at init is {init_loss:.3g}, {ratio:.1f}x the "
            f"{prior_loss:.3g} of predicting the class prior, and training first spends its steps "
            f'learning the prior; {how} ("init well").',
            evidence,
        )

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "done": self.done}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.done = bool(state_dict.get("done", False))


# ---------------------------------------------------------------------------- helpers
def _entropy(p: Tensor) -> Tensor:
    return -(p * p.clamp_min(1e-300).log())


def _same_values(a: Tensor, b: Tensor) -> bool:
    if a.numel() != b.numel():
        return False
    return bool(torch.equal(a.detach().reshape(-1).double(), b.detach().reshape(-1).double().to(a.device)))


def _option(call: LossCall, name: str, position: int) -> Any:
    if name in call.kwargs:
        return call.kwargs[name]
    return call.args[position] if len(call.args) > position else None


def _per_class_init(call: LossCall, batch_size: int | None) -> dict[str, Any] | None:
    """Per-class loss of the initial predictions and the call's options, or ``None`` when the
    call is not one label per sample."""
    x = call.input.detach()
    if call.name in _SOFTMAX:
        view = class_scores(call)
        if view is None or view.target is None or view.num_classes < 2:
            return None
        if batch_size is None or view.scores.shape[0] != batch_size:
            return None  # per token / pixel, or a batch whose size cannot be read
        logp = torch.log_softmax(view.scores.float(), dim=1)
        weight = _option(call, "weight", 2)
        smoothing = _option(call, "label_smoothing", 7 if call.name == "cross_entropy" else 99)
        return {
            "kind": "softmax",
            "loss_fn": call.name,
            "loss": -logp.mean(0),
            "weight": (
                weight.detach().double().reshape(-1).cpu()
                if isinstance(weight, Tensor) and weight.numel() == view.num_classes
                else None
            ),
            "smoothing": float(smoothing) if isinstance(smoothing, (int, float)) else 0.0,
            "classes": view.num_classes,
            "per_batch": 1,
            "target": view.target,
        }
    target = call.target
    if not isinstance(target, Tensor) or target.shape != x.shape or x.numel() == 0:
        return None
    if batch_size is None or x.dim() == 0 or x.shape[0] != batch_size or x.dim() > 2:
        return None
    cols = 1 if x.dim() == 1 else x.shape[1]
    xs = x.float().reshape(-1, cols)
    if call.name == "binary_cross_entropy_with_logits":
        neg, pos = F.softplus(xs).mean(0), F.softplus(-xs).mean(0)
        pw = _option(call, "pos_weight", 6)
        pos_weight = pw.detach().double().reshape(-1).cpu() if isinstance(pw, Tensor) else None
    else:
        p = xs.clamp(1e-12, 1 - 1e-12)
        neg, pos = -(1 - p).log().mean(0), -p.log().mean(0)
        pos_weight = None
    return {
        "kind": "binary",
        "loss_fn": call.name,
        "loss": torch.stack([neg, pos]),
        "pos_weight": pos_weight,
        "per_batch": cols,
        "target": target,
    }


def _counts(init: dict[str, Any], target: Tensor) -> Tensor:
    """Label counts of one batch, on the target's device, without a host sync."""
    if init["kind"] == "softmax":
        c = init["classes"]
        t = target.detach().reshape(-1).long()
        valid = ((t >= 0) & (t < c)).float()
        out = torch.zeros(c, device=t.device)
        return out.index_add_(0, t.clamp(0, c - 1), valid)
    cols = init["per_batch"]
    t = target.detach().float().reshape(-1, cols)
    return torch.stack([t.sum(0), torch.full((cols,), float(t.shape[0]), device=t.device)])
