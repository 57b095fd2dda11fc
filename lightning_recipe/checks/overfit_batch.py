"""OverfitBatchCheck: can a copy of the model memorise a handful of samples?"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from lightning_recipe import _context, _losses, tensorboard
from lightning_recipe._probe import (
    CHANCE,
    CLASS_LOSSES,
    REGRESSION_LOSSES,
    LossCall,
    ProbeSkip,
    StepFn,
    class_scores,
    copy_module,
    is_manual_optimization,
    know_nothing_loss,
    looks_like_probabilities,
    preserved_rng,
    run_step,
)
from lightning_recipe._validate import check_int
from lightning_recipe.batch import BatchLayoutError, Getter
from lightning_recipe.checks.base import FirstBatchCheck
from lightning_recipe.findings import RecipeError, Severity

#: losses that are >= 0 and reach 0 on a perfect prediction (hard targets)
_ZERO_FLOOR = (
    *CLASS_LOSSES,
    *REGRESSION_LOSSES,
    "binary_cross_entropy",
    "binary_cross_entropy_with_logits",
    "kl_div",
    "soft_margin_loss",
    "multilabel_soft_margin_loss",
    "multilabel_margin_loss",
    "hinge_embedding_loss",
    "cosine_embedding_loss",
    "margin_ranking_loss",
    "triplet_margin_loss",
    "ctc_loss",
)
_BINARY = ("binary_cross_entropy", "binary_cross_entropy_with_logits")
#: a model stuck with at most this fraction of ``reference - floor`` left fitted most of the way:
#: an info (broken models stay at 0.44 or more; neuralforecast's NHITS on an L1 loss at 0.083)
PARTIAL_GAP = 0.2
_DROPOUT_FNS = {
    F.dropout,
    F.dropout1d,
    F.dropout2d,
    F.dropout3d,
    F.alpha_dropout,
    F.feature_alpha_dropout,
    torch.dropout,
    torch.alpha_dropout,
    torch.feature_dropout,
    torch.feature_alpha_dropout,
}


class OverfitBatchCheck(FirstBatchCheck):
    """Overfit a handful of samples of the first batch on a copy of the model.

    cs231n: "overfit a tiny subset of data (e.g. 20 samples) and make sure you can achieve zero
    cost"; Karpathy: "overfit one batch". Before the first real step a deep copy is trained with
    your ``training_step`` on the first ``num_samples`` samples alone -- dropout off, no weight
    decay, regularisers left out, every step from the same RNG state -- with a fresh Adam at each
    of ``lrs`` in turn until one memorises: ``loss - floor <= tolerance * (reference - floor)``,
    the floor being what the samples allow (0, the entropy of soft targets, or of labels that
    equal inputs share) and the reference the chance loss (classifiers), the target-mean loss
    (regression) or the first loss. Accuracy is reported, not required to reach 100%.

    Reports ``overfit-batch-failed``: an error when every rate got stuck or diverged, or when the
    loss depends on no trainable parameter; info when the budget ran out while the loss was still
    falling, or when the cause is already reported as ``softmax-before-loss``. Logs
    ``recipe/overfit_batch/loss`` and ``.../accuracy`` against the probe's own step.

    Thresholds: see docs/thresholds.md#overfit-batch.

    Args:
        num_samples: how many samples of the first batch to memorise (cs231n: ~20).
        lrs: Adam learning rates to try in turn (each > 0).
        max_steps: optimizer steps per learning rate at most.
        time_limit: seconds for the whole check at most; when exceeded the check stops with an
            info finding and the numbers reached.
        tolerance: ``loss - floor`` must fall to this fraction of ``reference - floor``.
        patience: a trial whose best loss improved by less than 10% over this many steps is
            stuck.
        get_input, get_target, step_fn, on_error: see :class:`FirstBatchCheck`.

    Example::

        trainer = L.Trainer(callbacks=[OverfitBatchCheck()])
        trainer.fit(model, datamodule)
        # "[overfit-batch-failed] A copy of the model could not memorise 20 samples of the first
        #  batch (dropout and weight decay off, Adam at lr=0.01 (stuck after 64 steps), ...): the
        #  best loss was 0.7437 (floor 0, chance loss 1.386, target <= 0.01386), accuracy 100.0%;
        #  every prediction is right but the loss cannot fall further: ..."
    """

    codes = ("overfit-batch-failed",)

    #: place of this callback's charts in the Recipe section (lower first)
    chart_rank = 80

    what = "overfit the first samples"

    def __init__(
        self,
        num_samples: int = 20,
        lrs: tuple[float, ...] = (1e-2, 1e-3, 1e-4),
        max_steps: int = 300,
        time_limit: float = 30.0,
        tolerance: float = 0.01,
        patience: int = 50,
        *,
        get_input: Getter | None = None,
        get_target: Getter | None = None,
        step_fn: StepFn | None = None,
        on_error: str = "warn",
    ) -> None:
        super().__init__(get_input=get_input, get_target=get_target, step_fn=step_fn, on_error=on_error)
        check_int("num_samples", num_samples)
        check_int("max_steps", max_steps)
        check_int("patience", patience)
        if isinstance(lrs, (int, float)) and not isinstance(lrs, bool):
            lrs = (lrs,)
        if (
            not isinstance(lrs, (tuple, list))
            or not lrs
            or not all(_is_number(v) and 0 < v < 10 for v in lrs)
        ):
            raise ValueError(f"`lrs` must be a non-empty sequence of learning rates in (0, 10), got {lrs!r}")
        if not _is_number(time_limit) or not time_limit > 0:
            raise ValueError(f"`time_limit` must be a number of seconds > 0, got {time_limit!r}")
        if not _is_number(tolerance) or not 0 < tolerance < 1:
            raise ValueError(f"`tolerance` must be a number in (0, 1), got {tolerance!r}")
        self.num_samples = num_samples
        self.lrs = tuple(float(v) for v in lrs)
        self.max_steps = max_steps
        self.time_limit = float(time_limit)
        self.tolerance = float(tolerance)
        self.patience = patience

    # ------------------------------------------------------------------ one-shot API
    def check(self, trainer: Any | None, module: nn.Module, batch: Any) -> None:
        """Try to memorise the first ``num_samples`` samples of ``batch`` and judge."""
        if self.step_fn is None and is_manual_optimization(module):
            raise ProbeSkip(
                "the module uses manual optimisation, so its training_step steps the optimizers; "
                "pass step_fn=lambda model, batch: loss to run the overfit check"
            )
        samples, n = self._samples(batch)
        deadline = time.perf_counter() + self.time_limit
        trials: list[_Trial] = []
        with preserved_rng():
            for lr in self.lrs:
                trial = self._trial(trainer, module, samples, lr, deadline)
                trials.append(trial)
                if trial.outcome in ("memorised", "no-grad", "time") or not trial.scale.judged:
                    break
        self._judge(trainer, trials, n)

    # ------------------------------------------------------------------ work
    def _samples(self, batch: Any) -> tuple[Any, int | None]:
        try:
            size = self.adapter.batch_size(batch)
        except BatchLayoutError:
            return batch, None  # the whole batch, its size unknown
        k = min(self.num_samples, size)
        return (self.adapter.slice(batch, k) if k < size else batch), k

    def _trial(
        self, trainer: Any | None, module: nn.Module, samples: Any, lr: float, deadline: float
    ) -> _Trial:
        model = copy_module(module, trainer)
        for m in model.modules():
            if isinstance(m, nn.modules.dropout._DropoutNd):
                m.eval()
            elif isinstance(m, (nn.MultiheadAttention, nn.RNNBase)):
                m.dropout = 0.0  # not eval(): cuDNN's RNN backward refuses to run in eval mode
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ProbeSkip("the model has no trainable parameters")
        opt = torch.optim.Adam(params, lr=lr, weight_decay=0.0)
        trial = _Trial(lr)
        start = time.perf_counter()
        with torch.enable_grad(), _NoDropout():
            for step in range(self.max_steps):
                try:
                    # the same random draws every step: augmentation or masking done inside
                    # training_step is frozen, as if the samples were a fixed dataset
                    with preserved_rng():
                        outcome = self._step(trial, model, samples, opt, step, deadline)
                except (ProbeSkip, RecipeError):
                    raise
                except Exception as exc:
                    raise ProbeSkip(
                        f"training_step failed on a copy of the model at probe step {step} "
                        f"({type(exc).__name__}: {exc})"
                    ) from exc
                if outcome is not None:
                    trial.outcome = outcome
                    break
        trial.seconds = time.perf_counter() - start
        return trial

    def _step(
        self, trial: _Trial, model: nn.Module, samples: Any, opt: Any, step: int, deadline: float
    ) -> str | None:
        """One optimizer step on the samples; the trial's outcome when it ends here."""
        result = run_step(model, samples, self.step_fn)
        loss = result.data_loss
        if loss is None:
            raise ProbeSkip("training_step returned None on the first batch")
        call = result.main_call
        if step == 0:
            trial.scale = _scale(call, loss)
            self._add_ambiguity_floor(trial.scale, call, samples)
        if not loss.requires_grad:
            trial.record(float(loss.detach().float()), None)
            return "no-grad"
        trial.record(float(loss.detach().float()), _accuracy(call))
        if self._memorised(trial):
            return "memorised"
        if not math.isfinite(trial.losses[-1]):
            return "diverged"
        if self._stuck(trial):
            return "stuck"
        if time.perf_counter() > deadline:
            return "time"
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return None

    def _add_ambiguity_floor(self, scale: _Scale, call: LossCall | None, samples: Any) -> None:
        """Raise the floor to what the samples allow when the same input (or, for sequence
        targets, the same prefix of tokens) comes with different labels."""
        if call is None or scale.floor > 0:
            return
        try:
            x = self.adapter.input(samples)
        except BatchLayoutError:
            return
        floor = ambiguity_floor(call, x)
        if floor is not None and floor[0] > 0:
            scale.floor, scale.floor_kind = floor

    def _memorised(self, trial: _Trial) -> bool:
        s = trial.scale
        if not s.judged:
            return False
        return trial.losses[-1] - s.floor <= self.tolerance * (s.reference - s.floor)

    def _stuck(self, trial: _Trial) -> bool:
        n = len(trial.losses)
        if n <= self.patience:
            return False
        floor = trial.scale.floor
        before = min(trial.losses[: n - self.patience]) - floor
        now = min(trial.losses) - floor
        return now > before / 1.1

    # ------------------------------------------------------------------ verdict
    def _judge(self, trainer: Any | None, trials: list[_Trial], n: int | None) -> None:
        done = next((t for t in trials if t.outcome == "memorised"), None)
        best = done or min(trials, key=lambda t: t.best_gap)
        s = best.scale
        steps = sum(len(t.losses) for t in trials)
        seconds = sum(t.seconds for t in trials)
        evidence = {
            "samples": n,
            "loss_fn": s.loss_fn,
            "lr": best.lr,
            "steps": len(best.losses),
            "total_steps": steps,
            "seconds": round(seconds, 3),
            "first_loss": best.losses[0],
            "best_loss": best.best,
            "floor": s.floor,
            "floor_kind": s.floor_kind or "loss minimum",
            "reference": s.reference,
            "reference_kind": s.reference_kind,
            "relative_gap": best.relative_gap,
            "accuracy": best.best_accuracy,
            "tolerance": self.tolerance,
            "trials": [t.summary() for t in trials],
        }
        self.figures.update({k: v for k, v in evidence.items() if k != "trials"})
        self.figures["outcomes"] = [f"lr={t.lr:g}: {t.outcome}" for t in trials]
        self._log_curve(trainer, best)
        what = f"{n} samples of the first batch" if n else "the first batch"
        acc = f", accuracy {best.best_accuracy:.1%}" if best.best_accuracy is not None else ""
        if done is not None:
            return
        if best.outcome == "no-grad":
            self.report(
                trainer,
                "overfit-batch-failed",
                Severity.ERROR,
                f"The loss of training_step ({best.losses[0]:.4g}) does not depend on any trainable "
                "parameter, so nothing can learn: look for torch.no_grad(), .detach() or "
                ".item() between the parameters and the loss.",
                evidence,
            )
            return
        tried = ", ".join(f"lr={t.lr:g} ({t.outcome} after {len(t.losses)} steps)" for t in trials)
        why = f" from {s.floor_kind}" if s.floor_kind else ""
        numbers = (
            f"the best loss was {best.best:.4g} (floor {s.floor:.4g}{why}, {s.reference_kind} "
            f"{s.reference:.4g}, target <= {s.floor + self.tolerance * (s.reference - s.floor):.4g}){acc}"
        )
        if not s.judged:
            kind = f"{s.loss_fn} has no known floor" if s.loss_fn else "no torch.nn.functional loss was seen"
            self.report(
                trainer,
                "overfit-batch-failed",
                Severity.INFO,
                f"Trained a copy of the model on {what} with Adam at {tried}: the loss went from "
                f"{best.losses[0]:.4g} to {best.best:.4g}; {kind}, so this is not judged.",
                evidence,
            )
        elif all(t.outcome in ("stuck", "diverged") for t in trials) and (
            best.relative_gap <= PARTIAL_GAP and not s.probabilities
        ):
            # most of the way down and then stuck: the bugs this check exists for stay at 0.44 or
            # more of the way (docs/thresholds.md#overfit-batch); a non-smooth loss (L1, quantile)
            # under Adam at a constant rate plateaus where the rate puts it
            self.report(
                trainer,
                "overfit-batch-failed",
                Severity.INFO,
                f"A copy of the model fitted {what} most of the way but not to the end (Adam at {tried}): "
                f"{numbers}; {best.relative_gap:.1%} of the way from the {s.reference_kind} to the floor "
                f"is left, under the {PARTIAL_GAP:.0%} that the bugs this check looks for never get "
                "below; a non-smooth loss (L1, quantile) plateaus where the learning rate puts it.",
                evidence,
            )
        elif all(t.outcome in ("stuck", "diverged") for t in trials):
            severity = Severity.ERROR
            if s.probabilities:
                hint = (
                    f"the input of {s.loss_fn} is already probabilities, so it cannot fall to its "
                    "floor: remove the softmax at the end of the model (softmax-before-loss)"
                )
                if _softmax_reported_elsewhere(trainer):
                    severity = Severity.INFO  # the error is softmax-before-loss, reported once
            elif best.best_accuracy == 1.0:
                hint = (
                    "every prediction is right but the loss cannot fall further: the output is "
                    "probably squashed (a softmax/sigmoid before a loss that applies its own)"
                )
            else:
                hint = (
                    "a correct model drives it to ~0, so look for a bug in the model (a frozen or "
                    "detached part, a squashed output, an input that never reaches the output), the "
                    "loss or the labels, or for a model too small to fit even these samples"
                )
            self.report(
                trainer,
                "overfit-batch-failed",
                severity,
                f"A copy of the model could not memorise {what} (dropout and weight decay off, "
                f"Adam at {tried}): {numbers}; {hint}.",
                evidence,
            )
        else:
            reason = "the time limit" if any(t.outcome == "time" for t in trials) else "max_steps"
            self.report(
                trainer,
                "overfit-batch-failed",
                Severity.INFO,
                f"Not judged: {reason} ran out while the loss was still falling (Adam at {tried}; "
                f"{seconds:.1f}s): {numbers}; raise time_limit / max_steps to get a verdict.",
                evidence,
            )

    def _log_curve(self, trainer: Any | None, trial: _Trial) -> None:
        writer = tensorboard.get_writer(trainer)
        if writer is None:
            return
        for i, loss in enumerate(trial.losses):
            if math.isfinite(loss):
                writer.add_scalar("recipe/overfit_batch/loss", loss, global_step=i)
        for i, acc in enumerate(trial.accuracies):
            if acc is not None:
                writer.add_scalar("recipe/overfit_batch/accuracy", acc, global_step=i)

    def tensorboard_charts(self) -> dict[str, dict[str, tuple[str, list[str]]]]:
        return {"Recipe": {"overfit one batch (probe steps)": ("Multiline", [r"recipe/overfit_batch/loss"])}}


