"""The recipe as a checklist: every diagnostic of a run, in the order of Karpathy's stages, with its
status, its key number and its findings.

A pure function of a report dict (``recipe_report.json``: ``findings``, and ``figures`` keyed by
callback class name), shared by the console report (``lightning-recipe report``, the end of fit)
and the TensorBoard "Recipe" tab. It imports no callback: a diagnostic it does not know (a new
callback, a user's own :class:`~lightning_recipe.callback.RecipeCallback`) still gets a row, in
the stage its finding codes or its name point to.

Example::

    from lightning_recipe.checklist import build
    from lightning_recipe.report import load_report

    for row in build(load_report("runs/")).rows:
        print(row.status, row.title, row.key)
"""

from __future__ import annotations

import math
import re
import shutil
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lightning_recipe.findings import CATALOG

#: what a row can say, most urgent first
STATUSES = ("error", "warning", "skipped", "ok", "pending", "not-run")
#: how the console shows a status
STATUS_LABEL = {
    "error": "ERROR",
    "warning": "WARN",
    "skipped": "skip",
    "ok": "ok",
    "pending": "...",
    "not-run": "-",
}
#: codes that say something about the diagnostic itself, not about the model
META_CODES = ("check-skipped", "internal-error")


@dataclass(frozen=True)
class Stage:
    """One stage of the recipe."""

    key: str
    title: str
    habit: str


STAGES: tuple[Stage, ...] = (
    Stage("data", "Become one with the data", "look at the batch as it enters the net"),
    Stage(
        "skeleton",
        "Skeleton and dumb baselines",
        "loss at init, input-independent baseline, overfit one batch, backprop dependencies",
    ),
    Stage("overfit", "Overfit", "a loss that goes down, healthy activations and gradients"),
    Stage("regularize", "Regularize", "the train/val gap, first-layer filters, early stopping"),
    Stage("tune", "Tune", "a learning rate that moves the weights ~1e-3 of their size per step"),
    Stage("juice", "Squeeze out the juice", "ensembles and averaged weights"),
)
_STAGE_INDEX = {s.key: i for i, s in enumerate(STAGES)}


@dataclass(frozen=True)
class Link:
    """Where the detail of a diagnostic lives in TensorBoard: ``plugin`` (scalars, images,
    histograms, text) and a tag filter (a regular expression)."""

    label: str
    plugin: str
    tag: str


@dataclass(frozen=True)
class Diagnostic:
    """What the checklist knows about one diagnostic (a callback class)."""

    title: str
    stage: str
    what: str
    #: ``(figures, findings) -> (text, value)``: the number a person reads first
    key: Callable[[dict[str, Any], list[dict[str, Any]]], tuple[str, float | None]] | None = None
    #: scalar tags of its main series, the first one the run has wins; ``{layer}`` is filled from
    #: ``figures["max_dead_fraction"]["layer"]``
    series: tuple[str, ...] = ()
    links: tuple[Link, ...] = ()
    #: left out of the suite unless the user asks (``recipe_callbacks(monitor=...)``)
    opt_in: bool = False
    #: info codes that carry the diagnostic's own measurement (not a note worth flagging)
    summary_codes: tuple[str, ...] = ()


