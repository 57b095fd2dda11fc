"""LossAtInitCheck: is the first loss the chance loss?"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_recipe import _losses
from lightning_recipe._probe import (
    CHANCE,
    CLASS_LOSSES,
    REGRESSION_LOSSES,
    ClassScores,
    LossCall,
    ProbeSkip,
    StepFn,
    chance_input,
    class_scores,
    copy_module,
    is_manual_optimization,
    looks_like_probabilities,
    preserved_rng,
    rounding_eps,
    run_step,
)
from lightning_recipe.batch import Getter
from lightning_recipe.checks.base import FirstBatchCheck
from lightning_recipe.findings import Severity

#: losses whose "knows nothing" prediction we can write down
_CHANCE_LOSSES = (*CLASS_LOSSES, "binary_cross_entropy_with_logits", "binary_cross_entropy")
_ELEMENTWISE = (
    *REGRESSION_LOSSES,
    "binary_cross_entropy",
    "binary_cross_entropy_with_logits",
    "soft_margin_loss",
)


#: a warning needs the label-free loss more than ``_WARN_FACTOR * tolerance`` above chance: healthy
#: Kaiming/He-initialised output layers reach 1.25-1.45x (docs/thresholds.md#loss-at-init)
_WARN_FACTOR = 2.0


class LossAtInitCheck(FirstBatchCheck):
    """Verify the loss at init against the chance loss, the recipe's first sanity check.

    cs231n: "Look for correct loss at chance performance": a classifier over C classes that knows
    nothing predicts 1/C everywhere, so its loss is -ln(1/C). Before the first optimizer step the
    check runs your ``training_step`` on a copy of the untouched model, reads the logits and targets
    that reach your loss function, and computes the chance loss with that very loss call (class
    weights, ``ignore_index``, label smoothing, ``pos_weight``) on a know-nothing prediction.

    Reports:
        * ``loss-at-init`` (warning) when the loss is more than ``tolerance`` (relative) above
          chance -- for cross-entropy, NLL and binary losses only if the label-free loss (averaged
          over every possible label) is more than ``2 * tolerance`` above it too, so neither the few
          labels of a small batch nor a final layer at Kaiming/He scale triggers it (info then) --
          or when ``nll_loss`` gets raw scores; info when far below chance, and for
          regression (the loss vs predicting the target mean);
        * ``softmax-before-loss`` (error) when the loss input is already probabilities;
        * ``loss-broadcast`` (warning) when an element-wise loss broadcasts input against a target
          of another shape (``(B, 1)`` vs ``(B,)`` gives a ``(B, B)`` loss).

    Thresholds: see docs/thresholds.md#loss-at-init.

    Args:
        tolerance: relative deviation from the chance loss that is still fine (> 0).
        num_batches: how many of the first batches to average over (the copy of the untouched
            model is kept until then).
        get_input, get_target, step_fn, on_error: see :class:`FirstBatchCheck`.

    Example::

        trainer = L.Trainer(callbacks=[LossAtInitCheck()])
        trainer.fit(model, datamodule)  # warns: "[loss-at-init] The loss at init is 4.71, ..."
    """

    codes = ("loss-at-init", "loss-broadcast", "softmax-before-loss")

    what = "measure the loss at init"

    def __init__(
        self,
        tolerance: float = 0.25,
        num_batches: int = 1,
        *,
        get_input: Getter | None = None,
        get_target: Getter | None = None,
        step_fn: StepFn | None = None,
        on_error: str = "warn",
    ) -> None:
        super().__init__(get_input=get_input, get_target=get_target, step_fn=step_fn, on_error=on_error)
        if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0 < tolerance < 10:
            raise ValueError(f"`tolerance` must be a number in (0, 10), got {tolerance!r}")
        if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1:
            raise ValueError(f"`num_batches` must be a positive int, got {num_batches!r}")
        self.tolerance = float(tolerance)
        self.num_batches = num_batches
        self.batches_needed = num_batches
        self._copy: nn.Module | None = None
        self._samples: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ hooks
    def first_batches(self, trainer: Any, pl_module: Any, batch: Any) -> None:
        if self.done:
            return
        if not self._samples and self._copy is None and trainer.global_step > 0:
            self.done = True
            self.skip(trainer, f"training resumed at step {trainer.global_step}, after init")
            return
        try:
            if self._copy is None:
                self._prepare(trainer, pl_module)
            self._samples.append(self._measure(self._copy, batch))
            if len(self._samples) >= self.num_batches:
                self._finish(trainer)
        except ProbeSkip as why:
            self.teardown_diagnostics()
            self.done = True
            self.skip(trainer, str(why))

    def teardown_diagnostics(self) -> None:
        self._copy = None

    # ------------------------------------------------------------------ one-shot API
    def check(self, trainer: Any | None, module: nn.Module, batch: Any) -> None:
        """Measure on one batch and judge (used by ``preflight``)."""
        self._prepare(trainer, module)
        self._samples = [self._measure(self._copy, batch)]
        self._finish(trainer)

    # ------------------------------------------------------------------ work
    def _prepare(self, trainer: Any | None, module: nn.Module) -> None:
        if self.step_fn is None and is_manual_optimization(module):
            raise ProbeSkip(
                "the module uses manual optimisation, so its training_step steps the optimizers; "
                "pass step_fn=lambda model, batch: loss to measure the loss at init"
            )
        self._copy = copy_module(module, trainer)

    def _measure(self, model: nn.Module, batch: Any) -> dict[str, Any]:
        with preserved_rng(), torch.no_grad():
            # the user's step raising on the copy is a UserStepError (a skip naming its error);
            # anything else that fails here is this check's own failure (internal-error)
            result = run_step(model, batch, self.step_fn)
        if result.loss is None:
            raise ProbeSkip("training_step returned None on the first batch")
        sample: dict[str, Any] = {"step_loss": float(result.loss.detach().float().mean())}
        call = result.main_call
        if call is None:
            sample["kind"] = "unknown"
            return sample
        sample.update(_judge_call(call))
        return sample

    def _finish(self, trainer: Any | None) -> None:
        self.done = True
        self._copy = None
        samples, self._samples = self._samples, []
        first = samples[0]
        kind = first.get("kind")
        loss = _mean(s.get("loss", s["step_loss"]) for s in samples)
        self.figures.update({"loss": loss, "loss_fn": first.get("loss_fn"), "batches": len(samples)})
        if kind == "unknown":
            self.figures["step_loss"] = loss
            self.skip(
                trainer,
                f"no standard loss function was seen in training_step (its loss was {loss:.4g}), so "
                "there is no chance loss to compare with; use torch.nn.functional losses or "
                "nn.*Loss modules",
            )
            return
        for key in ("broadcast", "probabilities", "nll_not_log_probs"):
            if key in first:
                self._report_bug(trainer, key, first)
        if kind == "classification":
            self._judge_classification(trainer, loss, samples)
        elif kind == "regression":
            self._judge_regression(trainer, loss, samples)
        elif kind == "reference":
            self._judge_reference(trainer, loss, samples)
        else:
            self.figures["note"] = f"no chance loss is defined for {first.get('loss_fn')}"

    def _report_bug(self, trainer: Any | None, key: str, s: dict[str, Any]) -> None:
        fn = s.get("loss_fn")
        if key == "broadcast":
            b = s["broadcast"]
            self.report(
                trainer,
                "loss-broadcast",
                Severity.WARNING,
                f"{fn} got input of shape {tuple(b['input'])} and target of shape {tuple(b['target'])}, "
                f"which broadcast to {tuple(b['result'])}: every prediction is compared with every "
                "target; make the shapes equal (e.g. output.squeeze(-1)).",
                b,
            )
        elif key == "probabilities":
            p = s["probabilities"]
            expects = "log-probabilities" if fn == "nll_loss" else "raw logits"
            self.report(
                trainer,
                "softmax-before-loss",
                Severity.ERROR,
                f"The input of {fn} is already probabilities (values in [{p['min']:.3g}, {p['max']:.3g}]"
                + (
                    f", rows summing to {p['row_sum_min']:.4f}..{p['row_sum_max']:.4f}"
                    if "row_sum_min" in p
                    else ""
                )
                + f") but {fn} expects {expects}; remove the softmax/sigmoid at the end of the "
                "model (the loss applies it itself).",
                {**p, "loss_fn": fn},
            )
        elif key == "nll_not_log_probs":
            e = s["nll_not_log_probs"]
            self.report(
                trainer,
                "loss-at-init",
                Severity.WARNING,
                f"nll_loss expects log-probabilities, but the rows of its input logsumexp to "
                f"{e['lse_min']:.3g}..{e['lse_max']:.3g} instead of 0: apply log_softmax first, or "
                "use cross_entropy on the raw logits.",
                e,
            )

    def _judge_classification(self, trainer: Any | None, loss: float, samples: list[dict[str, Any]]) -> None:
        s = samples[0]
        chance = _mean(x["chance"] for x in samples)
        c = s.get("num_classes")
        dev = (loss - chance) / chance if chance > 0 else float("inf")
        self.figures.update({"chance": chance, "num_classes": c, "relative_deviation": dev})
        if s.get("prior_loss") is not None:
            self.figures["prior_loss"] = s["prior_loss"]
        rule = _chance_rule(s["loss_fn"], c)
        evidence = {
            "loss": loss,
            "expected": chance,
            "relative_deviation": dev,
            "num_classes": c,
            "loss_fn": s["loss_fn"],
            "tolerance": self.tolerance,
        }
        if "probabilities" in s:
            return  # already reported as softmax-before-loss; the loss is near chance by accident
        label_free = None
        if all("label_free_ratio" in x for x in samples):
            label_free = _mean(x["label_free_ratio"] for x in samples)
            targets = sum(int(x["targets"]) for x in samples)
            evidence.update({"label_free_ratio": label_free, "targets": targets})
            self.figures["label_free_ratio"] = label_free
        if dev > self.tolerance and label_free is not None and label_free - 1 <= self.tolerance:
            self.report(
                trainer,
                "loss-at-init",
                Severity.INFO,
                f"The loss at init is {loss:.4g}, {loss / chance:.2f}x the chance loss {chance:.4g} "
                f"({rule}), on {targets} target{'s' if targets != 1 else ''}; averaged over every "
                f"possible label the same predictions score {label_free:.2f}x chance, so they are "
                "close to uniform and the excess comes from which labels the batch holds, not from "
                "the init (num_batches > 1 measures on more samples).",
                evidence,
            )
        elif (
            dev > self.tolerance
            and label_free is not None
            and label_free - 1 <= _WARN_FACTOR * self.tolerance
        ):
            self.report(
                trainer,
                "loss-at-init",
                Severity.INFO,
                f"The loss at init is {loss:.4g}, {loss / chance:.2f}x the chance loss {chance:.4g} "
                f"({rule}); averaged over every possible label the same predictions score "
                f"{label_free:.2f}x chance: mildly confident at init, as with a final layer at "
                "Kaiming/He scale. It trains; a smaller final layer (or its bias at the class priors) "
                "starts without the hockey stick.",
                evidence,
            )
        elif dev > self.tolerance:
            self.report(
                trainer,
                "loss-at-init",
                Severity.WARNING,
                f"The loss at init is {loss:.4g}, {loss / chance:.2f}x the chance loss {chance:.4g} "
                f"({rule}): the untouched model is confidently wrong; scale down the final layer's "
                "init (or start its bias at the class priors) and check the input scale.",
                evidence,
            )
        elif dev < -self.tolerance:
            self.report(
                trainer,
                "loss-at-init",
                Severity.INFO,
                f"The loss at init is {loss:.4g}, below the chance loss {chance:.4g} ({rule}) by "
                f"{-dev:.0%}: fine if the final bias starts at the class priors; otherwise check "
                "that the labels do not leak into the inputs.",
                evidence,
            )

    def _judge_reference(self, trainer: Any | None, loss: float, samples: list[dict[str, Any]]) -> None:
        """Any other loss against the user's own loss of a constant prediction: a warning only for
        integer class targets whose uniform prediction is the reference and whose label-free loss
        is too far above it (as for cross-entropy); info otherwise."""
        s = samples[0]
        ref = _mean(x["reference"] for x in samples)
        kind = s["reference_kind"]
        ratio = loss / ref if ref > 0 else float("nan")
        label_free = None
        if all("label_free_ratio" in x for x in samples):
            label_free = _mean(x["label_free_ratio"] for x in samples)
        self.figures.update({"reference": ref, "reference_kind": kind, "ratio_to_reference": ratio})
        what = {
            CHANCE: "a uniform prediction over the classes",
            _losses.MEAN_PREDICTOR: "always predicting the target mean",
            _losses.CONSTANT: "the batch-mean prediction for every sample (the output layer reduced to "
            "its bias)",
        }.get(kind, kind)
        evidence = {
            "loss": loss,
            "reference": ref,
            "reference_kind": kind,
            "ratio": ratio,
            "loss_fn": s["loss_fn"],
            "label_free_ratio": label_free,
            "tolerance": self.tolerance,
        }
        if (
            kind == CHANCE
            and label_free is not None
            and label_free - 1 > _WARN_FACTOR * self.tolerance
            and ratio > 1 + self.tolerance
        ):
            self.report(
                trainer,
                "loss-at-init",
                Severity.WARNING,
                f"The loss at init is {loss:.4g}, {ratio:.2f}x the loss of {what} through your own "
                f"{s['loss_fn']} ({ref:.4g}), and {label_free:.2f}x averaged over every possible label: "
                "the untouched model is confidently wrong; scale down the final layer's init (or start "
                "its bias at the class priors) and check the input scale.",
                evidence,
            )
            return
        if math.isfinite(ratio):
            verdict = (
                "far above it: start the final layer small"
                if ratio > 1 + self.tolerance
                else "a sensible init"
            )
            msg = (
                f"The loss at init is {loss:.4g}; {what} would give {ref:.4g} through your own "
                f"{s['loss_fn']} ({kind}, ratio {ratio:.2f}: {verdict})."
            )
        else:
            msg = (
                f"The loss at init is {loss:.4g}; {what} would give {ref:.4g} through your own "
                f"{s['loss_fn']} ({kind})."
            )
        self.report(trainer, "loss-at-init", Severity.INFO, msg, evidence)

    def _judge_regression(self, trainer: Any | None, loss: float, samples: list[dict[str, Any]]) -> None:
        base = _mean(x["mean_loss"] for x in samples)
        mean = samples[0]["target_mean"]
        ratio = loss / base if base > 0 else float("inf")
        self.figures.update(
            {"mean_predictor_loss": base, "target_mean": mean, "ratio_to_mean_predictor": ratio}
        )
        evidence = {
            "loss": loss,
            "mean_predictor_loss": base,
            "target_mean": mean,
            "ratio": ratio,
            "loss_fn": samples[0]["loss_fn"],
        }
        if ratio > 1 + self.tolerance:
            msg = (
                f"The loss at init is {loss:.4g}, {ratio:.2f}x the loss of always predicting the "
                f"target mean ({base:.4g}); start the final layer's bias at the target mean "
                f'({mean:.4g}) and its weights small ("init well").'
            )
        else:
            msg = (
                f"The loss at init is {loss:.4g}; always predicting the target mean ({mean:.4g}) "
                f"would give {base:.4g} (ratio {ratio:.2f}), so the init is sensible."
            )
        self.report(trainer, "loss-at-init", Severity.INFO, msg, evidence)


# ---------------------------------------------------------------------------- helpers
def _mean(values: Any) -> float:
    vals = [float(v) for v in values]
    return sum(vals) / len(vals)


def _scalar(t: Tensor) -> float:
    t = t.detach().float()
    return float(t if t.dim() == 0 else t.mean())


def _chance_rule(loss_fn: str, c: int | None) -> str:
    if loss_fn in ("cross_entropy", "nll_loss") and c:
        return f"-ln(1/{c}) for {c} classes"
    if loss_fn == "multi_margin_loss" and c:
        return f"(C-1)/C = {c - 1}/{c} for torch's multiclass SVM loss"
    if loss_fn in ("binary_cross_entropy", "binary_cross_entropy_with_logits"):
        return "ln 2 per output for a 0.5 prediction"
    return "a know-nothing prediction"


def _broadcast_issue(call: LossCall) -> dict[str, Any] | None:
    tgt = call.target
    if call.name not in _ELEMENTWISE or not isinstance(tgt, Tensor):
        return None
    a, b = tuple(call.input.shape), tuple(tgt.shape)
    if a == b:
        return None
    try:
        result = tuple(torch.broadcast_shapes(a, b))
    except RuntimeError:
        return None
    if math.prod(result) > max(math.prod(a), math.prod(b)):
        return {"input": list(a), "target": list(b), "result": list(result)}
    return None


def _judge_call(call: LossCall) -> dict[str, Any]:
    """Measure one loss call: loss, chance loss, and the bugs visible at the loss input."""
    out: dict[str, Any] = {"loss_fn": call.name, "loss": _scalar(call.output)}
    issue = _broadcast_issue(call)
    if issue is not None:
        out["broadcast"] = issue
    probs = looks_like_probabilities(call)
    if probs is not None:
        out["probabilities"] = probs
    with torch.no_grad():
        if call.name in _CHANCE_LOSSES:
            base = chance_input(call)
            out["kind"] = "classification"
            out["chance"] = _scalar(call.recompute(base))
            view = class_scores(call)
            spread = _label_free(call, view)
            if spread is not None:
                out["label_free_ratio"], out["targets"] = spread
            if view is not None:
                out["num_classes"] = view.num_classes
                out["prior_loss"] = _prior_loss(view.target, view.num_classes)
                if call.name == "nll_loss" and probs is None:
                    lse = _log_prob_row_sums(view.scores, call.input.dtype)
                    if lse is not None:
                        out["nll_not_log_probs"] = lse
        elif (
            call.name in REGRESSION_LOSSES
            and isinstance(call.target, Tensor)
            and call.target.is_floating_point()
        ):
            tgt = call.target.detach()
            mean = tgt.float().mean().to(call.input.dtype)
            out["kind"] = "regression"
            out["target_mean"] = float(mean)
            out["mean_loss"] = _scalar(call.recompute(mean.expand_as(call.input.detach())))
        else:
            _judge_any(call, out)
    return out


def _judge_any(call: Any, out: dict[str, Any]) -> None:
    """Any other loss (a custom module, a metric, a distribution's likelihood): the user's own loss
    with the prediction replaced by a constant (``_losses``) is the reference; for integer class
    targets also the label-free ratio (the loss averaged over every possible label)."""
    ref = _losses.know_nothing_loss(call, prefer=CHANCE)
    if ref is None:
        out["kind"] = "other"
        return
    out["kind"] = "reference"
    out["reference"], out["reference_kind"] = _scalar(ref[0]), ref[1]
    if ref[1] == CHANCE:
        dim = _losses._class_dim(call.input.detach(), call.target)
        if dim is not None:
            out["num_classes"] = int(call.input.shape[dim])
            ratio = _losses.label_free_ratio(call, _losses.uniform_scores(call.input.detach(), dim))
            if ratio is not None:
                out["label_free_ratio"] = ratio
                out["targets"] = int(call.target.numel())


def _label_free(call: LossCall, view: ClassScores | None) -> tuple[float, int] | None:
    """How far the predictions are from uniform, whatever the labels: the loss averaged over every
    possible label, as a ratio to that of a uniform prediction, and the number of targets it
    averages. Per row of class scores ``logsumexp(s) - mean(s)`` (``ln C`` when uniform); per
    binary output the mean of the losses for label 0 and 1 (``ln 2`` when 0.5). ``None`` for other
    losses. The loss itself also depends on which labels the batch holds, which on a few samples
    moves a healthy init to 1.3-1.8x chance."""
    if call.name in ("cross_entropy", "nll_loss") and view is not None and view.num_classes >= 2:
        s = view.scores.float()
        if view.target is not None:
            keep = (view.target >= 0) & (view.target < view.num_classes)
            ignore = call.kwargs.get("ignore_index", call.args[4] if len(call.args) > 4 else None)
            if isinstance(ignore, int):
                keep &= view.target != ignore
            s = s[keep]
        if s.shape[0] == 0:
            return None
        per_row = torch.logsumexp(s, dim=1) - s.mean(dim=1)
        return float(per_row.mean()) / math.log(view.num_classes), int(s.shape[0])
    x = call.input.detach().float()
    if x.numel() == 0:
        return None
    if call.name == "binary_cross_entropy_with_logits":
        both = (F.softplus(x) + F.softplus(-x)) / 2
    elif call.name == "binary_cross_entropy":
        p = x.clamp(1e-12, 1 - 1e-12)
        both = -(p.log() + (1 - p).log()) / 2
    else:
        return None
    return float(both.mean()) / math.log(2), int(x.numel())


def _log_prob_row_sums(scores: Tensor, dtype: torch.dtype) -> dict[str, float] | None:
    """The range of the rows' logsumexp when some row is not log-probabilities (logsumexp 0),
    else ``None``. Each row may miss 0 by 1e-2 plus the rounding of its values in ``dtype``
    (``4 * eps * max|value|``: bfloat16 log-probabilities of 100 classes, about -4.6, are off
    by up to 0.016; float32 ones by 1e-6)."""
    s = scores.float()
    lse = torch.logsumexp(s, dim=1)
    allowed = 1e-2 + 4 * rounding_eps(dtype) * s.abs().amax(dim=1)
    if not bool((lse.abs() > allowed).any()):
        return None
    return {"lse_min": float(lse.min()), "lse_max": float(lse.max())}


def _prior_loss(target: Tensor | None, c: int) -> float | None:
    """Cross-entropy of predicting the batch's class frequencies (the best constant guess)."""
    if target is None:
        return None
    valid = target[(target >= 0) & (target < c)]
    if valid.numel() == 0:
        return None
    freq = torch.bincount(valid, minlength=c).float() / valid.numel()
    nz = freq[freq > 0]
    return float(-(nz * nz.log()).sum())