# ---------------------------------------------------------------------------- trial state
@dataclass
class _Scale:
    """What the loss of this batch can reach (floor) and what it is measured against."""

    loss_fn: str | None = None
    floor: float = 0.0
    #: why the floor is above 0 (shown in the message)
    floor_kind: str = ""
    reference: float = float("nan")
    reference_kind: str = "first loss"
    judged: bool = True
    #: the loss input is already probabilities (softmax-before-loss)
    probabilities: bool = False


@dataclass
class _Trial:
    lr: float
    outcome: str = "max_steps"
    scale: _Scale = field(default_factory=_Scale)
    losses: list[float] = field(default_factory=list)
    accuracies: list[float | None] = field(default_factory=list)
    seconds: float = 0.0

    def record(self, loss: float, accuracy: float | None) -> None:
        self.losses.append(loss)
        self.accuracies.append(accuracy)
        if math.isnan(self.scale.reference) and math.isfinite(loss):
            self.scale.reference = loss  # "first loss" reference

    @property
    def best(self) -> float:
        finite = [v for v in self.losses if math.isfinite(v)]
        return min(finite) if finite else float("nan")

    @property
    def best_gap(self) -> float:
        gap = self.relative_gap
        return gap if math.isfinite(gap) else float("inf")

    @property
    def relative_gap(self) -> float:
        s = self.scale
        span = s.reference - s.floor
        return (self.best - s.floor) / span if span > 0 else float("nan")

    @property
    def best_accuracy(self) -> float | None:
        seen = [a for a in self.accuracies if a is not None]
        return max(seen) if seen else None

    def summary(self) -> dict[str, Any]:
        return {
            "lr": self.lr,
            "outcome": self.outcome,
            "steps": len(self.losses),
            "best_loss": self.best,
            "seconds": round(self.seconds, 3),
        }