# ---------------------------------------------------------------------------- key numbers
def _num(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and value in ("nan", "inf", "-inf"):
        return float(value)
    return None


def fmt(value: Any, digits: int = 3) -> str:
    """A number as a person reads it: 3 significant digits, no trailing noise."""
    x = _num(value)
    if x is None:
        return str(value)
    if math.isnan(x) or math.isinf(x):
        return str(x)
    if x == int(x) and abs(x) < 1e6:
        return str(int(x))
    return f"{x:.{digits}g}"


def _pct(value: Any) -> str:
    x = _num(value)
    return "?" if x is None else f"{100 * x:.0f}%"


def _evidence(findings: list[dict[str, Any]], code: str) -> dict[str, Any]:
    for f in findings:
        if f.get("code") == code:
            return f.get("evidence") or {}
    return {}


def _key_data(fig: dict, found: list) -> tuple[str, float | None]:
    if _num(fig.get("std")) is None:
        return str(fig.get("note") or ""), None
    text = f"inputs mean {fmt(fig.get('mean'), 2)}, std {fmt(fig['std'])}"
    if _num(fig.get("min")) is not None and _num(fig.get("max")) is not None:
        text += f", range {fmt(fig['min'])}..{fmt(fig['max'])}"
    return text, _num(fig["std"])


def _key_loss_at_init(fig: dict, found: list) -> tuple[str, float | None]:
    loss = _num(fig.get("loss"))
    if loss is None:
        return "", None
    chance = _num(fig.get("chance"))
    return f"loss at init {fmt(loss, 4)}" + (
        f" vs chance {fmt(chance, 4)}" if chance is not None else ""
    ), loss


def _key_batch_independence(fig: dict, found: list) -> tuple[str, float | None]:
    leak = _num(fig.get("max_leak"))
    if leak is None:
        leak = _num(_evidence(found, "batch-mixing").get("max_leak"))
    return ("", None) if leak is None else (f"cross-sample gradient {fmt(leak)}", leak)


def _key_gradcheck(fig: dict, found: list) -> tuple[str, float | None]:
    err = _num(fig.get("max_relative_error"))
    if err is None:
        return "", None
    coords = fig.get("coordinates")
    return f"max relative error {fmt(err)}" + (f" on {coords} coordinates" if coords else ""), err


def _key_overfit(fig: dict, found: list) -> tuple[str, float | None]:
    best = _num(fig.get("best_loss"))
    if best is None:
        return "", None
    text = f"best loss {fmt(best)} on {fig.get('samples', '?')} samples"
    if _num(fig.get("accuracy")) is not None:
        text += f", accuracy {_pct(fig['accuracy'])}"
    return text, best


def _key_lint(fig: dict, found: list) -> tuple[str, float | None]:
    n = _num(fig.get("trainable_params"))
    if n is None:
        return "", None
    missing = _num(fig.get("params_in_no_optimizer")) or 0
    return f"{fmt(n)} trainable tensors, {fmt(missing)} in no optimizer", missing


def _key_input_independent(fig: dict, found: list) -> tuple[str, float | None]:
    real, zero = _num(fig.get("real_loss")), _num(fig.get("zero_loss"))
    if real is None or zero is None:
        return "", None
    return f"val loss {fmt(real, 4)} real vs {fmt(zero, 4)} zeroed inputs", _num(fig.get("gap"))


def _key_prediction_dynamics(fig: dict, found: list) -> tuple[str, float | None]:
    if _num(fig.get("accuracy")) is not None:
        text = f"fixed-batch accuracy {_pct(fig['accuracy'])}"
        if _num(fig.get("flip_rate")) is not None:
            text += f", flip rate {fmt(fig['flip_rate'], 2)}"
        return text, _num(fig["accuracy"])
    if _num(fig.get("error")) is not None:
        return f"fixed-batch error {fmt(fig['error'])}", _num(fig["error"])
    return "", None


def _key_loss_curve(fig: dict, found: list) -> tuple[str, float | None]:
    loss = _num(fig.get("loss"))
    if loss is None:
        return "", None
    first = _num(fig.get("initial_loss"))
    text = (
        f"train loss {fmt(first, 4)} -> {fmt(loss, 4)}" if first is not None else f"train loss {fmt(loss, 4)}"
    )
    return text, loss


def _key_activations(fig: dict, found: list) -> tuple[str, float | None]:
    for key, word in (("max_dead_fraction", "dead"), ("max_saturated_fraction", "saturated")):
        worst = fig.get(key)
        if isinstance(worst, dict) and _num(worst.get("value")) is not None:
            return f"most {word}: {worst.get('layer')} {_pct(worst['value'])}", _num(worst["value"])
    if fig.get("layers_seen") is not None:
        return f"{fig['layers_seen']} layers watched", None
    return "", None


def _key_gradients(fig: dict, found: list) -> tuple[str, float | None]:
    bad = _num(fig.get("non_finite_layers"))
    if bad:
        return f"{fmt(bad)} layers with NaN/Inf gradients", bad
    profile = fig.get("depth_profile")
    if isinstance(profile, dict):
        for opt in profile.values():
            if isinstance(opt, dict) and _num(opt.get("ratio")) is not None:
                return (
                    f"gradient norm {opt.get('first')} / {opt.get('last_hidden')} = {fmt(opt['ratio'], 2)}",
                    _num(opt["ratio"]),
                )
    if fig.get("layers") is not None:
        return f"{fig['layers']} layers watched", None
    return "", None


def _key_update_ratio(fig: dict, found: list) -> tuple[str, float | None]:
    ratio = _num(fig.get("median_ratio"))
    if ratio is None:
        return "", None
    return f"median update/weight {ratio:.2g} (want ~1e-3)", ratio


def _key_train_val(fig: dict, found: list) -> tuple[str, float | None]:
    train, val = _num(fig.get("train_acc")), _num(fig.get("val_acc"))
    if train is not None and val is not None:
        return f"accuracy train {_pct(train)}, val {_pct(val)}", _num(fig.get("gap"))
    train, val = _num(fig.get("train_loss")), _num(fig.get("val_loss"))
    if train is not None and val is not None:
        return f"loss train {fmt(train)}, val {fmt(val)}", _num(fig.get("gap"))
    return "", None


def _key_filters(fig: dict, found: list) -> tuple[str, float | None]:
    ratio = _num(fig.get("ratio_to_init"))
    if ratio is not None:
        return f"{fig.get('layer')} smoothness {fmt(ratio, 2)}x its value at init", ratio
    if fig.get("layer"):
        kernel = "x".join(str(k) for k in fig.get("kernel") or [])
        judged = "" if fig.get("judged") else ", shown, not judged"
        return f"{fig['layer']} {kernel}{judged}".strip(), None
    return "", None


def _key_early_stopping(fig: dict, found: list) -> tuple[str, float | None]:
    best = _num(fig.get("best_score"))
    if best is None:
        return "", None
    monitor = _evidence(found, "early-stopped").get("monitor", "monitor")
    text = f"best {monitor} {fmt(best)} at epoch {fig.get('best_epoch')}"
    if fig.get("stop_cause"):
        text += f" ({fig['stop_cause']})"
    return text, best


def _key_ensemble(fig: dict, found: list) -> tuple[str, float | None]:
    single = _num(fig.get("single_loss"))
    if single is None:
        return "", None
    parts = [f"single {fmt(single)}"]
    for name, key in (("ensemble", "snapshot_ensemble_loss"), ("averaged", "averaged_loss")):
        if _num(fig.get(key)) is not None:
            parts.append(f"{name} {fmt(fig[key])}")
    return f"val loss {', '.join(parts)}; best: {fig.get('winner', '?')}", single


def _key_generic(fig: dict, found: list) -> tuple[str, float | None]:
    """A diagnostic the checklist does not know: the numbers of its worst finding, else its first
    numeric figures."""
    worst = sorted(found, key=lambda f: -_SEVERITY_RANK.get(f.get("severity"), 0))
    for source in [*(f.get("evidence") or {} for f in worst if f.get("code") not in META_CODES), fig]:
        pairs = [(k, v) for k, v in source.items() if _num(v) is not None and k not in _NOT_KEY]
        if pairs:
            return ", ".join(f"{k} {fmt(v)}" for k, v in pairs[:3]), _num(pairs[0][1])
    # nothing measured in numbers: what the diagnostic says about this model (why it does not apply)
    words = [v for k, v in fig.items() if isinstance(v, str) and v and k != "skipped"]
    note = fig.get("note")
    return (note if isinstance(note, str) and note else words[0] if words else ""), None


#: figures that are no key number (bookkeeping)
_NOT_KEY = ("step", "epoch", "seconds")


_SEVERITY_RANK = {"info": 0, "warning": 1, "error": 2}


def _links(*items: tuple[str, str, str]) -> tuple[Link, ...]:
    return tuple(Link(*item) for item in items)


#: every diagnostic of the suite, by callback class name, in the order the checklist shows them
DIAGNOSTICS: dict[str, Diagnostic] = {
    "DataInspectionCheck": Diagnostic(
        "The batch as it enters the net",
        "data",
        "value range, NaN/Inf, constant inputs, feature scales, labels of the first batch",
        _key_data,
        ("recipe/data/std", "recipe/data/max"),
        _links(
            ("batch images", "images", "recipe/batch_before_net"), ("labels", "histograms", "recipe/labels")
        ),
    ),
    "LossAtInitCheck": Diagnostic(
        "Loss at init",
        "skeleton",
        "the first loss against the chance loss -ln(1/C)",
        _key_loss_at_init,
        (),
        _links(("loss", "scalars", "recipe/loss/")),
    ),
    "InputIndependentBaseline": Diagnostic(
        "Input-independent baseline",
        "skeleton",
        "validation loss with real inputs against zeroed inputs",
        _key_input_independent,
        ("recipe/input_independent/gap", "recipe/input_independent/real_loss"),
        _links(("real vs zero-input loss", "scalars", "recipe/input_independent/")),
    ),
    "OverfitBatchCheck": Diagnostic(
        "Overfit one batch",
        "skeleton",
        "a copy of the model memorises ~20 samples with regularisation off",
        _key_overfit,
        ("recipe/overfit_batch/loss",),
        _links(("overfit loss", "scalars", "recipe/overfit_batch/")),
    ),
    "BatchIndependenceCheck": Diagnostic(
        "Backprop dependencies",
        "skeleton",
        "the gradient of one sample's output on the other samples' inputs",
        _key_batch_independence,
    ),
    "GradientCheck": Diagnostic(
        "Gradient check",
        "skeleton",
        "analytic against centred numeric gradients in float64",
        _key_gradcheck,
    ),
    "ModelLintCheck": Diagnostic(
        "Common mistakes",
        "skeleton",
        "parameters outside the optimizer or without gradient, train/eval mode, zero_grad, biases",
        _key_lint,
        (),
        _links(("weights", "histograms", "recipe/weights/")),
    ),
    "PredictionDynamicsMonitor": Diagnostic(
        "Prediction dynamics",
        "skeleton",
        "predictions on a fixed validation batch across training",
        _key_prediction_dynamics,
        ("recipe/prediction_dynamics/accuracy", "recipe/prediction_dynamics/error"),
        _links(("prediction image", "images", "recipe/prediction_dynamics")),
    ),
    "LossCurveMonitor": Diagnostic(
        "Loss curve",
        "overfit",
        "a training loss that falls, stays finite, and a learning rate not decayed too early",
        _key_loss_curve,
        ("recipe/loss/train",),
        _links(("loss and learning rate", "scalars", "recipe/(loss|lr)/")),
    ),
    "ActivationMonitor": Diagnostic(
        "Activations",
        "overfit",
        "dead ReLU units and saturated tanh/sigmoid units per layer",
        _key_activations,
        ("recipe/activation_stats/{layer}/dead_fraction",),
        _links(
            ("worst layer", "histograms", "recipe/activations/{layer}$"),
            ("activation histograms", "histograms", "recipe/activations/"),
            ("activation stats", "scalars", "recipe/activation_stats/"),
        ),
    ),
    "GradientMonitor": Diagnostic(
        "Gradients through depth",
        "overfit",
        "per-layer gradient norms collapsing or blowing up, NaN/Inf",
        _key_gradients,
        ("recipe/grad_depth_ratio",),
        _links(
            ("gradient histograms", "histograms", "recipe/gradients/"),
            ("gradient norms", "scalars", "recipe/grad_"),
        ),
    ),
    "TrainValGapMonitor": Diagnostic(
        "Train/val gap",
        "regularize",
        "train against validation accuracy and loss: overfitting or underfitting",
        _key_train_val,
        ("recipe/train_val_gap/acc", "recipe/train_val_gap/loss"),
        _links(("train vs val", "scalars", "recipe/train_val")),
    ),
    "FirstLayerFilterMonitor": Diagnostic(
        "First-layer filters",
        "regularize",
        "first-layer weights: smooth and diverse, or still noise",
        _key_filters,
        (),
        _links(("filters", "images", "recipe/first_layer_filters")),
    ),
    "RecipeEarlyStopping": Diagnostic(
        "Early stopping",
        "regularize",
        "stops on the validation metric and restores the best weights",
        _key_early_stopping,
        ("recipe/train_val/val_loss",),
        _links(("validation curve", "scalars", "recipe/train_val/val_")),
        opt_in=True,
        summary_codes=("early-stopped",),
    ),
    "UpdateRatioMonitor": Diagnostic(
        "Update/weight ratio",
        "tune",
        "norm(update)/norm(weight) per parameter, against cs231n's ~1e-3",
        _key_update_ratio,
        ("recipe/update_ratio_summary/median",),
        _links(
            ("update ratios", "scalars", "recipe/update_ratio"),
            ("log10 ratios", "histograms", "recipe/update_ratio_summary/"),
        ),
    ),
    "CheckpointEnsemble": Diagnostic(
        "Checkpoint ensemble",
        "juice",
        "single model against snapshot ensemble and averaged weights on validation data",
        _key_ensemble,
        ("recipe/ensemble/single/loss",),
        _links(("ensemble", "scalars", "recipe/ensemble/")),
        opt_in=True,
        summary_codes=("ensemble-evaluated",),
    ),
}

#: the stage of each finding code (codes of diagnostics this module does not know yet included)
_CODES_BY_STAGE = {
    "data": "input-not-normalized bad-input train-val-overlap target-in-input label-noise",
    "skeleton": "loss-at-init softmax-before-loss loss-broadcast input-independent overfit-batch-failed "
    "batch-mixing gradcheck-failed params-not-updating bias-before-norm output-no-bias train-eval-mode "
    "grad-not-zeroed prediction-instability future-leak class-prior-init loss-includes-padding",
    "overfit": "loss-diverged non-finite-loss loss-not-decreasing lr-decayed-early dead-units "
    "saturated-units vanishing-gradients exploding-gradients non-finite-gradients underfitting",
    "regularize": "overfitting noisy-filters early-stopped regularization-dominates",
    "tune": "update-ratio-low update-ratio-high",
    "juice": "ensemble-evaluated",
}
CODE_STAGE: dict[str, str] = {c: stage for stage, codes in _CODES_BY_STAGE.items() for c in codes.split()}

#: words in an unknown code or callback name that point to a stage (first match wins)
_STAGE_WORDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("juice", ("ensemble", "averag", "swa", "ema")),
    ("tune", ("update-ratio", "learning-rate", "lr-", "hyper", "sweep", "tune")),
    ("regularize", ("regulari", "overfitting", "dropout", "weight-decay", "augment", "early-stop", "filter")),
    ("data", ("data", "input", "label", "target", "leak", "overlap", "duplicate", "class-balance", "sample")),
    ("overfit", ("activation", "gradient", "dead", "saturat", "diverg", "curve", "underfit", "monitor")),
)


