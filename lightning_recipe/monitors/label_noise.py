"""LabelNoiseMonitor: training labels that contradict what the net sees, concentrated in class pairs."""

from __future__ import annotations

import math
from collections import deque
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_recipe import tensorboard
from lightning_recipe._probe import ClassScores, LossCall, StepResult, class_scores, scores_by_shape
from lightning_recipe._validate import check_int, check_number
from lightning_recipe.batch import BatchAdapter, BatchLayoutError, Getter
from lightning_recipe.callback import RecipeCallback
from lightning_recipe.findings import Severity
from lightning_recipe.monitors._ride_along import StepCapture, batch_indices, planned_steps

TAG = "recipe/label_noise"
#: captured steps a warning needs: the pair must stay split over several late steps, not in one
#: or two snapshots of a short run (docs/thresholds.md#label-noise)
MIN_CAPTURES = 4
#: rows kept per captured step as candidate examples (the most confidently "other" ones)
_PER_STEP = 8
#: images in the grid are shrunk to at most this side
_MAX_SIDE = 64


class LabelNoiseMonitor(RecipeCallback):
    """Find training labels that contradict what the net sees, concentrated in pairs of classes.

    Karpathy: "become one with the data ... mislabeled examples", and the recipe's first silent
    bug: "you flipped your images left-right during data augmentation" while the labels kept
    meaning left and right. The net then learns everything else and stays split on that pair. Late
    in training (after ``late_fraction`` of the planned steps), every ``every_n_steps`` steps, the
    monitor reads the class scores and targets that reach your loss in the real training step (no
    copy, no extra forward, the inputs as your pipeline augmented them) and adds them up into a
    soft confusion matrix. Per pair of classes it measures ``pair_confusion`` (the share of the
    pair's probability that goes to the *other* class of the pair: 0.5 for a coin flip) and
    ``pair_excess`` (how much more of the two classes' errors go to each other than an even spread
    over all classes would give: 0 for uniform label noise, 1 for a pure pair). Classifiers with
    one label per sample and at least 3 classes only; others get ``check-skipped``.

    Reports ``label-noise`` (warning, at the end of training) when a pair has ``pair_confusion >=
    min_pair_confusion`` and ``pair_excess >= min_pair_share``, with ``min_samples`` of each class,
    naming the pair and the examples the net most confidently puts in the other class
    (``step``/``batch_idx``/``position``, or the dataset index a dict batch carries under
    ``index``/``idx``/``indices``/``id``); their images, as they entered the step, go to the
    TensorBoard image ``recipe/label_noise``.

    Thresholds: see docs/thresholds.md#label-noise.

    Args:
        every_n_steps: capture one training step in this many (late in training).
        late_fraction: the fraction of the planned steps after which steps are captured (runs with
            no planned length: after ``min_steps`` steps).
        min_pair_confusion: ``pair_confusion`` at or above which a pair is reported.
        min_pair_share: ``pair_excess`` at or above which the errors count as a pair's.
        min_samples: samples of each class of a pair that must have been seen.
        min_steps: for runs with no planned length, the step after which steps are captured.
        get_input: ``callable(batch) -> Tensor`` for the image grid, for batch layouts the guess
            cannot read.
        on_error: ``"warn"`` or ``"raise"``.

    Example::

        trainer = L.Trainer(callbacks=[LabelNoiseMonitor()], logger=TensorBoardLogger("runs"))
        trainer.fit(model, datamodule)  # Images tab: recipe/label_noise when it fires
    """

    codes = ("label-noise",)
    what = "watch for contradicting labels"
    needs_full_copy = False  # never runs the model on a copy

    def __init__(
        self,
        every_n_steps: int = 5,
        late_fraction: float = 0.5,
        min_pair_confusion: float = 0.3,
        min_pair_share: float = 0.25,
        min_samples: int = 20,
        min_steps: int = 200,
        *,
        get_input: Getter | None = None,
        on_error: str = "warn",
    ) -> None:
        super().__init__(on_error=on_error)
        self.every_n_steps = check_int("every_n_steps", every_n_steps, 1)
        self.late_fraction = check_number("late_fraction", late_fraction, 0, 1, high_open=True)
        self.min_pair_confusion = check_number("min_pair_confusion", min_pair_confusion, 0, 1, low_open=True)
        self.min_pair_share = check_number("min_pair_share", min_pair_share, 0, 1)
        self.min_samples = check_int("min_samples", min_samples, 1)
        self.min_steps = check_int("min_steps", min_steps, 0)
        self.read_batches_with(get_input)
        self._capture = StepCapture()
        self._reset()

    def _reset(self) -> None:
        self._capture.abort()
        self._forget()
        self._pending: tuple[int, int, Any] | None = None  # (step, batch_idx, batch)
        self._last_step = -1
        self._unreadable: str | None = None
        #: why this run has nothing to judge (a regression or token model): said in figures, no finding
        self._not_applicable: str | None = None
        self._first_step = float(self.min_steps)

    def _forget(self) -> None:
        """Drop what was captured (a new fit, or captures that are not late in this one)."""
        self._sums: Tensor | None = None  # (C, C) summed probabilities per labelled class
        self._counts: Tensor | None = None  # (C,)
        self._steps_seen = 0
        self._first_captured: int | None = None
        self._pool: deque[dict[str, Any]] = deque(maxlen=64)

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit":
            self._reset()

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        # once per fit: ``estimated_stepping_batches`` is not free to ask on every step
        planned = planned_steps(trainer)
        self._first_step = self.late_fraction * planned if planned else float(self.min_steps)
        if self._first_captured is not None and self._first_captured < self._first_step:
            # resumed with a longer plan: what an earlier fit captured is not late in this one
            self._forget()

    def _due(self, trainer: Any) -> bool:
        step = int(trainer.global_step)
        if step < self._first_step or step % self.every_n_steps or step == self._last_step:
            return False
        return self.active and not self._unreadable and not self._not_applicable

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self._due(trainer):
            self.run_safely(
                trainer, "on_train_batch_start", self._start, trainer, pl_module, batch, batch_idx
            )

    def _start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._last_step = int(trainer.global_step)
        if self._capture.start(pl_module):
            self._pending = (int(trainer.global_step), int(batch_idx), batch)

    def on_before_backward(self, trainer: Any, pl_module: Any, loss: Tensor) -> None:
        if self._capture.active:
            self.run_safely(trainer, "on_before_backward", self._finish_capture, trainer, loss)

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._capture.active:
            self.run_safely(trainer, "on_train_batch_end", self._finish_capture, trainer, None)
        self._pending = None

    def _finish_capture(self, trainer: Any, loss: Tensor | None) -> None:
        result = self._capture.stop(loss)
        if result is None or self._pending is None:
            return
        step, batch_idx, batch = self._pending
        self._pending = None
        with torch.no_grad():
            self._absorb(result, step, batch_idx, batch)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._capture.abort()
        super().on_exception(trainer, pl_module, exception)

    def teardown_diagnostics(self) -> None:
        self._capture.abort()
        self._pool.clear()
        self._pending = None

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        # not @guarded: every rank must reach the collective
        self._capture.abort()
        noisy = bool(self.run_safely(trainer, "on_train_end", self._judge, trainer))
        noisy = bool(trainer.strategy.reduce_boolean_decision(noisy, all=True))
        if noisy and self.active and not self.has_reported("label-noise"):
            self.run_safely(trainer, "on_train_end", self._report, trainer)
        self._pool.clear()

    # ------------------------------------------------------------------ one captured step
    def _absorb(self, result: StepResult, step: int, batch_idx: int, batch: Any) -> None:
        call = result.main_call
        view = class_scores(call) if isinstance(call, LossCall) else None
        if view is None or view.target is None:
            view = _structural_scores(result, self._capture.forward_output, batch)
        if view is None or view.target is None:
            if call is not None or self._capture.forward_output is not None:
                # a regression, multi-label or probability-target loss: nothing to judge here
                self._not_applicable = "the training loss is not a classification loss with integer labels"
            else:
                self._unreadable = "no loss call was seen in training_step and the model's forward never ran"
            return
        c = view.num_classes
        if c < 3:
            self._not_applicable = f"it needs 3 or more classes to tell a pair apart (the loss has {c})"
            return
        rows_per_batch = int(view.scores.shape[0])
        try:
            samples = self.adapter.batch_size(batch)
        except BatchLayoutError:
            samples = rows_per_batch
        if rows_per_batch != samples:
            # a sequence / token model: the next token is uncertain by nature, not mislabelled
            self._not_applicable = (
                f"the loss scores {rows_per_batch} rows for a batch of {samples} samples (a sequence or "
                "token model); label noise is judged for one label per sample"
            )
            return
        scores, target = view.scores.float(), view.target.long()
        keep = (target >= 0) & (target < c)
        rows = torch.arange(target.numel(), device=target.device)[keep]
        scores, target = scores[keep], target[keep]
        if target.numel() == 0:
            return
        probs = scores.softmax(dim=1)
        if self._sums is None or self._counts is None or self._sums.shape[0] != c:
            self._sums = torch.zeros(c, c, device=probs.device)
            self._counts = torch.zeros(c, device=probs.device)
        elif self._sums.device != probs.device:  # restored from a checkpoint on the CPU
            self._sums, self._counts = self._sums.to(probs.device), self._counts.to(probs.device)
        if self._first_captured is None:
            self._first_captured = step
        self._sums.index_add_(0, target, probs)
        self._counts += torch.bincount(target, minlength=c).float()
        self._steps_seen += 1
        # candidate examples: the rows the net most confidently puts in another class
        other = probs.scatter(1, target[:, None], -1.0)
        p_other, pred = other.max(dim=1)
        k = min(_PER_STEP, p_other.numel())
        top = p_other.topk(k).indices
        record: dict[str, Any] = {
            "step": step,
            "batch_idx": batch_idx,
            "label": target[top],
            "other": pred[top],
            "p_other": p_other[top],
            "p_label": probs.gather(1, target[:, None]).squeeze(1)[top],
            "position": rows[top],
        }
        index = batch_indices(batch, rows_per_batch)
        if index is not None:
            record["index"] = index.to(rows.device)[rows[top]]
        image = self._images(batch, rows_per_batch, rows[top])
        if image is not None:
            record["image"] = image
        self._pool.append(record)

    def _images(self, batch: Any, n: int, rows: Tensor) -> Tensor | None:
        """The chosen rows' inputs as (k, C, H, W) images, shrunk, or ``None``."""
        try:
            x = self.adapter.input(batch)
        except BatchLayoutError:
            return None
        if not isinstance(x, Tensor) or not x.is_floating_point() or x.shape[0] != n:
            return None
        if x.dim() == 3:
            x = x.unsqueeze(1)
        if x.dim() != 4 or x.shape[1] not in (1, 3) or min(x.shape[2:]) < 4:
            return None
        x = x.detach()[rows.to(x.device)].float()
        if max(x.shape[2:]) > _MAX_SIDE:
            x = F.adaptive_avg_pool2d(x, (min(_MAX_SIDE, x.shape[2]), min(_MAX_SIDE, x.shape[3])))
        return x.clone()

    # ------------------------------------------------------------------ verdict
    def _judge(self, trainer: Any) -> bool:
        # the verdict of this fit only (a resumed run may carry an earlier fit's figures)
        self.figures = {k: v for k, v in self.figures.items() if k == "skipped"}
        if self._unreadable:
            self._skip(trainer, self._unreadable)
            return False
        if self._not_applicable:
            self.figures["not_applicable"] = self._not_applicable
            return False
        if self._sums is None or self._counts is None:
            self.figures["note"] = "no training step was captured late in training"
            return False
        sums = self._sums.double().cpu()  # the one host transfer of the verdict
        counts = self._counts.double().cpu()
        stats = pair_statistics(sums, counts, self.min_samples, self.min_pair_share)
        self.figures.update(
            {
                "captured_steps": self._steps_seen,
                "samples": int(counts.sum()),
                "classes": int(counts.numel()),
            }
        )
        if stats is None:
            self.figures["note"] = f"fewer than {self.min_samples} samples of 2 classes seen late in training"
            return False
        self.figures.update(stats)
        self._verdict = stats
        confused = (
            stats["pair_confusion"] >= self.min_pair_confusion and stats["pair_excess"] >= self.min_pair_share
        )
        if confused and self._steps_seen < MIN_CAPTURES:
            # a snapshot of a short run: a pair still being learned looks the same (a healthy CNN
            # 10 steps into an 18-step run: 0.34); the finding needs a pair that stays split
            i, j = stats["pair"]
            self.figures["note"] = (
                f"classes {i} and {j} confused ({stats['pair_confusion']:.0%} of the pair's probability on "
                f"the other) on only {self._steps_seen} step(s) captured late in training, fewer than "
                f"{MIN_CAPTURES}: too early to tell label noise from a pair still being learned"
            )
            return False
        return confused

    def _report(self, trainer: Any) -> None:
        s = self._verdict
        i, j = s["pair"]
        examples, images = self._examples(i, j)
        shown = "; ".join(_describe(e) for e in examples[:6])
        self.report(
            trainer,
            "label-noise",
            Severity.WARNING,
            f"Late in training the net cannot tell classes {i} and {j} apart on the training data: "
            f"{s['pair_confusion']:.0%} of the probability it gives that pair goes to the other class "
            f"(flagged from {self.min_pair_confusion:.0%}; 50% = labels a coin flip for what it sees) and "
            f"{s['pair_share']:.0%} of those classes' errors are each other's, while the other classes "
            f"are learned; labels that contradict the input: an augmentation that changes their meaning "
            f"(a horizontal flip of left/right classes, a rotation of 6/9) or mislabelled data. Examples "
            f"labelled one and seen as the other: {shown or 'none kept'}"
            + (f" (images: {TAG})" if images is not None else "")
            + "; swap the labels in the augmentation or drop it for those classes.",
            {**s, "examples": examples, "min_pair_confusion": self.min_pair_confusion},
        )
        if images is not None:
            tensorboard.add_image(trainer, TAG, tensorboard.upscale(tensorboard.make_grid(images), 256))

    def _examples(self, i: int, j: int) -> tuple[list[dict[str, Any]], Tensor | None]:
        """The kept examples of the pair, most confident first, and their images."""
        rows: list[tuple[float, dict[str, Any], Tensor | None]] = []
        for rec in self._pool:
            label, other = rec["label"].tolist(), rec["other"].tolist()
            p_other, p_label = rec["p_other"].tolist(), rec["p_label"].tolist()
            pos = rec["position"].tolist()
            index = rec["index"].tolist() if "index" in rec else None
            for r in range(len(label)):
                if {label[r], other[r]} != {i, j} or p_other[r] <= p_label[r]:
                    continue
                e = {"step": rec["step"], "batch_idx": rec["batch_idx"], "position": pos[r]}
                if index is not None:
                    e["index"] = int(index[r])
                e.update({"label": label[r], "seen_as": other[r], "p_seen_as": round(p_other[r], 3)})
                img = rec["image"][r] if "image" in rec else None
                rows.append((p_other[r], e, img))
        rows.sort(key=lambda t: -t[0])
        rows = rows[:16]
        imgs = [img for _, _, img in rows if img is not None]
        images = None
        if imgs and len(imgs) == len(rows):
            shape = imgs[0].shape
            if all(t.shape == shape for t in imgs):
                images = torch.stack([t.cpu() for t in imgs])
        return [e for _, e, _ in rows], images

    def _skip(self, trainer: Any, reason: str) -> None:
        self.figures["skipped"] = reason
        if not self.has_reported("check-skipped"):
            self.report(
                trainer,
                "check-skipped",
                Severity.INFO,
                f"LabelNoiseMonitor did not look for label noise: {reason.rstrip('.')}.",
                {"reason": reason},
            )

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        pool = [
            {k: (v.tolist() if isinstance(v, Tensor) else v) for k, v in rec.items() if k != "image"}
            for rec in self._pool
        ]
        return {
            **super().state_dict(),
            "sums": None if self._sums is None else self._sums.tolist(),
            "counts": None if self._counts is None else self._counts.tolist(),
            "steps_seen": self._steps_seen,
            "first_captured": self._first_captured,
            "last_step": self._last_step,
            "unreadable": self._unreadable,
            "not_applicable": self._not_applicable,
            "pool": pool,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._reset()
        if state_dict.get("sums") is not None and state_dict.get("counts") is not None:
            self._sums = torch.tensor(state_dict["sums"], dtype=torch.float32)
            self._counts = torch.tensor(state_dict["counts"], dtype=torch.float32)
        self._steps_seen = int(state_dict.get("steps_seen", 0))
        first = state_dict.get("first_captured")
        self._first_captured = None if first is None else int(first)
        self._last_step = int(state_dict.get("last_step", -1))
        self._unreadable = state_dict.get("unreadable")
        self._not_applicable = state_dict.get("not_applicable")
        for rec in state_dict.get("pool", []):
            self._pool.append({k: (torch.tensor(v) if isinstance(v, list) else v) for k, v in rec.items()})


def pair_statistics(
    sums: Tensor, counts: Tensor, min_samples: int, min_share: float = 0.25
) -> dict[str, Any] | None:
    """The most confused pair of classes: ``pair``, ``pair_confusion``, ``pair_share``, per-class
    ``counts`` (the pair with the highest confusion among those whose errors are mostly each
    other's wins; ``None`` with fewer than two classes of ``min_samples`` samples)."""
    c = counts.numel()
    valid = [k for k in range(c) if float(counts[k]) >= min_samples]
    if len(valid) < 2:
        return None
    m = sums / counts.clamp_min(1).unsqueeze(1)
    best: dict[str, Any] | None = None
    for a_pos, a in enumerate(valid):
        for b in valid[a_pos + 1 :]:
            wrong = float(m[a, b] + m[b, a])
            within = float(m[a, a] + m[a, b] + m[b, a] + m[b, b])
            lost = float(2.0 - m[a, a] - m[b, b])
            conf = wrong / within if within > 0 else 0.0
            share = wrong / lost if lost > 1e-9 else 0.0
            # 0 when the errors spread evenly over the other classes, 1 when all are the pair's
            uniform = 1.0 / (c - 1)
            excess = (share - uniform) / (1.0 - uniform) if c > 2 else 0.0
            key = (excess >= min_share, conf)
            if best is None or key > best["_key"]:
                best = {
                    "_key": key,
                    "pair": [a, b],
                    "pair_confusion": conf,
                    "pair_share": share,
                    "pair_excess": excess,
                    "pair_counts": [int(counts[a]), int(counts[b])],
                    "pair_accuracy": [float(m[a, a]), float(m[b, b])],
                }
    assert best is not None
    best.pop("_key")
    diag = torch.diagonal(m)[valid]
    best["mean_true_class_prob"] = float(diag.mean())
    others = [float(m[k, k]) for k in valid if k not in best["pair"]]
    # how well the classes outside the pair are learned (the flip bug: everything but the pair)
    best["others_true_class_prob"] = sum(others) / len(others) if others else None
    return best if math.isfinite(best["pair_confusion"]) else None


def _describe(e: dict[str, Any]) -> str:
    where = (
        f"index {e['index']}" if "index" in e else f"step {e['step']} batch {e['batch_idx']} #{e['position']}"
    )
    return f"{where} label {e['label']} seen as {e['seen_as']} (p={e['p_seen_as']:.2f})"


def _structural_scores(result: StepResult, forward_output: Tensor | None, batch: Any) -> ClassScores | None:
    """Class scores read by shape where no known classification loss was called: a module loss
    call's prediction, else the model's forward output next to the batch's own target."""
    for call in result.module_calls:
        view = scores_by_shape(call.input, call.target)
        if view is not None:
            return view
    if forward_output is None:
        return None
    try:
        target = BatchAdapter().target(batch)
    except Exception:
        return None
    return scores_by_shape(forward_output, target)