# ---------------------------------------------------------------------------- helpers
def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _scalar(t: Tensor) -> float:
    t = t.detach().float()
    return float(t if t.dim() == 0 else t.mean())


def _scale(call: LossCall | None, loss: Tensor) -> _Scale:
    """Floor and reference of the loss in ``call`` (the first-loss reference otherwise)."""
    if call is None:
        return _Scale(judged=False)
    if not isinstance(call, LossCall):
        return _any_scale(call)
    scale = _Scale(loss_fn=call.name, judged=call.name in _ZERO_FLOOR)
    scale.probabilities = looks_like_probabilities(call) is not None
    with torch.no_grad():
        ideal = _ideal_input(call)
        if ideal is not None:
            scale.floor = max(0.0, _scalar(call.recompute(ideal)))
        ref = know_nothing_loss(call)
        if ref is not None and (ref[1] == CHANCE or _scalar(ref[0]) > 0):
            scale.reference, scale.reference_kind = _scalar(ref[0]), ref[1]
    return scale


def _any_scale(call: Any) -> _Scale:
    """Any other loss (a custom module, a metric, a distribution's likelihood): the floor is the
    user's own loss of the ideal prediction (the target itself, or confident one-hot scores;
    ``_losses.ideal_prediction``), the reference its loss of a constant prediction; judged only
    when both exist and the floor is below the reference (a likelihood has no floor)."""
    scale = _Scale(loss_fn=call.name, judged=False)
    with torch.no_grad():
        ref = know_nothing_loss(call)
        if ref is not None:
            scale.reference, scale.reference_kind = _scalar(ref[0]), ref[1]
        ideal = _losses.ideal_prediction(call)
        if ideal is None or ref is None:
            return scale
        try:
            floor = _scalar(call.recompute(ideal))
        except Exception:
            return scale
    if math.isfinite(floor) and floor < scale.reference:
        scale.floor = floor
        scale.floor_kind = "the loss of a perfect prediction" if abs(floor) > 1e-6 else ""
        scale.judged = True
    return scale


