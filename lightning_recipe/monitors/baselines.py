"""BaselineMonitor: the dumb baselines (class prior, target mean) next to the train and val curves."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from lightning_recipe import _losses, stats, tensorboard
from lightning_recipe._probe import CLASS_LOSSES, REGRESSION_LOSSES, LossCall, StepResult, class_view
from lightning_recipe._validate import check_int, check_number
from lightning_recipe.callback import RecipeCallback
from lightning_recipe.findings import Severity
from lightning_recipe.monitors._ride_along import StepCapture

TAG = "recipe/baseline"
_BINARY = ("binary_cross_entropy_with_logits", "binary_cross_entropy")
_EPS = 1e-6


class BaselineMonitor(RecipeCallback):
    """Plot the loss and accuracy of a model that ignores its input, and say when yours is no better.

    Karpathy: "add significant digits to your eval ... evaluate dumb baselines"; cs231n: compare
    with chance. The dumb baselines are the best *constant* predictions: the class prior of the
    training targets (its accuracy is the majority class's share) for classifiers, the training
    target mean for regression, scored with *your* loss call: the monitor reads the loss calls of
    your own steps (no copy, no extra forward) and recomputes each with the constant prediction
    (same target, class weights, ``ignore_index``, label smoothing, reduction). It logs
    ``recipe/baseline/train_loss`` on the first ``prior_steps`` and every ``every_n_steps``
    training steps, and on the first ``num_batches`` batches of each validation run
    ``recipe/baseline/val_loss`` / ``val_acc`` with your model's ``model_val_loss`` /
    ``model_val_acc``. Custom Scalars gets "Loss vs dumb baseline" (with your ``train_loss`` /
    ``val_loss`` as copied by :class:`TrainValGapMonitor` and the interval-mean training loss of
    :class:`LossCurveMonitor`) and "Accuracy vs majority class".

    Reports ``no-better-than-baseline`` (warning) when, after ``warmup`` validation runs, on
    ``patience`` runs in a row the model's validation loss has never been ``min_gap`` (relative)
    below the baseline's nor, for classifiers, its accuracy ``min_gap`` above the majority class's
    (a run whose gap is still growing does not count): inputs that do not reach the model, labels
    that do not depend on them, a learning rate far too low, a model stuck at the prior.

    Thresholds: see docs/thresholds.md#dumb-baselines.

    Args:
        every_n_steps: capture one training step in this many (``None``: ``log_every_n_steps``).
        prior_steps: the first training steps always captured (for the prior).
        num_batches: validation batches per run read.
        min_gap: relative gap ``(baseline - model) / baseline`` a model must reach once.
        warmup: validation runs never judged at the start.
        patience: validation runs in a row without the gap before the finding.
        on_error: ``"warn"`` or ``"raise"``.

    Example::

        trainer = L.Trainer(callbacks=[BaselineMonitor()], logger=TensorBoardLogger("runs"))
        trainer.fit(model, datamodule)  # warns "[no-better-than-baseline] ..." if it learns nothing
    """

    codes = ("no-better-than-baseline",)
    what = "compare the loss with the baselines"
    needs_full_copy = False  # never runs the model on a copy

    #: place of this callback's charts in the Recipe section (lower first)
    chart_rank = 15

    def __init__(
        self,
        every_n_steps: int | None = None,
        prior_steps: int = 10,
        num_batches: int = 4,
        min_gap: float = 0.02,
        warmup: int = 2,
        patience: int = 2,
        *,
        on_error: str = "warn",
    ) -> None:
        super().__init__(on_error=on_error)
        if every_n_steps is not None:
            check_int("every_n_steps", every_n_steps, 1)
        self.every_n_steps = every_n_steps
        self.prior_steps = check_int("prior_steps", prior_steps, 0)
        self.num_batches = check_int("num_batches", num_batches, 1)
        self.min_gap = check_number("min_gap", min_gap, 0, 1, high_open=True)
        self.warmup = check_int("warmup", warmup, 0)
        self.patience = check_int("patience", patience, 1)
        self._capture = StepCapture()
        self._reset()

    def _reset(self) -> None:
        self._capture.abort()
        self._kind: str | None = None
        self._sum: Tensor | None = None  # class counts / target sums
        self._count: Tensor | None = None
        self._train_step = -1
        self._val: list[Tensor] = []
        self._val_seen = 0
        self._runs = 0
        self._streak = 0
        self._best_gap = -math.inf
        self._best_acc_gap = -math.inf
        self._last_gap: float | None = None
        self._unreadable: str | None = None

    def tensorboard_charts(self) -> dict[str, dict[str, tuple[str, list[str]]]]:
        return {
            "Recipe": {
                "Loss vs dumb baseline": (
                    "Multiline",
                    [r"recipe/train_val/(train|val)_loss$", r"recipe/loss/train$", rf"{TAG}/.*loss"],
                ),
                "Accuracy vs majority class": (
                    "Multiline",
                    [r"recipe/train_val/(train|val)_acc$", rf"{TAG}/.*acc"],
                ),
            }
        }

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit":
            self._reset()

    def _interval(self, trainer: Any) -> int:
        return self.every_n_steps or int(getattr(trainer, "log_every_n_steps", 50) or 50)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        step = int(trainer.global_step)
        if not self.active or self._unreadable or step == self._train_step:
            return
        if step < self.prior_steps or step % self._interval(trainer) == 0:
            self._train_step = step
            self.run_safely(trainer, "on_train_batch_start", self._capture.start, pl_module)

    def on_before_backward(self, trainer: Any, pl_module: Any, loss: Tensor) -> None:
        if self._capture.active:
            self.run_safely(trainer, "on_before_backward", self._train_result, trainer, loss)

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._capture.active:
            self.run_safely(trainer, "on_train_batch_end", self._train_result, trainer, None)

    def _train_result(self, trainer: Any, loss: Tensor | None) -> None:
        result = self._capture.stop(loss)
        if result is None:
            return
        with torch.no_grad():
            call = self._readable(result)
            if call is None:
                return
            self._absorb_targets(call)
            if self._train_step % self._interval(trainer) == 0:
                base = self._baseline_loss(call)
                if base is not None:
                    host = stats.to_host({"train_loss": base})
                    tensorboard.log_scalars(trainer, {f"{TAG}/train_loss": host["train_loss"]})

    def on_validation_batch_start(
        self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if getattr(trainer, "sanity_checking", False) or not self.active or self._unreadable:
            return
        if dataloader_idx == 0 and self._val_seen < self.num_batches and self._sum is not None:
            self._val_seen += 1
            self.run_safely(trainer, "on_validation_batch_start", self._capture.start, pl_module)

    def on_validation_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if self._capture.active:
            self.run_safely(trainer, "on_validation_batch_end", self._val_result)

    def _val_result(self) -> None:
        result = self._capture.stop(None)
        if result is None:
            return
        with torch.no_grad():
            call = self._readable(result)
            row = self._compare(call) if call is not None else None
        if row is not None:
            self._val.append(row)

    def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        # not @guarded: every rank must reach the collective after every validation run
        self._capture.abort()
        if getattr(trainer, "sanity_checking", False) or not _fitting(trainer):
            return
        self._runs += 1
        flat = bool(self.run_safely(trainer, "on_validation_epoch_end", self._measure, trainer))
        flat = bool(trainer.strategy.reduce_boolean_decision(flat, all=True))
        if self._runs <= self.warmup:
            return
        self._streak = self._streak + 1 if flat else 0
        if self.active and self._streak >= self.patience and not self.has_reported("no-better-than-baseline"):
            self.run_safely(trainer, "on_validation_epoch_end", self._report, trainer)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._capture.abort()
        super().on_exception(trainer, pl_module, exception)

    def teardown_diagnostics(self) -> None:
        self._capture.abort()
        self._val = []

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._capture.abort()
        if self._runs and "gap" not in self.figures and not self._unreadable:
            self.figures["note"] = (
                "no validation loss call was read (validation_step calls no torch.nn.functional loss), "
                "so only the training baseline was logged"
            )
        if self._unreadable and not self.has_reported("check-skipped"):
            self.figures["skipped"] = self._unreadable
            self.report(
                trainer,
                "check-skipped",
                Severity.INFO,
                f"BaselineMonitor did not compare with a dumb baseline: {self._unreadable}.",
                {"reason": self._unreadable},
            )

    # ------------------------------------------------------------------ reading calls
    def _readable(self, result: StepResult) -> LossCall | None:
        call = result.main_call
        kind = _kind(call)
        if kind is None:
            if call is not None and self._kind is None:
                self._unreadable = f"no constant baseline is defined for a {call.name} loss"
            return None
        if self._kind is not None and kind != self._kind:
            return None
        self._kind = kind
        return call

    def _absorb_targets(self, call: LossCall) -> None:
        target = call.target[0] if isinstance(call.target, (tuple, list)) else call.target
        target = target.detach()
        if self._kind == "classification":
            view = class_view(call)
            assert view is not None and view.target is not None
            c, t = view.num_classes, view.target
            t = t[(t >= 0) & (t < c)]
            counts = torch.bincount(t.long(), minlength=c).float()
            total = torch.ones((), device=counts.device) * t.numel()
        else:
            x = call.input
            t = target.float()
            if x.dim() == 2 and t.shape == x.shape:  # per output column
                counts, total = t.sum(0), torch.ones((), device=t.device) * t.shape[0]
            else:
                counts, total = t.sum().reshape(1), torch.ones((), device=t.device) * t.numel()
        if self._sum is None or self._count is None or self._sum.shape != counts.shape:
            self._sum, self._count = torch.zeros_like(counts), torch.zeros((), device=counts.device)
        elif self._sum.device != counts.device:  # restored from a checkpoint on the CPU
            self._sum, self._count = self._sum.to(counts.device), self._count.to(counts.device)
        self._sum += counts
        self._count += total

    def _constant(self, call: LossCall) -> Tensor | None:
        """The baseline's prediction, shaped like ``call.input``."""
        if self._sum is None or self._count is None:
            return None
        x = call.input.detach()
        if self._kind == "classification":
            prior = (self._sum + 0.5) / (self._sum + 0.5).sum()
            if prior.numel() != (x.shape[1] if x.dim() > 1 else x.shape[0]):
                return None
            logp = prior.log().to(device=x.device, dtype=x.dtype)
            shape = [1] * x.dim()
            shape[1 if x.dim() > 1 else 0] = -1
            return logp.view(shape).expand_as(x)
        mean = (self._sum / self._count.clamp_min(1)).to(x.device)
        if self._kind == "binary":
            p = mean.clamp(_EPS, 1 - _EPS)
            mean = (p / (1 - p)).log() if call.name == "binary_cross_entropy_with_logits" else p
        if mean.numel() > 1 and (x.dim() != 2 or x.shape[1] != mean.numel()):
            mean = mean.mean().reshape(1)
        return (
            mean.to(x.dtype).expand_as(x) if mean.numel() > 1 else mean.to(x.dtype).reshape(()).expand_as(x)
        )

    def _baseline_loss(self, call: LossCall) -> Tensor | None:
        if getattr(call, "kind", "") == "distribution":
            # a predicted distribution: the better know-nothing distribution through the same
            # log-likelihood (fitted to the targets when it has loc/scale, the batch-mean
            # parameters), not a tensor put in place of one of its parameters
            ref = _losses.know_nothing_loss(call)
            if ref is None:
                self._unreadable = f"no know-nothing distribution could be built for a {call.name} loss"
                return None
            return ref[0].detach().float().reshape(())
        base = self._constant(call)
        if base is None:
            return None
        try:
            out = call.recompute(base).detach().float()
        except Exception as exc:  # a loss module that refuses the target mean as its input
            if not isinstance(call, _losses.ModuleLossCall):
                raise
            # its input is not a prediction of the target itself (distribution parameters, a
            # loc and a raw scale): the batch-mean prediction, the output layer reduced to its
            # bias, is the constant baseline then
            ref = _losses.know_nothing_loss(call, prefer=_losses.CONSTANT)
            if ref is None or ref[1] != _losses.CONSTANT:
                why = f"{type(exc).__name__}: {exc}"
                self._unreadable = (
                    f"the {call.name} loss could not be computed on a constant prediction ({why})"
                )
                return None
            self.figures["baseline_kind"] = "batch-mean prediction (the output layer reduced to its bias)"
            return ref[0].detach().float().reshape(())
        return out.mean() if out.dim() else out

    def _compare(self, call: LossCall) -> Tensor | None:
        """[model loss, baseline loss, model acc, baseline acc] on one validation batch (device)."""
        base = self._baseline_loss(call)
        if base is None:
            return None
        out = call.output.detach().float()
        model = out.mean() if out.dim() else out
        accs = self._accuracies(call)
        nan = torch.full((), float("nan"), device=model.device)
        row = [model, base.to(model.device)] + (
            [a.to(model.device) for a in accs[:2]] if accs else [nan, nan]
        )
        row.append(accs[2].to(model.device).float() if accs else nan)
        return torch.stack(row)

    def _accuracies(self, call: LossCall) -> tuple[Tensor, Tensor, Tensor] | None:
        """(model accuracy, baseline accuracy, number of targets) on one batch."""
        if self._kind == "classification" and self._sum is not None:
            view = class_view(call)
            if view is None or view.target is None:
                return None
            t = view.target
            keep = (t >= 0) & (t < view.num_classes)
            if not bool(keep.any()):
                return None
            t = t[keep]
            model = (view.scores[keep].argmax(1) == t).float().mean()
            majority = self._sum.argmax().to(t.device)
            return model, (t == majority).float().mean(), torch.tensor(float(t.numel()))
        if self._kind == "binary" and self._sum is not None and self._count is not None:
            t = call.target.detach().float() > 0.5
            x = call.input.detach().float()
            pred = x > 0 if call.name == "binary_cross_entropy_with_logits" else x > 0.5
            base = ((self._sum / self._count.clamp_min(1)) > 0.5).to(t.device)
            base = base.expand_as(t) if base.numel() > 1 and t.dim() == 2 else base.reshape(()).expand_as(t)
            return (pred == t).float().mean(), (base == t).float().mean(), torch.tensor(float(t.numel()))
        return None

    # ------------------------------------------------------------------ verdict
    def _measure(self, trainer: Any) -> bool:
        rows, self._val, self._val_seen = self._val, [], 0
        if not rows:
            return False
        host = stats.vector_to_host(torch.stack(rows).nanmean(0))  # one transfer per validation run
        model, base, model_acc, base_acc, per_batch = host
        n = per_batch * len(rows)
        metrics = {f"{TAG}/val_loss": base, f"{TAG}/model_val_loss": model}
        if math.isfinite(model_acc):
            metrics.update({f"{TAG}/val_acc": base_acc, f"{TAG}/model_val_acc": model_acc})
        metrics = {k: v for k, v in metrics.items() if math.isfinite(v)}
        tensorboard.log_scalars(trainer, metrics)
        self.figures.update({k.split("/")[-1]: v for k, v in metrics.items()})
        if not (math.isfinite(model) and math.isfinite(base)) or base <= 0:
            return False
        gap = (base - model) / abs(base)
        # a gap at the baseline's level that grew by half the margin since the last run: still
        # learning (slow starts); far below the baseline a rising gap is a model still learning
        # the constant (its output bias), not its input
        growing = (
            self._last_gap is not None and gap > -self.min_gap and gap - self._last_gap >= self.min_gap / 2
        )
        self._last_gap = gap
        self._best_gap = max(self._best_gap, gap)
        self.figures.update({"gap": gap, "best_gap": self._best_gap, "validation_runs": self._runs})
        flat = self._best_gap < self.min_gap and not growing
        if math.isfinite(model_acc) and n > 0:
            # an accuracy gap counts when it is beyond the noise of the batches read (3 sigma)
            noise = 3.0 * math.sqrt(max(base_acc * (1 - base_acc), 0.01) / n)
            self._best_acc_gap = max(self._best_acc_gap, model_acc - base_acc - noise)
            flat = flat and self._best_acc_gap < self.min_gap
        return flat

    def _report(self, trainer: Any) -> None:
        f = self.figures
        name = "the training class prior" if self._kind != "regression" else "the training target mean"
        acc = ""
        if "model_val_acc" in f:
            acc = f"; accuracy {f['model_val_acc']:.1%} vs {f['val_acc']:.1%} for always the majority class"
        self.report(
            trainer,
            "no-better-than-baseline",
            Severity.WARNING,
            f"After {self._runs} validation runs the model's validation loss ({f['model_val_loss']:.4g}) "
            f"is no better than predicting {name} for every input ({f['val_loss']:.4g} with your loss; "
            f"best gap so far {self._best_gap:.1%}, want {self.min_gap:.0%}{acc}): the model has learned "
            "nothing a constant could not; check that the inputs reach the model and the labels depend "
            "on them, raise a learning rate far too low, and on imbalanced classes start the output "
            "bias at the log prior.",
            {
                "model_val_loss": f["model_val_loss"],
                "baseline_val_loss": f["val_loss"],
                "model_val_acc": f.get("model_val_acc"),
                "baseline_val_acc": f.get("val_acc"),
                "best_gap": self._best_gap,
                "min_gap": self.min_gap,
                "validation_runs": self._runs,
                "baseline": "class prior" if self._kind != "regression" else "target mean",
            },
        )

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "runs": self._runs,
            "streak": self._streak,
            "best_gap": self._best_gap,
            "best_acc_gap": self._best_acc_gap,
            "last_gap": self._last_gap,
            "kind": self._kind,
            "sum": None if self._sum is None else self._sum.tolist(),
            "count": None if self._count is None else float(self._count),
            "train_step": self._train_step,
            "unreadable": self._unreadable,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._reset()
        self._runs = int(state_dict.get("runs", 0))
        self._streak = int(state_dict.get("streak", 0))
        self._best_gap = float(state_dict.get("best_gap", -math.inf))
        self._best_acc_gap = float(state_dict.get("best_acc_gap", -math.inf))
        last = state_dict.get("last_gap")
        self._last_gap = None if last is None else float(last)
        self._kind = state_dict.get("kind")
        if state_dict.get("sum") is not None and state_dict.get("count") is not None:
            self._sum = torch.tensor(state_dict["sum"], dtype=torch.float32)
            self._count = torch.tensor(float(state_dict["count"]))
        self._train_step = int(state_dict.get("train_step", -1))
        self._unreadable = state_dict.get("unreadable")


def _kind(call: LossCall | None) -> str | None:
    if call is None:
        return None
    if call.name in CLASS_LOSSES or not isinstance(call, LossCall):
        view = class_view(call)
        if view is not None and view.target is not None:
            return "classification"
        if call.name in CLASS_LOSSES:
            return None
    target = call.target
    if isinstance(target, (tuple, list)) and target and isinstance(target[0], Tensor):
        target = target[0]
    if not isinstance(target, Tensor) or not target.is_floating_point():
        return None
    if call.name in _BINARY and target.shape == call.input.shape:
        return "binary"
    if call.name in REGRESSION_LOSSES and target.numel() == call.input.numel():
        return "regression"
    if not isinstance(call, LossCall) and isinstance(call.input, Tensor) and call.input.is_floating_point():
        # a module, distribution or hand-written loss: the target mean, fed through that loss
        return "regression"
    return None


def _fitting(trainer: Any) -> bool:
    fn = getattr(getattr(trainer, "state", None), "fn", None)
    return getattr(fn, "value", fn) in ("fit", None)