def stage_of_code(code: str) -> str:
    """The stage a finding code belongs to; unknown codes by the words in them, else "skeleton"."""
    if code in CODE_STAGE:
        return CODE_STAGE[code]
    return _stage_by_words(code) or "skeleton"


def _stage_by_words(text: str) -> str | None:
    for stage, words in _STAGE_WORDS:
        if any(w in text for w in words):
            return stage
    return None


def _kebab(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z][a-z])|(?<=[a-z0-9])(?=[A-Z])", "-", name).lower()


def _title_of(name: str) -> str:
    words = _kebab(re.sub(r"(Check|Monitor|Callback)$", "", name) or name).replace("-", " ")
    return words[:1].upper() + words[1:]


# ---------------------------------------------------------------------------- the model
@dataclass
class Row:
    """One diagnostic of one run."""

    name: str
    title: str
    stage: str
    status: str
    key: str = ""
    value: float | None = None
    reason: str = ""
    what: str = ""
    known: bool = True
    summary_codes: tuple[str, ...] = ()
    findings: list[dict[str, Any]] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)
    series: tuple[str, ...] = ()
    links: tuple[Link, ...] = ()

    @property
    def problems(self) -> list[dict[str, Any]]:
        """The warning and error findings, worst first."""
        bad = [f for f in self.findings if f.get("severity") in ("warning", "error")]
        return sorted(bad, key=lambda f: -_SEVERITY_RANK[f["severity"]])

    @property
    def notes(self) -> list[dict[str, Any]]:
        """The info findings worth a look: not skips or internal errors, not the measurement the
        diagnostic always reports."""
        skip = (*META_CODES, *self.summary_codes)
        return [f for f in self.findings if f.get("severity") == "info" and f.get("code") not in skip]

    def to_dict(self) -> dict[str, Any]:
        value = self.value
        return {
            "name": self.name,
            "title": self.title,
            "stage": self.stage,
            "status": self.status,
            "key": self.key,
            "value": value if value is None or math.isfinite(value) else str(value),
            "reason": self.reason,
            "what": self.what,
            "known": self.known,
            "notes": [f["code"] for f in self.notes],
            "findings": self.findings,
            "figures": self.figures,
            "series": list(self.series),
            "links": [{"label": k.label, "plugin": k.plugin, "tag": k.tag} for k in self.links],
        }