def _softmax_reported_elsewhere(trainer: Any | None) -> bool:
    """True when LossAtInitCheck or ModelLintCheck is on the trainer: one of them reports
    ``softmax-before-loss`` as the error, so the overfit failure it causes is only info."""
    return _context.reports_code(trainer, "softmax-before-loss")


def _float_target_like(call: LossCall) -> bool:
    t = call.target
    return isinstance(t, Tensor) and t.is_floating_point()


def _ideal_input(call: LossCall) -> Tensor | None:
    """The best possible prediction for targets that are not hard (smoothed or soft labels);
    ``None`` where the best loss is 0."""
    x, t = call.input.detach(), call.target
    if not isinstance(t, Tensor):
        return None
    if call.name == "cross_entropy":
        smoothing = float(call.kwargs.get("label_smoothing", 0.0) or 0.0)
        if len(call.args) > 7:  # (input, target, weight, size_average, ignore_index, reduce, reduction, ls)
            smoothing = float(call.args[7] or 0.0)
        soft = t.is_floating_point()
        if not soft and smoothing == 0.0:
            return None
        c = x.shape[1] if x.dim() > 1 else x.shape[0]
        if soft:
            q = t.detach().to(x.dtype)
        else:
            q = F.one_hot(t.clamp(0, c - 1), c).to(x.dtype)
            q = q.movedim(-1, 1) if x.dim() > 1 else q
        q = (1 - smoothing) * q + smoothing / c
        return q.clamp_min(1e-12).log()
    if call.name in _BINARY and t.is_floating_point() and t.shape == x.shape:
        soft = bool(((t > 0) & (t < 1)).any())
        if not soft:
            return None
        p = t.detach().to(x.dtype).clamp(1e-6, 1 - 1e-6)
        return p if call.name == "binary_cross_entropy" else torch.log(p / (1 - p))
    return None


