"""TrainValGapMonitor: the gap between training and validation accuracy (cs231n)."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

from lightning_recipe import _context, stats, tensorboard
from lightning_recipe._validate import check_number
from lightning_recipe.callback import RecipeCallback, guarded
from lightning_recipe.findings import Severity
from lightning_recipe.monitors.base import Streaks

#: (train, val) metric names tried, in order, when none are given
ACCURACY_GUESSES: tuple[tuple[str, str], ...] = (
    ("train_acc", "val_acc"),
    ("train_accuracy", "val_accuracy"),
    ("train/acc", "val/acc"),
    ("train/accuracy", "val/accuracy"),
    ("acc", "val_acc"),
)
#: underfitting needs a training accuracy this far from chance towards 100% (else: not learning)
LEARNED_MARGIN = 0.1
LOSS_GUESSES: tuple[tuple[str, str], ...] = (
    ("train_loss", "val_loss"),
    ("train/loss", "val/loss"),
    ("loss", "val_loss"),
)

#: the words that mark a training / a validation metric in a name, wherever they stand
#: (``train_loss``/``valid_loss``, ``elbo_train``/``elbo_validation``, ``train/acc``/``val/acc``)
TRAIN_WORDS: tuple[str, ...] = ("train", "training")
VAL_WORDS: tuple[str, ...] = ("val", "valid", "validation")
#: the words that say what a metric is
KIND_WORDS: dict[str, tuple[str, ...]] = {"acc": ("acc", "accuracy"), "loss": ("loss",)}


class TrainValGapMonitor(RecipeCallback):
    """Compare training and validation accuracy after each validation, cs231n's second chart.

    cs231n: the gap between training and validation accuracy indicates overfitting; a validation
    accuracy that tracks a low training accuracy says the model is too small. The monitor reads
    metrics you already log (``self.log("train_acc", ...)``, ``self.log("val_acc", ...)``) from
    ``trainer.callback_metrics`` after each validation (not the sanity check) and judges them at the
    next training epoch end; it computes nothing itself. Unnamed metrics are looked up as
    ``train_acc``/``val_acc``, ``train_accuracy``/``val_accuracy``, ``train/acc``/``val/acc``,
    ``train/accuracy``/``val/accuracy``, ``acc``/``val_acc`` (losses ``train_loss``/``val_loss``,
    ``train/loss``/``val/loss``, ``loss``/``val_loss``), with their ``_epoch`` and
    ``/dataloader_idx_0`` variants. Logs ``recipe/train_val/...`` and ``recipe/train_val_gap/acc``
    (train - val accuracy), ``.../loss`` (val - train loss).

    Reports (warnings, once each) ``overfitting``: train - val accuracy above ``gap`` (without
    accuracies: the val loss ``loss_rise`` above its best while the train loss falls);
    ``underfitting``: train - val accuracy at most ``close``, both below ``low_accuracy``, training
    accuracy above chance but plateaued and the learning rate still on; each on ``patience``
    validations in a row. ``check-skipped`` (info) when no train/val pair is found.

    Thresholds: see docs/thresholds.md#train-val-gap.

    Args:
        train_metric, val_metric: accuracy names in ``callback_metrics`` (higher is better).
        train_loss, val_loss: loss names in ``callback_metrics``.
        num_classes: the number of classes, for the chance level of ``underfitting``.
        gap: train - val accuracy above which ``overfitting`` is reported (default 0.2).
        close: largest train - val accuracy still "close" for ``underfitting`` (default 0.05).
        low_accuracy: accuracy below which both are "low" (default ``(1 + 1/C) / 2`` for ``C``
            classes from ``num_classes`` or another recipe callback; else not judged).
        plateau: training-accuracy gain over ``patience`` validations below which training has
            plateaued (default 0.01).
        loss_rise: relative rise of the validation loss above its best for the loss-only
            ``overfitting`` test (default 0.2).
        patience: consecutive validations a condition must hold (default 3).
        on_error: ``"warn"`` or ``"raise"``.

    Example::

        trainer = L.Trainer(callbacks=[TrainValGapMonitor(num_classes=10)])
    """

    codes = ("overfitting", "underfitting")
    what = "compare train and val metrics"

    #: place of this callback's charts in the Recipe section (lower first)
    chart_rank = 10

    needs_full_copy = False  # never runs the model on a copy

    def __init__(
        self,
        train_metric: str | None = None,
        val_metric: str | None = None,
        train_loss: str | None = None,
        val_loss: str | None = None,
        num_classes: int | None = None,
        gap: float = 0.2,
        close: float = 0.05,
        low_accuracy: float | None = None,
        plateau: float = 0.01,
        loss_rise: float = 0.2,
        patience: int = 3,
        *,
        on_error: str = "warn",
    ) -> None:
        super().__init__(on_error=on_error)
        for name, value in (
            ("train_metric", train_metric),
            ("val_metric", val_metric),
            ("train_loss", train_loss),
            ("val_loss", val_loss),
        ):
            if value is not None and (not isinstance(value, str) or not value):
                raise TypeError(f"`{name}` must be a metric name (non-empty str) or None, got {value!r}")
        if (train_metric is None) != (val_metric is None):
            raise ValueError("`train_metric` and `val_metric` must be given together")
        if (train_loss is None) != (val_loss is None):
            raise ValueError("`train_loss` and `val_loss` must be given together")
        if num_classes is not None and (
            isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2
        ):
            raise ValueError(f"`num_classes` must be an int >= 2 or None, got {num_classes!r}")
        check_number("gap", gap, 0, 1, low_open=True, high_open=True)
        check_number("close", close, 0, 1, low_open=True, high_open=True)
        check_number("plateau", plateau, 0, 1, low_open=True, high_open=True)
        if low_accuracy is not None:
            check_number("low_accuracy", low_accuracy, 0, 1, low_open=True, high_open=True)
        if (
            isinstance(loss_rise, bool)
            or not isinstance(loss_rise, (int, float))
            or not 0 < loss_rise < math.inf
        ):
            raise ValueError(f"`loss_rise` must be a positive number, got {loss_rise!r}")
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise ValueError(f"`patience` must be a positive int, got {patience!r}")
        self.acc_names = (train_metric, val_metric) if train_metric else None
        self.loss_names = (train_loss, val_loss) if train_loss else None
        self.num_classes = num_classes
        self.gap = float(gap)
        self.close = float(close)
        self.low_accuracy = None if low_accuracy is None else float(low_accuracy)
        self.plateau = float(plateau)
        self.loss_rise = float(loss_rise)
        self.patience = patience
        self.streaks = Streaks()
        self.history: list[dict[str, float]] = []
        self._val: dict[str, Tensor | float] | None = None
        self._skipped = False
        self._lr_peak: dict[str, float] = {}
        #: per kind, validation metrics found by the words in their names (no guessed name logged)
        self._by_words: dict[str, list[tuple[str, Any]]] = {}

    # ------------------------------------------------------------------ hooks
    @guarded
    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if getattr(trainer, "sanity_checking", False) or self._skipped:
            return
        metrics = getattr(trainer, "callback_metrics", {}) or {}
        found: dict[str, Tensor | float] = {}
        for kind, names, guesses in (
            ("acc", self.acc_names, ACCURACY_GUESSES),
            ("loss", self.loss_names, LOSS_GUESSES),
        ):
            for val_name in _candidates([names[1]] if names else [g[1] for g in guesses]):
                if val_name in metrics:
                    found[f"val_{kind}"] = metrics[val_name]
                    self.figures[f"val_{kind}_name"] = val_name
                    break
            else:
                if not names and not self.acc_names and not self.loss_names:
                    self._by_words[kind] = [(n, metrics[n]) for n in _val_by_words(metrics, kind)]
        self._val = found

    @guarded
    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self._evaluate(trainer)

    @guarded
    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._evaluate(trainer)  # a validation after the last completed epoch (max_steps mid-epoch)

    def _evaluate(self, trainer: Any) -> None:
        if self._val is None or self._skipped:
            return
        val, self._val = self._val, None
        metrics = getattr(trainer, "callback_metrics", {}) or {}
        values = dict(val)
        for kind, named in self._by_words.items():  # names read by their words: the pair's twin
            for val_name, value in named:
                twin = next((t for t in _candidates(_train_twins(val_name)) if t in metrics), None)
                if twin is not None:
                    values[f"val_{kind}"], values[f"train_{kind}"] = value, metrics[twin]
                    self.figures[f"val_{kind}_name"], self.figures[f"train_{kind}_name"] = val_name, twin
                    break
        self._by_words = {}
        for kind, names, guesses in (
            ("acc", self.acc_names, ACCURACY_GUESSES),
            ("loss", self.loss_names, LOSS_GUESSES),
        ):
            if f"val_{kind}" not in val:
                continue
            found = self.figures.get(f"val_{kind}_name")
            pairs = [names] if names else [g for g in guesses if found in _candidates([g[1]])]
            pairs = pairs or list(guesses)
            for train_name in _candidates([p[0] for p in pairs]):
                if train_name in metrics:
                    values[f"train_{kind}"] = metrics[train_name]
                    self.figures[f"train_{kind}_name"] = train_name
                    break
        host = stats.to_host(values)  # one transfer for this validation
        has_acc = "train_acc" in host and "val_acc" in host
        has_loss = "train_loss" in host and "val_loss" in host
        if not has_acc and not has_loss:
            self._skip(trainer, host)
            return
        self._log(trainer, host)
        self.history.append(
            {"step": float(trainer.global_step), "epoch": float(trainer.current_epoch), **host}
        )
        if has_acc:
            self._judge_accuracy(trainer, host)
        else:
            self._judge_loss(trainer, host)

    # ------------------------------------------------------------------ logging
    def _log(self, trainer: Any, host: dict[str, float]) -> None:
        scalars = {f"recipe/train_val/{k}": v for k, v in host.items() if math.isfinite(v)}
        for k in ("train_loss", "val_loss"):  # the log-scale chart (custom scalars has no log axis)
            if k in host and math.isfinite(host[k]) and host[k] > 0:
                scalars[f"recipe/train_val/{k}_log10"] = math.log10(host[k])
        if "train_acc" in host and "val_acc" in host:
            scalars["recipe/train_val_gap/acc"] = host["train_acc"] - host["val_acc"]
        if "train_loss" in host and "val_loss" in host:
            scalars["recipe/train_val_gap/loss"] = host["val_loss"] - host["train_loss"]
        scalars = {k: v for k, v in scalars.items() if math.isfinite(v)}
        tensorboard.log_scalars(trainer, scalars)
        self.figures.update({k: v for k, v in host.items()})

    # ------------------------------------------------------------------ verdicts
    def _judge_accuracy(self, trainer: Any, host: dict[str, float]) -> None:
        train, val = host["train_acc"], host["val_acc"]
        gap = train - val
        self.figures["gap"] = gap
        over = self.streaks.update("overfitting", gap > self.gap)
        if over >= self.patience and not self.has_reported("overfitting"):
            recent = self.history[-self.patience :]
            pairs = ", ".join(f"{h['train_acc']:.3f}/{h['val_acc']:.3f}" for h in recent)
            self.report(
                trainer,
                "overfitting",
                Severity.WARNING,
                f"Train accuracy is {gap:.3f} above validation accuracy ({train:.3f} vs {val:.3f}; "
                f"train/val on the last {self.patience} validations: {pairs}; flag above {self.gap:.2f}): "
                "the model is overfitting; get more data, add augmentation, weight decay or dropout, "
                "or stop early (RecipeEarlyStopping).",
                {
                    "train_acc": train,
                    "val_acc": val,
                    "gap": gap,
                    "history": _brief(recent),
                    "threshold": self.gap,
                },
            )
        self._judge_underfitting(trainer, train, val, gap)

    def _judge_underfitting(self, trainer: Any, train: float, val: float, gap: float) -> None:
        low = self._low_threshold(trainer)
        if low is None:
            self.figures["underfitting"] = "not judged: pass num_classes or low_accuracy"
            return
        self.figures["low_accuracy"] = low
        # a model at chance level learns nothing at all: that is a bug or a dead learning rate
        # (LossCurveMonitor's loss-not-decreasing), not a model that is too small
        chance = self._chance(trainer)
        learned = train > chance + LEARNED_MARGIN * (1.0 - chance)
        # a plateau because the learning rate decayed to ~0 is not the model's capacity
        training = self._lr_active(trainer)
        both_low = gap <= self.close and train < low and val < low and learned and training
        count = self.streaks.update("underfitting", both_low)
        if count < self.patience or len(self.history) <= self.patience or self.has_reported("underfitting"):
            return
        before = max(h["train_acc"] for h in self.history[: -self.patience])
        gain = max(h["train_acc"] for h in self.history[-self.patience :]) - before
        if gain >= self.plateau:
            return
        recent = self.history[-self.patience :]
        pairs = ", ".join(f"{h['train_acc']:.3f}/{h['val_acc']:.3f}" for h in recent)
        self.report(
            trainer,
            "underfitting",
            Severity.WARNING,
            f"Train and validation accuracy are close and both low ({train:.3f} vs {val:.3f}, below "
            f"{low:.3f}; train/val on the last {self.patience} validations: {pairs}) and training has "
            f"plateaued (train accuracy +{gain:.3f} in {self.patience} validations): the model is "
            "underfitting; make it bigger (more layers or units), train longer or raise the learning "
            "rate (unless the labels are this noisy).",
            {
                "train_acc": train,
                "val_acc": val,
                "gap": gap,
                "low_accuracy": low,
                "train_gain": gain,
                "history": _brief(recent),
            },
        )

    def _judge_loss(self, trainer: Any, host: dict[str, float]) -> None:
        train, val = host["train_loss"], host["val_loss"]
        finite = [h for h in self.history if math.isfinite(h["val_loss"])]
        if not finite or not math.isfinite(val):
            return
        best = min(finite, key=lambda h: h["val_loss"])
        rose = val > best["val_loss"] + self.loss_rise * abs(best["val_loss"])
        falling = math.isfinite(train) and train < best["train_loss"]
        count = self.streaks.update("overfitting_loss", rose and falling)
        if count < self.patience or self.has_reported("overfitting"):
            return
        self.report(
            trainer,
            "overfitting",
            Severity.WARNING,
            f"The validation loss rose from its best {best['val_loss']:.4g} (epoch {int(best['epoch'])}) to "
            f"{val:.4g} while the training loss fell from {best['train_loss']:.4g} to {train:.4g}, on "
            f"{self.patience} validations in a row: the model is overfitting; get more data, add "
            "augmentation, weight decay or dropout, or stop early (RecipeEarlyStopping).",
            {
                "val_loss": val,
                "best_val_loss": best["val_loss"],
                "best_epoch": int(best["epoch"]),
                "train_loss": train,
                "train_loss_at_best": best["train_loss"],
                "loss_rise": self.loss_rise,
            },
        )

    # ------------------------------------------------------------------ end of fit
    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self.run_safely(trainer, "on_fit_end", self._rejudge, trainer)
        super().on_fit_end(trainer, pl_module)

    def _rejudge(self, trainer: Any) -> None:
        """Withdraw an ``overfitting`` verdict the rest of the run refuted: the validation metric
        reached a new best after it (a transient rise, e.g. at the peak of a warm-up schedule) and
        the last validation no longer shows the gap."""
        for f in list(self._recipe_findings()):
            if f.code != "overfitting" or f.severity is Severity.INFO:
                continue
            before = [h for h in self.history if h["step"] <= f.step]
            after = [h for h in self.history if h["step"] > f.step]
            if not before or not after:
                continue
            last = after[-1]
            if "val_acc" in f.evidence and "val_acc" in last:
                best_before = max(h["val_acc"] for h in before)
                best_after = max(after, key=lambda h: h["val_acc"])
                if best_after["val_acc"] > best_before and last["train_acc"] - last["val_acc"] <= self.gap:
                    self.withdraw(
                        trainer,
                        f,
                        f"validation accuracy reached a new best {best_after['val_acc']:.3f} at epoch "
                        f"{int(best_after['epoch'])} and the last gap is "
                        f"{last['train_acc'] - last['val_acc']:.3f} (flag above {self.gap:.2f})",
                    )
            elif "best_val_loss" in f.evidence and "val_loss" in last:
                finite = [h for h in after if math.isfinite(h["val_loss"])]
                best_after = min(finite, key=lambda h: h["val_loss"]) if finite else None
                if best_after is not None and best_after["val_loss"] < f.evidence["best_val_loss"]:
                    self.withdraw(
                        trainer,
                        f,
                        f"the validation loss reached a new best {best_after['val_loss']:.4g} at epoch "
                        f"{int(best_after['epoch'])}, below {f.evidence['best_val_loss']:.4g} before the "
                        "rise (a transient, e.g. the peak of a warm-up or cyclic schedule)",
                    )

    def _low_threshold(self, trainer: Any) -> float | None:
        if self.low_accuracy is not None:
            return self.low_accuracy
        c = self.num_classes or _measured_classes(trainer)
        if not c:
            return None
        return (1.0 + 1.0 / c) / 2.0

    def _lr_active(self, trainer: Any) -> bool:
        """False when every param group's learning rate is below 1% of its peak (host floats)."""
        rates = []
        for i, opt in enumerate(getattr(trainer, "optimizers", None) or []):
            for j, group in enumerate(getattr(opt, "param_groups", [])):
                lr, start = group.get("lr"), group.get("initial_lr")
                if isinstance(lr, Tensor) or lr is None:
                    return True  # reading it would sync; assume it trains
                key = f"{i}/{j}"
                peak = max(self._lr_peak.get(key, 0.0), float(lr), float(start or 0.0))
                self._lr_peak[key] = peak
                rates.append((float(lr), peak))
        return not rates or any(lr >= 0.01 * peak for lr, peak in rates if peak > 0)

    def _chance(self, trainer: Any) -> float:
        c = self.num_classes or _measured_classes(trainer)
        return 1.0 / c if c else 0.0

    def _skip(self, trainer: Any, host: dict[str, float]) -> None:
        self._skipped = True
        tried = (
            [n for pair in (self.acc_names, self.loss_names) if pair for n in pair]
            if self.acc_names or self.loss_names
            else [n for pair in (*ACCURACY_GUESSES, *LOSS_GUESSES) for n in pair]
        )
        present = sorted(getattr(trainer, "callback_metrics", {}) or {})
        self.skip(
            trainer,
            f"found no pair of train/val metrics in callback_metrics (tried "
            f"{', '.join(sorted(set(tried)))}, each also with '_epoch' and '/dataloader_idx_0', and any "
            f"name pair that differs only in {'/'.join(TRAIN_WORDS)} vs {'/'.join(VAL_WORDS)}; "
            f"logged: {', '.join(present) or 'none'}); "
            "log them with self.log(..., on_epoch=True) or pass train_metric/val_metric",
            tried=sorted(set(tried)),
            found=present,
        )

    # ------------------------------------------------------------------ layout and resume
    def tensorboard_charts(self) -> dict[str, dict[str, tuple[str, list[str]]]]:
        return {
            "Recipe": {
                "Train vs val loss": ("Multiline", [r"recipe/train_val/(train|val)_loss$"]),
                "Train vs val loss (log10)": ("Multiline", [r"recipe/train_val/(train|val)_loss_log10"]),
                "Train vs val accuracy": ("Multiline", [r"recipe/train_val/(train|val)_acc"]),
                "Train-val gap (acc: train - val, loss: val - train)": (
                    "Multiline",
                    [r"recipe/train_val_gap/.*"],
                ),
            }
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "streaks": self.streaks.state_dict(),
            "history": [dict(h) for h in self.history],
            "skipped": self._skipped,
            "lr_peak": dict(self._lr_peak),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.streaks.load_state_dict(state_dict.get("streaks", {}))
        self.history = [{str(k): float(v) for k, v in h.items()} for h in state_dict.get("history", [])]
        self._skipped = bool(state_dict.get("skipped", False))
        self._lr_peak = {str(k): float(v) for k, v in state_dict.get("lr_peak", {}).items()}


# ---------------------------------------------------------------------------- helpers
def _candidates(names: Sequence[str]) -> list[str]:
    """Each name's ``_epoch`` variant first, then the name itself, then the first validation
    dataloader's (Lightning suffixes ``/dataloader_idx_0`` when there are several)."""
    out: list[str] = []
    for n in names:
        out += [f"{n}_epoch", n, f"{n}/dataloader_idx_0"]
    return out


def _measured_classes(trainer: Any) -> int | None:
    """The class count another recipe callback measured (e.g. LossAtInitCheck's figures)."""
    for cb in _context.recipe_callbacks_of(trainer):
        c = getattr(cb, "figures", {}).get("num_classes")
        if isinstance(c, int) and not isinstance(c, bool) and c >= 2:
            return c
    return None


def _brief(history: list[dict[str, float]]) -> list[dict[str, float]]:
    keys = ("epoch", "train_acc", "val_acc", "train_loss", "val_loss")
    return [{k: h[k] for k in keys if k in h} for h in history]


_SUFFIX = re.compile(r"(_epoch|_step)?(/dataloader_idx_\d+)?$")
_SPLIT = re.compile(r"([_/.\-])")


def _val_by_words(metrics: Mapping[str, Any], kind: str) -> list[str]:
    """Logged names that read as a validation metric of ``kind`` by their words (a word of
    :data:`VAL_WORDS` and one of :data:`KIND_WORDS`, split on ``_ / . -``), shortest first
    (``valid_loss`` before ``valid_loss_0``)."""
    out = []
    for name in metrics:
        if not isinstance(name, str):
            continue
        words = [w.lower() for w in _SPLIT.split(_SUFFIX.sub("", name))[::2]]
        if any(w in VAL_WORDS for w in words) and any(w in KIND_WORDS[kind] for w in words):
            out.append(name)
    return sorted(out, key=lambda n: (len(n), n))


def _train_twins(val_name: str) -> list[str]:
    """The training names that pair with ``val_name``: its validation word replaced by each of
    :data:`TRAIN_WORDS` (case kept as lower case), without Lightning's suffixes."""
    parts = _SPLIT.split(_SUFFIX.sub("", val_name))
    out = []
    for i in range(0, len(parts), 2):
        if parts[i].lower() in VAL_WORDS:
            out += ["".join([*parts[:i], word, *parts[i + 1 :]]) for word in TRAIN_WORDS]
    return out
