"""The finding contract: what every recipe callback reports, and how it is emitted.

This module is the stable public API described in ``DESIGN.md``: :class:`Severity`,
:class:`Finding`, :class:`RecipeWarning`, :class:`RecipeError` and the catalog of finding
codes (:data:`CATALOG`). A *finding* is one measured verdict ("the loss at init is 4.71, the
chance loss is 2.30") with the numbers behind it, so a user reads a sentence and a program reads
``evidence``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any


class Severity(str, Enum):
    """How loud a finding is: ``info`` is a measurement or a skip, ``warning`` a likely problem,
    ``error`` a run that is very probably wasted."""

    INFO = "info"
    WARNING = "warning"
    ERROR = "error"

    @property
    def rank(self) -> int:
        """0 for info, 1 for warning, 2 for error (for sorting and thresholds)."""
        return {"info": 0, "warning": 1, "error": 2}[self.value]


@dataclass(frozen=True)
class Finding:
    """One verdict of one recipe callback.

    Attributes:
        code: kebab-case id from :data:`CATALOG`, e.g. ``"loss-at-init"``.
        severity: :class:`Severity`.
        message: one sentence: what was measured, against what, and what to try.
        source: the class name of the callback that saw it.
        step: ``trainer.global_step`` when it was seen.
        evidence: the numbers behind it, e.g. ``{"loss": 4.71, "expected": 2.30}``.

    Example::

        for f in lightning_recipe.findings(trainer):
            if f.severity is Severity.ERROR:
                print(f.code, f.evidence)
    """

    code: str
    severity: Severity
    message: str
    source: str
    step: int
    evidence: dict = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (severity as its string value)."""
        d = asdict(self)
        d["severity"] = self.severity.value
        d["evidence"] = _jsonable(self.evidence)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Finding:
        """Inverse of :meth:`to_dict` (used by resume and ``lightning-recipe report``)."""
        return cls(
            code=str(d["code"]),
            severity=Severity(d["severity"]),
            message=str(d["message"]),
            source=str(d["source"]),
            step=int(d["step"]),
            evidence=dict(d.get("evidence") or {}),
        )


class RecipeWarning(UserWarning):
    """Issued once per (source, code) for each warning or error finding, on rank zero only.

    Its text starts with ``[code]`` so it can be filtered, e.g.
    ``warnings.filterwarnings("ignore", message=r"\\[bias-before-norm\\]", category=RecipeWarning)``.
    """


class RecipeError(RuntimeError):
    """Raised for an error finding when the user asked for it with ``on_error="raise"``."""

    def __init__(self, finding: Finding | None, message: str | None = None) -> None:
        text = message if message is not None else f"[{finding.code}] {finding.message}"  # type: ignore[union-attr]
        super().__init__(text)
        #: the error finding; ``None`` when it was seen on another DDP rank
        self.finding = finding


@dataclass(frozen=True)
class CodeInfo:
    """One row of the catalog: what a code means and what to try."""

    code: str
    seen_by: str
    meaning: str
    try_this: str


def _c(code: str, seen_by: str, meaning: str, try_this: str) -> tuple[str, CodeInfo]:
    return code, CodeInfo(code, seen_by, meaning, try_this)