def ambiguity_floor(call: LossCall, x: Tensor) -> tuple[float, str] | None:
    """The lowest mean cross-entropy any model can reach on these samples when equal inputs carry
    different labels: the empirical conditional entropy of the label given the input.

    With one target per sample the key is the whole input; with one per token of an integer
    (B, T) input it is the prefix ``x[b, :t+1]``, what a causal model sees when it predicts
    position t (also for a (B, T + 1) batch that the step splits into ``x[:, :-1]`` and
    ``x[:, 1:]``). A language model's first position sees one token (BOS, or a window's first
    character) that many samples share with different next tokens, so its loss cannot reach 0
    (docs/thresholds.md#overfit-batch). A model that sees the whole sequence could go lower, so
    for it this floor is lenient, never strict.
    ``None`` when the call is not cross-entropy/NLL over integer classes or the shapes do not
    match one of those two layouts.
    """
    view = class_scores(call)
    if call.name not in ("cross_entropy", "nll_loss") or view is None or view.target is None:
        return None
    target = view.target.detach()
    b = x.shape[0] if x.dim() > 0 else 0
    if b == 0 or target.numel() == 0:
        return None
    with torch.no_grad():
        if target.numel() == b:
            keys, kind = _row_keys(x), "equal inputs with different labels"
        elif x.dim() == 2 and not x.is_floating_point() and target.numel() == x.numel():
            keys, kind = _prefix_keys(x), "equal token prefixes with different next labels"
        elif x.dim() == 2 and not x.is_floating_point() and target.numel() == b * (x.shape[1] - 1):
            # one tensor of tokens, split inside the step: x[:, :-1] predicts x[:, 1:]
            keys, kind = _prefix_keys(x[:, :-1]), "equal token prefixes with different next labels"
        else:
            return None
        keys, target = keys.reshape(-1).to(target.device), target.reshape(-1)
        valid = (target >= 0) & (target < view.num_classes)
        ignore = call.kwargs.get("ignore_index", call.args[4] if len(call.args) > 4 else None)
        if isinstance(ignore, int):
            valid &= target != ignore
        if not bool(valid.any()):
            return None
        keys, target = keys[valid], target[valid]
        _, key_id, key_n = torch.unique(keys, return_inverse=True, return_counts=True)
        pairs = torch.stack([key_id, target.long()], dim=1)
        _, pair_id, pair_n = torch.unique(pairs, dim=0, return_inverse=True, return_counts=True)
        nll = -(pair_n[pair_id].double() / key_n[key_id].double()).log()
    return float(nll.mean()), kind