@dataclass
class Checklist:
    """Every diagnostic of one run, in stage order."""

    run_status: str
    global_step: Any
    epoch: Any
    counts: dict[str, int]
    rows: list[Row]

    def by_stage(self) -> list[tuple[Stage, list[Row]]]:
        """``(stage, rows)`` for each stage, in the recipe's order (stages without rows included)."""
        return [(s, [r for r in self.rows if r.stage == s.key]) for s in STAGES]

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.run_status,
            "global_step": self.global_step,
            "epoch": self.epoch,
            "counts": self.counts,
            "stages": [{"key": s.key, "title": s.title, "habit": s.habit} for s in STAGES],
            "diagnostics": [r.to_dict() for r in self.rows],
        }


def build(report: dict[str, Any]) -> Checklist:
    """The checklist of one run from its report dict (the content of ``recipe_report.json``)."""
    run_status = str(report.get("status") or "finished")
    figures: dict[str, Any] = report.get("figures") or {}
    findings = [_finding(f) for f in report.get("findings") or [] if isinstance(f, dict)]
    by_source: dict[str, list[dict[str, Any]]] = {}
    for f in findings:
        by_source.setdefault(f["source"], []).append(f)

    names: list[str] = list(DIAGNOSTICS)
    for name in [*figures, *by_source]:
        if name not in names:
            names.append(name)
    rows = []
    for name in names:
        base = name.split("#", 1)[0]
        found = by_source.get(name, []) if "#" in name else by_source.get(base, [])
        fig = figures.get(name)
        rows.append(
            _row(name, DIAGNOSTICS.get(base), fig if isinstance(fig, dict) else None, found, run_status)
        )
    rows.sort(key=lambda r: _STAGE_INDEX.get(r.stage, 1))  # stable: known order within a stage
    counts = {s: 0 for s in ("error", "warning", "info")}
    for f in findings:
        counts[f["severity"]] = counts.get(f["severity"], 0) + 1
    return Checklist(run_status, report.get("global_step"), report.get("epoch"), counts, rows)