#: Every finding code the package emits. The first block is DESIGN.md's catalog (public API);
#: the last block are the codes this package adds (documented in the README).
CATALOG: dict[str, CodeInfo] = dict(
    [
        _c(
            "loss-at-init",
            "LossAtInitCheck",
            "The first loss of the untouched model is far from the chance loss "
            "(-ln(1/C) for softmax over C classes, (C-1)/C for torch's multiclass SVM loss "
            "multi_margin_loss, which divides cs231n's C-1 by C).",
            "Scale down the final layer's init, normalise the inputs; for regression start "
            "the final bias at the target mean.",
        ),
        _c(
            "softmax-before-loss",
            "LossAtInitCheck / ModelLintCheck",
            "The model's outputs are already probabilities (rows in [0,1] summing to 1) but "
            "the loss expects logits (or log-probabilities).",
            "Return raw logits from the model; cross_entropy applies log-softmax itself.",
        ),
        _c(
            "input-not-normalized",
            "DataInspectionCheck",
            "The inputs as they enter the net are far outside [-1, 1] / [0, 1], or features "
            "have wildly different scales.",
            "Standardise the inputs (subtract the mean, divide by the std) or scale to [0, 1].",
        ),
        _c(
            "bad-input",
            "DataInspectionCheck",
            "NaN/Inf or constant inputs in the batch as it enters the net.",
            "Check the data pipeline: missing values, a division by zero, a broken augmentation.",
        ),
        _c(
            "batch-mixing",
            "BatchIndependenceCheck",
            "The output of one sample depends on another sample's input (in eval mode).",
            "Look for a view/reshape that should be a permute/transpose, or a reduction over "
            "the batch dimension.",
        ),
        _c(
            "gradcheck-failed",
            "GradientCheck",
            "Analytic and centred numeric gradients disagree (float64).",
            "Check the backward of custom autograd Functions and custom layers.",
        ),
        _c(
            "overfit-batch-failed",
            "OverfitBatchCheck",
            "A copy of the model cannot memorise one small batch with regularisation off.",
            "Look for a bug in the model, the loss or the labels before training on everything.",
        ),
        _c(
            "params-not-updating",
            "ModelLintCheck / UpdateRatioMonitor",
            "A trainable parameter is in no optimizer, gets no gradient, or never changes.",
            "Pass all parameters to the optimizer; look for detach(), unused layers, requires_grad.",
        ),
        _c(
            "bias-before-norm",
            "ModelLintCheck",
            "A Linear/Conv with bias=True feeds a BatchNorm, which cancels the bias (info).",
            "Use bias=False before BatchNorm to save parameters.",
        ),
        _c(
            "output-no-bias",
            "ModelLintCheck",
            "The final layer has no bias, so it cannot start at the data mean / class priors (info).",
            "Use bias=True on the output layer.",
        ),
        _c(
            "train-eval-mode",
            "ModelLintCheck",
            "Dropout/BatchNorm active during validation, or left in eval mode during training.",
            "Do not call model.train()/eval() inside the steps; use F.dropout(training=self.training).",
        ),
        _c(
            "grad-not-zeroed",
            "ModelLintCheck",
            "Gradients carried over between optimizer steps (manual optimisation) without "
            "gradient accumulation being asked for.",
            "Call optimizer.zero_grad() after each optimizer.step().",
        ),
        _c(
            "input-independent",
            "InputIndependentBaseline",
            "After warm-up the loss with real inputs is not clearly below the loss with zeroed inputs.",
            "Check that the inputs reach the model and that the labels depend on them.",
        ),
        _c(
            "update-ratio-low",
            "UpdateRatioMonitor",
            "norm(update)/norm(weight) far below ~1e-3: the learning rate is probably too low.",
            "Raise the learning rate (about 10x per decade the ratio is below 1e-3).",
        ),
        _c(
            "update-ratio-high",
            "UpdateRatioMonitor",
            "norm(update)/norm(weight) far above ~1e-3: the learning rate is probably too high.",
            "Lower the learning rate.",
        ),
        _c(
            "dead-units",
            "ActivationMonitor",
            "ReLU units that are zero for the whole batch.",
            "Lower the learning rate, check the init and the biases, or use LeakyReLU.",
        ),
        _c(
            "saturated-units",
            "ActivationMonitor",
            "tanh/sigmoid units stuck at their limits.",
            "Scale down the init (Xavier/Kaiming), normalise the inputs, add normalisation layers.",
        ),
        _c(
            "vanishing-gradients",
            "GradientMonitor",
            "Gradient norms shrink by orders of magnitude from the last layer to the first.",
            "Use ReLU-family activations, residual connections, normalisation, a better init.",
        ),
        _c(
            "exploding-gradients",
            "GradientMonitor",
            "Gradient norms grow by orders of magnitude from the last layer to the first.",
            "Lower the learning rate, clip gradients, check the init.",
        ),
        _c(
            "non-finite-gradients",
            "GradientMonitor",
            "NaN/Inf in the gradients.",
            "Lower the learning rate, check for log(0), division by zero, overflow in fp16.",
        ),
        _c(
            "loss-diverged",
            "LossCurveMonitor / RecipeEarlyStopping",
            "The loss blew up far above its best value.",
            "Lower the learning rate; add warm-up or gradient clipping.",
        ),
        _c(
            "non-finite-loss",
            "LossCurveMonitor / RecipeEarlyStopping",
            "The loss is NaN or Inf.",
            "Lower the learning rate; look for log(0) and division by zero.",
        ),
        _c(
            "loss-not-decreasing",
            "LossCurveMonitor / RecipeEarlyStopping",
            "The loss curve stays flat.",
            "Raise the learning rate, or look for a bug (overfit one batch first).",
        ),
        _c(
            "lr-decayed-early",
            "LossCurveMonitor",
            "The learning rate fell below 1% of its start before half of the planned steps.",
            "Check the scheduler's interval (step vs epoch) and milestones.",
        ),
        _c(
            "overfitting",
            "TrainValGapMonitor",
            "Train accuracy far above validation accuracy.",
            "More data, augmentation, weight decay, dropout, early stopping.",
        ),
        _c(
            "underfitting",
            "TrainValGapMonitor",
            "Train and validation accuracy close together and both low.",
            "A bigger model, longer training, a higher learning rate.",
        ),
        _c(
            "prediction-instability",
            "PredictionDynamicsMonitor",
            "Predictions on a fixed batch keep flipping late in training.",
            "Lower the learning rate or decay it; a larger batch.",
        ),
        _c(
            "noisy-filters",
            "FirstLayerFilterMonitor",
            "First-layer filters are still as noisy as at init (info).",
            "Train longer, tune the learning rate, add weight decay.",
        ),
        _c(
            "early-stopped",
            "RecipeEarlyStopping",
            "Why training stopped, and which weights were restored (info).",
            "Nothing to do; read the epoch the restored weights come from.",
        ),
        _c(
            "future-leak",
            "FutureLeakCheck",
            "The output at a position depends on the input that holds its own target: a language "
            "model without its causal mask, logits and targets shifted differently, unshifted "
            "targets, a forecast window that includes the forecast day.",
            "Mask attention to positions <= t; feed tokens[:, :-1] and score against tokens[:, 1:]; "
            "end the input window before the first forecast day.",
        ),
        _c(
            "loss-includes-padding",
            "PaddingCheck",
            "A sequence loss averages over padding positions (no ignore_index, no mask): a large "
            "share of its targets is the padding value past each sequence's end.",
            "Pass ignore_index=<pad id> to cross_entropy (or pad the labels with -100), or mask "
            "the per-token loss and divide by the number of real tokens.",
        ),
        _c(
            "target-in-input",
            "TargetInInputCheck",
            "An input feature is the label itself or a near-exact function of it (a leaked label "
            "column, a ratio computed from the target): validation metrics far beyond what the "
            "data allows.",
            "Drop the feature, or compute it without the target (from training folds only).",
        ),
        _c(
            "train-val-overlap",
            "TrainValOverlapCheck",
            "The same examples are in the training and the validation data (duplicates across "
            "the split, oversampling before splitting, validating on the training loader).",
            "Deduplicate before splitting; oversample inside the training split only.",
        ),
        _c(
            "class-prior-init",
            "ClassPriorCheck",
            "Strongly imbalanced classes, but the output starts at uniform probabilities instead of "
            'the class prior ("init well").',
            "Set the final bias to log(prior) per class, or log(p/(1-p)) for a sigmoid output.",
        ),
        _c(
            "label-noise",
            "LabelNoiseMonitor",
            "Training labels that contradict what the net sees: late in training, the samples of a "
            "pair of classes keep going to the other class of the pair (an augmentation that "
            "changes a label's meaning, e.g. a horizontal flip of left/right classes; mislabelled data).",
            "Look at the samples in recipe/label_noise; relabel in the augmentation (swap left/right "
            "on a flip) or drop it for those classes; clean the labels.",
        ),
        _c(
            "regularization-dominates",
            "RegularizationCheck",
            "A penalty added to the loss by hand has a larger gradient than the data loss at init "
            "(cs231n: don't let the regularization overwhelm the data).",
            "Lower the penalty's coefficient (L2 of 1e-4..5e-4 * sum(w^2) is typical) or use the "
            "optimizer's weight_decay.",
        ),
        # --- codes added by this package (documented in the README) ---
        _c(
            "loss-broadcast",
            "LossAtInitCheck",
            "An element-wise loss got input and target of different shapes and broadcast them "
            "((B, 1) vs (B,) gives a (B, B) loss): every prediction is compared with every target.",
            "Make the shapes equal, e.g. output.squeeze(-1) or target.view_as(output).",
        ),
        _c(
            "ensemble-evaluated",
            "CheckpointEnsemble",
            "Single model vs snapshot ensemble vs averaged weights on the validation data, and "
            "which wins by how much (info).",
            "Use callback.averaged_model() / callback.ensemble() or the saved averaged checkpoint "
            "when they win.",
        ),
        _c(
            "no-better-than-baseline",
            "BaselineMonitor",
            "After warm-up the model's validation loss is no better than a dumb baseline's with the "
            "same loss: predicting the training class prior (majority class) or the training target mean.",
            "Check that the labels depend on the inputs and the inputs reach the model; raise the "
            "learning rate; for imbalanced classes, initialise the output bias at the log prior.",
        ),
        _c(
            "check-skipped",
            "every callback",
            "A check or monitor could not run on this model or batch and was skipped (info).",
            "Read the reason; pass get_input/get_target/step_fn if the batch layout is unusual.",
        ),
        _c(
            "internal-error",
            "every callback",
            "A diagnostic failed internally; the training run continued unaffected (info).",
            "Report it with the message; the rest of the suite keeps working.",
        ),
    ]
)


def check_code(code: str) -> str:
    """Return ``code`` if it is in the catalog, else raise ``ValueError`` naming the allowed ones."""
    if code not in CATALOG:
        raise ValueError(f"Unknown finding code {code!r}; allowed codes: {sorted(CATALOG)}")
    return code


def _jsonable(value: Any) -> Any:
    """Turn numpy / torch scalars and tuples in evidence into plain JSON types."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Enum):
        return value.value
    if hasattr(value, "item") and callable(value.item):
        try:
            return _jsonable(value.item())
        except (ValueError, RuntimeError):
            return _jsonable(value.tolist()) if hasattr(value, "tolist") else str(value)
    if isinstance(value, float) and value != value:  # NaN stays representable as a string
        return "nan"
    if isinstance(value, float) and value in (float("inf"), float("-inf")):
        return "inf" if value > 0 else "-inf"
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)