def _row_keys(x: Tensor) -> Tensor:
    """One int64 key per sample, equal for equal inputs (a polynomial hash of the values)."""
    flat = x.detach().reshape(x.shape[0], -1)
    ints = flat.view(torch.int32) if flat.dtype == torch.float32 else flat.double().view(torch.int64)
    h = torch.zeros(flat.shape[0], dtype=torch.int64, device=flat.device)
    for col in ints.long().unbind(1):
        h = h * 1_000_003 + col
    return h


def _prefix_keys(x: Tensor) -> Tensor:
    """(B, T) int64 keys, equal where two rows share the prefix ``x[b, :t+1]``."""
    h = torch.zeros(x.shape[0], dtype=torch.int64, device=x.device)
    out = []
    for col in x.long().unbind(1):
        h = h * 1_000_003 + col + 1
        out.append(h)
    return torch.stack(out, dim=1)


def _accuracy(call: LossCall | None) -> float | None:
    """Share of the samples the prediction gets right (classification losses only)."""
    if call is None:
        return None
    with torch.no_grad():
        view = class_scores(call)
        if view is not None and view.target is not None:
            valid = (view.target >= 0) & (view.target < view.num_classes)
            if not bool(valid.any()):
                return None
            hit = view.scores.argmax(1) == view.target
            return float(hit[valid].float().mean())
        t = call.target
        if call.name in _BINARY and isinstance(t, Tensor) and t.shape == call.input.shape:
            cut = 0.5 if call.name == "binary_cross_entropy" else 0.0
            return float(((call.input.detach() > cut) == (t > 0.5)).float().mean())
    return None


class _NoDropout(TorchFunctionMode):
    """Turns functional dropout into the identity and attention dropout off (custom modules
    that call ``F.dropout(x, p, self.training)`` directly)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _DROPOUT_FNS and args:
            return args[0]
        if func is F.scaled_dot_product_attention:
            if len(args) > 4:
                args = (*args[:4], 0.0, *args[5:])
            elif "dropout_p" in kwargs:
                kwargs = {**kwargs, "dropout_p": 0.0}
        return func(*args, **kwargs)
