"""PredictionDynamicsMonitor: the model's predictions on a fixed validation batch over training."""

from __future__ import annotations

import math
from collections import deque
from typing import Any

import torch
from torch import Tensor

from lightning_recipe import _losses, _sharded, tensorboard
from lightning_recipe._probe import (
    REGRESSION_LOSSES,
    EvalStep,
    LossCall,
    ProbeSkip,
    StepFn,
    class_scores,
    copy_module,
    is_manual_optimization,
    preserved_rng,
)
from lightning_recipe._validate import check_int, check_number
from lightning_recipe.batch import BatchAdapter, BatchLayoutError, BatchStash, Getter
from lightning_recipe.callback import guarded
from lightning_recipe.findings import Severity
from lightning_recipe.monitors.base import StepMonitor

TAG = "recipe/prediction_dynamics"
_BINARY_LOSSES = ("binary_cross_entropy_with_logits", "binary_cross_entropy")
_WRONG_SHADE = 0.55
#: share of the late flips between one pair of classes above which the flipping is that pair's
PAIR_SHARE = 0.6


class PredictionDynamicsMonitor(StepMonitor):
    """Watch the model's predictions on one fixed validation batch as training goes on.

    Karpathy: "visualize prediction dynamics: model predictions on a fixed test batch during the
    course of training" -- they show instability and a learning rate too low or too high. The
    monitor keeps the first ``num_examples`` examples of the first validation batch the trainer
    runs and, every ``every_n_steps`` optimizer steps (and before the first), runs your
    ``validation_step`` on a copy of the model in eval mode, reading per example the predicted
    class and the probability of the true class (classifiers) or the error over the targets' std
    (regression). It logs the image ``recipe/prediction_dynamics`` (examples x logging steps, red
    to green, darker when wrong) and ``recipe/prediction_dynamics/flips``, ``.../accuracy``,
    ``.../true_class_prob`` or ``.../error``; the history is saved in checkpoints.

    Reports ``prediction-instability`` (warning, once, classifiers only) when, late in training,
    more than ``flip_threshold`` of the examples changed their predicted class since the previous
    log on at least ``patience`` of the last ``window`` logs. Early flipping is normal and never
    counted.

    Thresholds: see docs/thresholds.md#prediction-dynamics.

    Args:
        every_n_steps: logging interval in optimizer steps (``None``: ``Trainer(log_every_n_steps)``).
        num_examples: how many examples (rows of the loss input for sequence models) to follow.
        flip_threshold: fraction of examples flipping per log above which a log counts as unstable.
        patience: how many of the last ``window`` late logs must be unstable for the finding.
        window: the number of recent logs judged together.
        late_fraction: the fraction of the planned steps after which flipping counts as late
            (without a planned length: no new best accuracy on the batch for ``window`` logs).
        max_history: how many logs the image and the checkpointed history keep.
        get_input, get_target: ``callable(batch)`` returning the input / target, for batch layouts
            the guess cannot read.
        step_fn: ``callable(model, batch) -> loss`` replacing ``training_step`` (needed under
            manual optimisation).
        on_error: ``"warn"`` or ``"raise"``.

    Example::

        trainer = L.Trainer(callbacks=[PredictionDynamicsMonitor(every_n_steps=20)],
                            logger=TensorBoardLogger("runs"))
        trainer.fit(model, datamodule)  # Images tab: recipe/prediction_dynamics
    """

    codes = ("prediction-instability",)
    what = "follow predictions"

    def __init__(
        self,
        every_n_steps: int | None = None,
        num_examples: int = 32,
        flip_threshold: float = 0.25,
        patience: int = 3,
        window: int = 5,
        late_fraction: float = 0.5,
        max_history: int = 200,
        *,
        get_input: Getter | None = None,
        get_target: Getter | None = None,
        step_fn: StepFn | None = None,
        on_error: str = "warn",
    ) -> None:
        super().__init__(every_n_steps, on_error=on_error)
        check_int("num_examples", num_examples, 1)
        check_int("patience", patience, 1)
        check_int("window", window, 1)
        check_int("max_history", max_history, 2)
        if window < patience:
            raise ValueError(f"`window` must be >= `patience` ({patience}), got {window!r}")
        if max_history < window:
            raise ValueError(f"`max_history` must be >= `window` ({window}), got {max_history!r}")
        check_number("flip_threshold", flip_threshold, 0, 1, low_open=True, high_open=True)
        check_number("late_fraction", late_fraction, 0, 1, low_open=False, high_open=True)
        self.num_examples = num_examples
        self.flip_threshold = float(flip_threshold)
        self.patience = patience
        self.window = window
        self.late_fraction = float(late_fraction)
        self.max_history = max_history
        self.read_batches_with(get_input, get_target, step_fn)
        self._eval_step = EvalStep(step_fn)
        self._reset()

    def _reset(self) -> None:
        self._stash = BatchStash(1, self.adapter, self.num_examples)
        self._batch: Any = None
        self._fixed = False  # a batch was fixed (or the monitor gave up on fixing one)
        self._eval_step = EvalStep(self.step_fn)
        self._signature: list[float] | None = None
        self._kind: str | None = None
        self._steps: deque[int] = deque(maxlen=self.max_history)
        self._values: deque[list[float]] = deque(maxlen=self.max_history)
        self._wrong: deque[list[bool]] = deque(maxlen=self.max_history)
        self._preds: list[float] | None = None
        self._flips: deque[tuple[int, float]] = deque(maxlen=self.max_history)  # (step, flip rate)
        # the (class, class) pairs the flipping examples moved between, per log (not checkpointed)
        self._flip_pairs: deque[list[tuple[float, float]]] = deque(maxlen=self.max_history)
        self._classes_seen: set[int] = set()
        self._best_acc = -1.0
        self._logs_since_best = 0

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit":
            self._reset()
            self._last_logged_step = -1

    def on_validation_batch_start(
        self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if self._fixed or self._stash.full or not self.active:
            return
        self.run_safely(
            trainer,
            "on_validation_batch_start",
            self._stash.offer,
            batch,
            dataloader_idx,
            batch_idx,
        )

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        # not @guarded: _log_step runs a collective that every rank must reach
        if trainer.global_step == 0 and self._due_step(trainer):
            self._log_step(trainer, pl_module)

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._due_step(trainer):
            self._log_step(trainer, pl_module)

    @guarded
    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if not self._values and not self.has_reported("check-skipped"):
            self._skip(
                trainer,
                "no validation batch was seen before the end of training (no val_dataloader, "
                "limit_val_batches=0, or no validation ran), so there was no fixed batch to follow",
                at_end=True,
            )

    def teardown_diagnostics(self) -> None:
        self._stash.clear()
        self._batch = None

    # ------------------------------------------------------------------ one logging step
    def _due_step(self, trainer: Any) -> bool:
        # deliberately not `self.due()`: it is False once this rank turned itself off, and every
        # rank must reach the collective below at the same steps
        step = trainer.global_step
        return step % self.interval(trainer) == 0 and step != self._last_logged_step

    def _log_step(self, trainer: Any, pl_module: Any) -> None:
        self.mark_logged(trainer)
        # sharded model: its full weights for the copy (ranks agree first; nothing under DDP)
        has_batch = self._batch is not None or (not self._fixed and bool(self._stash.batches))
        with _sharded.gathered(trainer, pl_module, need=self.active and has_batch):
            unstable = bool(self.run_safely(trainer, "on_train_batch_end", self._measure, trainer, pl_module))
        unstable = bool(trainer.strategy.reduce_boolean_decision(unstable, all=True))
        if unstable and self.active and not self.has_reported("prediction-instability"):
            self.run_safely(trainer, "on_train_batch_end", self._report_instability, trainer)

    def _measure(self, trainer: Any, pl_module: Any) -> bool:
        """Evaluate the fixed batch, log; True when this log counts as unstable (rank-local)."""
        if not self._fix_batch(trainer, pl_module):
            return False
        try:
            kind, values, wrong, preds = self._evaluate(trainer, pl_module)
        except (ProbeSkip, BatchLayoutError) as why:
            self._give_up(trainer, str(why))
            return False
        if self._values and (kind != self._kind or len(values) != len(self._values[-1])):
            self._clear_history()
        self._kind = kind
        flips = None
        if preds is not None and self._preds is not None and len(preds) == len(self._preds):
            moved = [(min(a, b), max(a, b)) for a, b in zip(preds, self._preds) if a != b]
            flips = len(moved)
            self._flip_pairs.append(moved)
            self._classes_seen.update(int(p) for p in preds)
        self._preds = preds
        self._steps.append(int(trainer.global_step))
        self._values.append(values)
        self._wrong.append(wrong)
        return self._log(trainer, values, wrong, flips)

    def _log(self, trainer: Any, values: list[float], wrong: list[bool], flips: int | None) -> bool:
        n = len(values)
        if self._kind == "regression":
            error = sum(values) / n
            metrics = {f"{TAG}/error": error}
            self.figures.update({"kind": "regression", "examples": n, "error": error})
        else:
            accuracy = 1.0 - sum(wrong) / n
            metrics = {f"{TAG}/accuracy": accuracy, f"{TAG}/true_class_prob": sum(values) / n}
            self.figures.update({"kind": "classification", "examples": n, "accuracy": accuracy})
            if accuracy > self._best_acc + 1.0 / n - 1e-9:
                self._best_acc, self._logs_since_best = accuracy, 0
            else:
                self._logs_since_best += 1
        if flips is not None:
            metrics[f"{TAG}/flips"] = float(flips)
            rate = flips / n
            self._flips.append((int(trainer.global_step), rate))
            self.figures["flip_rate"] = rate
        self.figures["logs"] = int(self.figures.get("logs", 0)) + 1
        tensorboard.log_scalars(trainer, metrics)
        if tensorboard.get_writer(trainer) is not None:  # rank zero with a TensorBoard logger
            tensorboard.add_image(trainer, TAG, self.image())
        if flips is None or self._kind == "regression":
            return False
        recent = self._late_flips(trainer)
        if recent is None:
            return False
        # the patience-th largest rate of the window: the flip rate at least `patience` logs reached
        level = sorted(recent, reverse=True)[self.patience - 1]
        key = "max_late_flip_level"
        self.figures[key] = max(float(self.figures.get(key, 0.0)), level)
        return level > self.flip_threshold

    def _late_flips(self, trainer: Any) -> list[float] | None:
        """The flip rates of the last ``window`` logs if they all fall late in training."""
        recent = list(self._flips)[-self.window :]
        if len(recent) < self.window:
            return None
        planned = _planned_steps(trainer)
        if planned:
            late = all(step >= self.late_fraction * planned for step, _ in recent)
        else:
            late = self._logs_since_best >= self.window
        return [rate for _, rate in recent] if late else None

    def _report_instability(self, trainer: Any) -> None:
        recent = list(self._flips)[-self.window :]
        rates = [rate for _, rate in recent]
        steps = [step for step, _ in recent]
        above = sum(r > self.flip_threshold for r in rates)
        n = len(self._values[-1]) if self._values else 0
        planned = _planned_steps(trainer)
        where = f"steps {steps[0]}-{steps[-1]}" + (f" of {planned}" if planned else "")
        acc = self.figures.get("accuracy")
        shown = ", ".join(f"{r:.0%}" for r in rates)
        pair = self._pair_of_flips()
        if pair is not None:
            self._report_pair(trainer, pair, rates, steps, n, acc)
            return
        self.report(
            trainer,
            "prediction-instability",
            Severity.WARNING,
            f"Predictions on the fixed validation batch keep flipping late in training: {shown} of its "
            f"{n} examples changed their predicted class between consecutive logs ({where}), above "
            f"{self.flip_threshold:.0%} on {above} of the last {self.window} logs (converging runs: mostly "
            f"under 10%), accuracy on the batch {acc:.0%}; the learning rate is probably too high: "
            "lower it or decay it, or use a larger batch.",
            {
                "flip_rates": rates,
                "logs_above": above,
                "window": self.window,
                "steps": steps,
                "examples": n,
                "flip_threshold": self.flip_threshold,
                "patience": self.patience,
                "planned_steps": planned,
                "accuracy": acc,
            },
        )

    def _pair_of_flips(self) -> tuple[int, int, float] | None:
        """The pair of classes that most flips of the last ``window`` logs moved between, with its
        share, when that share is at least ``PAIR_SHARE`` and the model predicts 3 or more classes;
        else ``None``. A learning rate too high throws examples across every boundary; flips
        confined to one pair are a pair the model cannot tell apart (labels that contradict the
        input: ``label-noise``)."""
        moved = [p for log in list(self._flip_pairs)[-self.window :] for p in log]
        if not moved or len(self._classes_seen) < 3:
            return None
        counts: dict[tuple[float, float], int] = {}
        for p in moved:
            counts[p] = counts.get(p, 0) + 1
        top, hits = max(counts.items(), key=lambda kv: kv[1])
        share = hits / len(moved)
        return (int(top[0]), int(top[1]), share) if share >= PAIR_SHARE else None

    def _report_pair(
        self,
        trainer: Any,
        pair: tuple[int, int, float],
        rates: list[float],
        steps: list[int],
        n: int,
        acc: Any,
    ) -> None:
        i, j, share = pair
        shown = ", ".join(f"{r:.0%}" for r in rates)
        self.report(
            trainer,
            "prediction-instability",
            Severity.INFO,
            f"Predictions on the fixed validation batch keep flipping late in training ({shown} of its {n} "
            f"examples per log, steps {steps[0]}-{steps[-1]}), but {share:.0%} of the flips go between "
            f"classes {i} and {j} only: not a learning rate too high (that throws examples across every "
            "boundary) but a pair of classes the model cannot tell apart, e.g. labels that contradict the "
            "input (an augmentation that changes their meaning, such as a horizontal flip of left/right "
            "classes): see label-noise (LabelNoiseMonitor).",
            {
                "flip_rates": rates,
                "steps": steps,
                "examples": n,
                "pair": [i, j],
                "pair_share_of_flips": share,
                "accuracy": acc,
                "flip_threshold": self.flip_threshold,
            },
        )

    # ------------------------------------------------------------------ the fixed batch
    def _fix_batch(self, trainer: Any, pl_module: Any) -> bool:
        if self._batch is not None:
            return True
        if self._fixed or not self._stash.batches:
            return False
        self._fixed = True
        if self.step_fn is None and is_manual_optimization(pl_module):
            self._give_up(
                trainer,
                "the module uses manual optimisation, so its training_step steps the optimizers; "
                "pass step_fn=lambda model, batch: loss",
            )
            return False
        batch = self._stash.batches[0]
        self._stash.clear()
        try:
            n = self.adapter.batch_size(batch)
            self._batch = self.adapter.slice(batch, min(n, self.num_examples))
            signature = _signature(self.adapter, self._batch)
        except BatchLayoutError as why:
            self._give_up(trainer, str(why))
            return False
        if self._signature is not None and not _same(signature, self._signature):
            self._clear_history()  # resumed with another validation batch: columns would not line up
        self._signature = signature
        return True

    def _evaluate(
        self, trainer: Any, pl_module: Any
    ) -> tuple[str, list[float], list[bool], list[float] | None]:
        model = copy_module(pl_module, trainer)
        try:
            model.eval()
            with preserved_rng(), torch.no_grad():
                result = self._eval_step(model, self._batch)
                call = result.main_call
                if call is None:
                    raise ProbeSkip(
                        "no torch.nn.functional loss (or nn.*Loss) was seen in "
                        f"{self._eval_step.name}, so the predictions and targets could not be read"
                    )
                read = read_predictions(call, self.num_examples)
        finally:
            del model
        if read is None:
            raise ProbeSkip(f"per-example predictions cannot be read from a {call.name} loss")
        kind, packed = read
        host = packed.detach().float().cpu()  # the one host transfer of this logging step
        values = [float(v) for v in host[0].tolist()]
        if kind == "regression":
            return kind, values, [False] * len(values), None
        wrong = [bool(v) for v in host[1].tolist()]
        preds = [float(v) for v in host[2].tolist()]
        return kind, values, wrong, preds

    def _is_late(self, trainer: Any) -> bool:
        planned = _planned_steps(trainer)
        if planned:
            return trainer.global_step >= self.late_fraction * planned
        return self._logs_since_best >= self.patience

    def _clear_history(self) -> None:
        self._steps.clear()
        self._values.clear()
        self._wrong.clear()
        self._flips.clear()
        self._flip_pairs.clear()
        self._preds = None

    def _give_up(self, trainer: Any, reason: str) -> None:
        self._fixed = True
        self._batch = None
        self._stash.clear()
        self._skip(trainer, reason)

    def _skip(self, trainer: Any, reason: str, at_end: bool = False) -> None:
        self.skip(trainer, reason, once=True, end_of_fit=at_end)

    # ------------------------------------------------------------------ image
    def image(self) -> Tensor:
        """The (3, H, W) image of the history: rows = examples, columns = logs (oldest left)."""
        values = torch.tensor(list(self._values), dtype=torch.float32).T  # (N, T)
        wrong = torch.tensor(list(self._wrong), dtype=torch.bool).T
        good = 1.0 - (values / 2.0).clamp(0, 1) if self._kind == "regression" else values.clamp(0, 1)
        red = (2.0 * (1.0 - good)).clamp(0, 1)
        green = (2.0 * good).clamp(0, 1)
        rgb = torch.stack([red, green, torch.zeros_like(red)])
        rgb = torch.where(wrong.unsqueeze(0), rgb * _WRONG_SHADE, rgb)
        rows, cols = good.shape
        cell_h = max(1, math.ceil(192 / rows))
        cell_w = max(1, min(cell_h, math.ceil(800 / cols)))
        return rgb.repeat_interleave(cell_h, dim=1).repeat_interleave(cell_w, dim=2)

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "kind": self._kind,
            "signature": self._signature,
            "steps": list(self._steps),
            "values": [list(v) for v in self._values],
            "wrong": [list(w) for w in self._wrong],
            "preds": self._preds,
            "flips": [list(f) for f in self._flips],
            "best_acc": self._best_acc,
            "logs_since_best": self._logs_since_best,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        # the end-of-training skip of a checkpoint saved after on_train_end is that fit's verdict:
        # the resumed fit decides again at its own end
        self._findings = [f for f in self._findings if not f.evidence.get("end_of_fit")]
        self._reset()
        self._kind = state_dict.get("kind")
        sig = state_dict.get("signature")
        self._signature = [float(v) for v in sig] if sig is not None else None
        self._steps.extend(int(s) for s in state_dict.get("steps", []))
        self._values.extend([float(x) for x in v] for v in state_dict.get("values", []))
        self._wrong.extend([bool(x) for x in w] for w in state_dict.get("wrong", []))
        preds = state_dict.get("preds")
        self._preds = [float(p) for p in preds] if preds is not None else None
        self._flips.extend((int(s), float(r)) for s, r in state_dict.get("flips", []))
        self._best_acc = float(state_dict.get("best_acc", -1.0))
        self._logs_since_best = int(state_dict.get("logs_since_best", 0))


# ---------------------------------------------------------------------------- reading predictions
def read_predictions(call: LossCall, max_rows: int) -> tuple[str, Tensor] | None:
    """Per-example predictions from a loss call, packed for one host transfer.

    Returns ``("classification", (3, N) [p_true, wrong, predicted class])`` or
    ``("regression", (1, N) [normalised error])``, or ``None`` for other losses. Rows with an
    ignored target (``ignore_index``) are left out; at most ``max_rows`` evenly spaced rows.
    """
    if call.name in _BINARY_LOSSES:
        return _binary(call, max_rows)
    if call.name in REGRESSION_LOSSES:
        return _regression(call, max_rows)
    view = class_scores(call)
    if view is None:
        return _any_loss(call, max_rows)
    scores = view.scores.float()
    target = view.target
    if target is None and isinstance(call.target, Tensor) and call.target.shape == call.input.shape:
        target = call.target.detach().float().movedim(1, -1).reshape(-1, view.num_classes).argmax(1)
    if target is None:
        return None
    keep = (target >= 0) & (target < view.num_classes)
    scores, target = scores[keep], target[keep].long()
    if target.numel() == 0:
        return None
    rows = _rows(target.numel(), max_rows, scores.device)
    scores, target = scores[rows], target[rows]
    probs = scores.softmax(dim=1)
    pred = probs.argmax(dim=1)
    p_true = probs.gather(1, target[:, None]).squeeze(1)
    return "classification", torch.stack([p_true, (pred != target).float(), pred.float()])


def _any_loss(call: Any, max_rows: int) -> tuple[str, Tensor] | None:
    """Per-example predictions of any other loss (a custom module, a metric, a distribution's
    likelihood) read by ``_losses.prediction_view``."""
    view = _losses.prediction_view(call)
    if view is None:
        return None
    kind, pred, target = view
    if kind == "regression":
        scale = target.std() if target.numel() > 1 else target.abs().mean()
        scale = torch.where(torch.isfinite(scale) & (scale > 1e-8), scale, torch.ones_like(scale))
        rows = _rows(pred.numel(), max_rows, pred.device)
        error = (pred[rows] - target[rows]).abs() / scale
        return "regression", torch.nan_to_num(error, nan=1e6, posinf=1e6).unsqueeze(0)
    keep = (target >= 0) & (target < pred.shape[1])
    probs, target = pred[keep], target[keep]
    if target.numel() == 0:
        return None
    rows = _rows(target.numel(), max_rows, probs.device)
    probs, target = probs[rows], target[rows]
    guess = probs.argmax(dim=1)
    p_true = probs.gather(1, target[:, None]).squeeze(1)
    return "classification", torch.stack([p_true, (guess != target).float(), guess.float()])


def _binary(call: LossCall, max_rows: int) -> tuple[str, Tensor] | None:
    if not isinstance(call.target, Tensor) or call.target.numel() != call.input.numel():
        return None
    x = call.input.detach().float().reshape(-1)
    t = call.target.detach().float().reshape(-1) > 0.5
    p1 = x.sigmoid() if call.name == "binary_cross_entropy_with_logits" else x.clamp(0, 1)
    rows = _rows(x.numel(), max_rows, x.device)
    p1, t = p1[rows], t[rows]
    pred = p1 > 0.5
    p_true = torch.where(t, p1, 1.0 - p1)
    return "classification", torch.stack([p_true, (pred != t).float(), pred.float()])


def _regression(call: LossCall, max_rows: int) -> tuple[str, Tensor] | None:
    if not isinstance(call.target, Tensor) or not call.target.is_floating_point():
        return None
    try:
        pred, tgt = torch.broadcast_tensors(call.input.detach().float(), call.target.detach().float())
    except RuntimeError:
        return None
    pred, tgt = pred.reshape(-1), tgt.reshape(-1)
    scale = tgt.std() if tgt.numel() > 1 else tgt.abs().mean()
    scale = torch.where(torch.isfinite(scale) & (scale > 1e-8), scale, torch.ones_like(scale))
    rows = _rows(pred.numel(), max_rows, pred.device)
    error = (pred[rows] - tgt[rows]).abs() / scale
    return "regression", torch.nan_to_num(error, nan=1e6, posinf=1e6).unsqueeze(0)


def _rows(n: int, max_rows: int, device: torch.device) -> Tensor:
    if n <= max_rows:
        return torch.arange(n, device=device)
    return torch.linspace(0, n - 1, max_rows, device=device).round().long()


# ---------------------------------------------------------------------------- helpers
def _planned_steps(trainer: Any) -> int | None:
    try:
        planned = float(trainer.estimated_stepping_batches)
    except Exception:
        return None
    return int(planned) if math.isfinite(planned) and planned > 0 else None


def _signature(adapter: BatchAdapter, batch: Any) -> list[float]:
    """A cheap fingerprint of the fixed batch (to notice another batch after a resume)."""
    x = adapter.input(batch).detach()
    parts = [torch.tensor(float(x.shape[0]), dtype=torch.float64, device=x.device), x.double().sum()]
    target = adapter.target(batch)
    if target is not None:
        parts.append(target.detach().double().sum().to(x.device))
    return [float(v) for v in torch.stack(parts).cpu().tolist()]


def _same(a: list[float], b: list[float]) -> bool:
    return len(a) == len(b) and all(math.isclose(x, y, rel_tol=1e-5, abs_tol=1e-6) for x, y in zip(a, b))