def _finding(d: dict[str, Any]) -> dict[str, Any]:
    code = str(d.get("code", "?"))
    info = CATALOG.get(code)
    severity = str(d.get("severity", "info"))
    return {
        "code": code,
        "severity": severity if severity in _SEVERITY_RANK else "info",
        "message": str(d.get("message", "")),
        "source": str(d.get("source", "?")),
        "step": d.get("step"),
        "evidence": d.get("evidence") or {},
        "try": info.try_this if info is not None else "",
    }


def _row(
    name: str,
    diag: Diagnostic | None,
    fig: dict[str, Any] | None,
    found: list[dict[str, Any]],
    run_status: str,
) -> Row:
    if diag is None:
        codes = [f["code"] for f in found if f["code"] not in META_CODES]
        stage = (
            stage_of_code(codes[0]) if codes else (_stage_by_words(_kebab(name.split("#")[0])) or "skeleton")
        )
        diag = Diagnostic(_title_of(name.split("#")[0]), stage, "", _key_generic)
        known = False
    else:
        known = True
    row = Row(
        name=name,
        title=diag.title,
        stage=diag.stage,
        status="ok",
        what=diag.what,
        known=known,
        summary_codes=diag.summary_codes,
        findings=found,
        figures=fig or {},
        series=_series(diag, fig or {}),
        links=_fill_links(diag.links, fig or {}) or _links(("findings", "text", "recipe/findings")),
    )
    if fig is not None or found:
        try:
            row.key, row.value = (diag.key or _key_generic)(fig or {}, found)
        except Exception:  # a report from another version: the row still shows, without its number
            row.key, row.value = "", None
    severities = {f["severity"] for f in found}
    skips = [f for f in found if f["code"] in META_CODES]
    if "error" in severities:
        row.status = "error"
    elif "warning" in severities:
        row.status = "warning"
    elif skips or (fig and isinstance(fig.get("skipped"), str)):
        row.status = "skipped"
        row.reason = _skip_reason(skips, fig or {})
    elif fig or found:
        row.status = "ok"
    elif fig is not None and run_status == "running":
        row.status, row.reason = "pending", "nothing measured yet"
    elif fig is not None:
        row.status, row.reason = "not-run", "measured nothing in this run (too few steps or validations?)"
    else:
        row.status = "not-run"
        row.reason = (
            "opt-in: recipe_callbacks(monitor='val_loss') adds it"
            if diag.opt_in
            else "not among this run's callbacks"
        )
    return row


def _skip_reason(skips: list[dict[str, Any]], fig: dict[str, Any]) -> str:
    for f in skips:
        if f["code"] == "internal-error":
            return "internal error: " + f["message"]
    for f in skips:
        reason = (f.get("evidence") or {}).get("reason")
        if isinstance(reason, str) and reason:
            return reason
    if isinstance(fig.get("skipped"), str):
        return fig["skipped"]
    return skips[0]["message"] if skips else "skipped"


def _worst_layer(fig: dict[str, Any]) -> str | None:
    for key in ("max_dead_fraction", "max_saturated_fraction"):
        worst = fig.get(key)
        if isinstance(worst, dict) and worst.get("layer"):
            return str(worst["layer"])
    return None


def _series(diag: Diagnostic, fig: dict[str, Any]) -> tuple[str, ...]:
    worst = fig.get("max_dead_fraction")
    layer = str(worst["layer"]) if isinstance(worst, dict) and worst.get("layer") else None
    tags = [tag for tag in diag.series if "{layer}" not in tag or layer is not None]
    return tuple(tag.replace("{layer}", layer or "") for tag in tags)


def _fill_links(links: tuple[Link, ...], fig: dict[str, Any]) -> tuple[Link, ...]:
    layer = _worst_layer(fig)
    out = []
    for link in links:
        if "{layer}" in link.tag:
            if layer is None:
                continue
            link = Link(f"{link.label} ({layer})", link.plugin, link.tag.replace("{layer}", re.escape(layer)))
        out.append(link)
    return tuple(out)


# ---------------------------------------------------------------------------- console
def to_text(checklist: Checklist, width: int | None = None) -> str:
    """The checklist for a terminal: one line per diagnostic (status, stage, title, key number,
    first finding), errors and warnings first with their full message and what to try."""
    if width is None:
        width = max(80, min(160, shutil.get_terminal_size((120, 20)).columns))
    rows = [r for r in checklist.rows if r.status != "not-run"]
    urgent = [r for r in rows if r.status in ("error", "warning")]
    urgent.sort(key=lambda r: STATUSES.index(r.status))
    rest = [r for r in rows if r.status not in ("error", "warning")]
    stage_w = max(len(s.key) for s in STAGES)
    title_w = min(34, max([len(r.title) for r in rows] or [10]))
    lines: list[str] = []
    for r in urgent + rest:
        head = f"{STATUS_LABEL[r.status]:<5}  {r.stage:<{stage_w}}  {r.title[:title_w]:<{title_w}}  "
        tail = r.key or r.reason
        if r.status in ("skipped", "pending") and r.reason:
            tail = r.reason
        elif r.notes and r.status == "ok":
            codes = ", ".join(sorted({f["code"] for f in r.notes}))
            tail = f"{tail}; note: {codes}" if tail else f"note: {codes}"
        lines.append(_clip(head + tail, width))
        indent = " " * 9
        for f in r.problems:
            lines.extend(
                textwrap.wrap(
                    f"{f['code']}: {f['message']}",
                    width,
                    initial_indent=indent,
                    subsequent_indent=indent + "  ",
                )
            )
            if f.get("try") and not _says(f["message"], f["try"]):
                lines.extend(
                    textwrap.wrap(
                        f"try: {f['try']}",
                        width,
                        initial_indent=indent + "  ",
                        subsequent_indent=indent + "  ",
                    )
                )
    reasons: dict[str, list[str]] = {}
    for r in checklist.rows:
        if r.status == "not-run":
            reasons.setdefault(r.reason, []).append(r.name)
    for reason, names in reasons.items():
        lines.extend(
            textwrap.wrap(
                f"not run: {', '.join(names)} ({reason})",
                width,
                initial_indent="-      ",
                subsequent_indent=" " * 9,
            )
        )
    return "\n".join(lines)


def _says(message: str, advice: str) -> bool:
    """True when ``message`` already gives ``advice`` (its first words)."""
    head = re.sub(r"\W+", " ", advice.lower()).strip()[:30]
    return bool(head) and head in re.sub(r"\W+", " ", message.lower())


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3].rstrip() + "..."
