"""RecipeEarlyStopping: Lightning's EarlyStopping that also restores the best weights and says why."""

from __future__ import annotations

import math
import os
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks.early_stopping import EarlyStopping, EarlyStoppingReason
from torch import Tensor

from lightning_recipe import _context, _sharded
from lightning_recipe._probe import find_loss
from lightning_recipe.callback import RecipeCallback, validate_on_error
from lightning_recipe.findings import Severity

STORAGE_CHOICES = ("cpu", "device", "disk")
#: strategies whose ``state_dict`` on one rank is a shard: the best weights cannot be kept per rank
_SHARDED = ("fsdp", "deepspeed", "modelparallel")


class RecipeEarlyStopping(EarlyStopping, RecipeCallback):
    """Lightning's ``EarlyStopping``, plus the recipe's habits: keep and restore the best weights,
    stop at once on NaN or a blown-up loss, and say in one sentence why training stopped.

    Karpathy's early stopping catches the model "just as it's about to overfit", which only helps
    if the weights you keep are the ones from that point. A drop-in subclass: it accepts every
    ``EarlyStopping`` argument with the same meaning and default, and keeps Lightning's public
    attributes, stop decision (reduced across DDP ranks), ``state_key`` and ``state_dict`` keys.
    The full ``state_dict`` is copied on each improvement and loaded back on every rank at the end
    of fit in every case (patience, divergence, NaN, ``max_epochs``, another callback's stop),
    after every ``on_train_end`` hook. Without validation it reports ``check-skipped`` and leaves
    training alone (a metric still missing after a validation run raises, as in Lightning).
    Under DDP log the monitored value with ``sync_dist=True`` so the decision covers all data.
    Under a sharding strategy each rank keeps and restores its own shards (README, "Sharded
    training"); ``best_weights_storage`` puts the copy in CPU RAM, device memory or a file.

    Reports ``non-finite-loss`` (error) on a NaN/Inf monitored value or training loss and
    ``loss-diverged`` (error) when the monitored loss exceeds ``divergence_factor`` times the larger
    of its value before training and its best (both stop at once), and ``early-stopped`` (info) at
    fit end: why training stopped and which epoch's weights were restored.

    Thresholds: see docs/thresholds.md#early-stopping.

    Args:
        monitor, min_delta, patience, verbose, mode, strict, check_finite, stopping_threshold,
        divergence_threshold, check_on_train_epoch_end, log_rank_zero_only: exactly as in
            Lightning's ``EarlyStopping`` (same meanings and defaults).
        restore_best_weights: keep the best weights and load them back at the end of fit
            (``False`` keeps e.g. ``WeightAveraging``'s final weights).
        best_weights_storage: where the one copy of the best weights lives: ``"cpu"`` RAM
            (default), ``"device"`` memory (fastest) or ``"disk"`` (one ``torch.save`` per
            improvement). With ``"cpu"``/``"device"`` checkpoints carry the copy (+1 model).
            Each DDP rank keeps its own copy; sharded strategies (FSDP, DeepSpeed) skip restoring.
        best_weights_dir: folder for ``"disk"`` storage (default
            ``<default_root_dir>/recipe_best_weights``).
        divergence_factor: ``"auto"`` (5.0 for ``mode="min"``, ``None`` for ``"max"``), a number
            > 1, or ``None`` to turn the divergence stop off; for losses (>= 0, lower is better).
        check_train_loss: also stop on a non-finite training loss (read on logging steps).
        on_error: ``"warn"`` or ``"raise"`` (raise ``RecipeError`` on the error findings).

    Example::

        stopper = RecipeEarlyStopping(monitor="val_loss", patience=5)
        trainer = L.Trainer(callbacks=[stopper], max_epochs=100)
        trainer.fit(model, datamodule)
        print(stopper.best_epoch, stopper.findings[-1].message)  # the model now holds those weights
    """

    codes = ("early-stopped", "loss-diverged", "non-finite-loss")

    needs_full_copy = False  # never runs the model on a copy

    def __init__(
        self,
        monitor: str,
        min_delta: float = 0.0,
        patience: int = 3,
        verbose: bool = False,
        mode: str = "min",
        strict: bool = True,
        check_finite: bool = True,
        stopping_threshold: float | None = None,
        divergence_threshold: float | None = None,
        check_on_train_epoch_end: bool | None = None,
        log_rank_zero_only: bool = False,
        *,
        restore_best_weights: bool = True,
        best_weights_storage: str = "cpu",
        best_weights_dir: str | os.PathLike | None = None,
        divergence_factor: float | str | None = "auto",
        check_train_loss: bool = True,
        on_error: str = "warn",
    ) -> None:
        if not isinstance(monitor, str) or not monitor:
            raise TypeError(f"`monitor` must be the name of a logged metric (a str), got {monitor!r}")
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 0:
            raise ValueError(f"`patience` must be a non-negative int, got {patience!r}")
        if isinstance(min_delta, bool) or not isinstance(min_delta, (int, float)):
            raise TypeError(f"`min_delta` must be a number, got {min_delta!r}")
        # a bad `mode` is rejected by EarlyStopping itself (MisconfigurationException naming `mode`)
        super().__init__(
            monitor=monitor,
            min_delta=min_delta,
            patience=patience,
            verbose=verbose,
            mode=mode,
            strict=strict,
            check_finite=check_finite,
            stopping_threshold=stopping_threshold,
            divergence_threshold=divergence_threshold,
            check_on_train_epoch_end=check_on_train_epoch_end,
            log_rank_zero_only=log_rank_zero_only,
        )
        self.on_error = validate_on_error(on_error)
        for name, value in (
            ("restore_best_weights", restore_best_weights),
            ("check_train_loss", check_train_loss),
        ):
            if not isinstance(value, bool):
                raise TypeError(f"`{name}` must be True or False, got {value!r}")
        if best_weights_storage not in STORAGE_CHOICES:
            raise ValueError(
                f"`best_weights_storage` must be one of {STORAGE_CHOICES}, got {best_weights_storage!r}"
            )
        if best_weights_dir is not None and not isinstance(best_weights_dir, (str, os.PathLike)):
            raise TypeError(
                f"`best_weights_dir` must be a path or None, got {type(best_weights_dir).__name__}"
            )
        self.restore_best_weights = restore_best_weights
        self.best_weights_storage = best_weights_storage
        self.best_weights_dir = None if best_weights_dir is None else os.fspath(best_weights_dir)
        self.divergence_factor = _divergence_factor(divergence_factor, mode)
        self.check_train_loss = check_train_loss
        #: epoch / global step / value of the best check (None before the first finite value)
        self.best_epoch: int | None = None
        self.best_step: int | None = None
        self._first_value: float | None = None
        self._init_value: float | None = None
        self._last_value: float | None = None
        self._last_epoch: int | None = None
        self._best_weights: dict[str, Tensor] | None = None
        self._best_path: str | None = None
        self._sharded_weights = False  # the kept weights are this rank's shards
        self._sharded_resumed = False  # resumed from a sharded run: its kept shards were not saved
        self._weights_epoch: int | None = None
        self._weights_step: int | None = None
        #: why we stopped: "patience", "diverged", "non-finite", "non-finite-train-loss", "threshold",
        #: "divergence-threshold", "other-rank" (None while running)
        self.stop_cause: str | None = None
        self._stop_detail: dict[str, Any] = {}
        self._pending: tuple[str, str, dict[str, Any]] | None = None
        self._checked = False
        self._check_epoch = -1
        self._last_loss_check_step = -1
        self.restored_epoch: int | None = None
        #: validation runs that ended in this fit (sanity check excluded), and the trainer of the
        #: check in progress (read by :meth:`_validate_condition_metric`)
        self._val_runs = 0
        self._trainer: Any = None

    # ------------------------------------------------------------------ drop-in identity
    @property
    def state_key(self) -> str:
        # Lightning's own key, so a checkpoint of EarlyStopping resumes RecipeEarlyStopping and back
        return f"EarlyStopping{dict(monitor=self.monitor, mode=self.mode)!r}"

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        EarlyStopping.setup(self, trainer, pl_module, stage)
        RecipeCallback.setup(self, trainer, pl_module, stage)
        if stage == "fit":  # a new fit starts without a verdict (a resumed one loads its own next)
            self.stop_cause, self._stop_detail, self.restored_epoch = None, {}, None
            self._val_runs = 0

    def state_dict(self) -> dict[str, Any]:
        state = EarlyStopping.state_dict(self)
        state.update(RecipeCallback.state_dict(self))
        weights = None
        # shards of a sharded model differ per rank, and the checkpoint holds rank zero's
        # callback state only: they are not saved (a resumed run says so if it needs them)
        keep = self.best_weights_storage != "disk" and not self._sharded_weights
        if keep and self._best_weights is not None:
            weights = {k: v.detach().to("cpu", copy=True) for k, v in self._best_weights.items()}
        state.update(
            {
                "best_epoch": self.best_epoch,
                "best_step": self.best_step,
                "first_value": self._first_value,
                "init_value": self._init_value,
                "last_value": self._last_value,
                "last_epoch": self._last_epoch,
                "weights_epoch": self._weights_epoch,
                "weights_step": self._weights_step,
                "best_weights": weights,
                "best_weights_path": None if self._sharded_weights else self._best_path,
                "sharded_weights": self._sharded_weights,
                "stop_cause": self.stop_cause,
                "stop_detail": dict(self._stop_detail),
                "last_loss_check_step": self._last_loss_check_step,
            }
        )
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        EarlyStopping.load_state_dict(self, state_dict)
        RecipeCallback.load_state_dict(self, state_dict)
        # a checkpoint saved after fit (trainer.save_checkpoint) holds that fit's verdict; the
        # resumed fit says why it stopped at its own end
        self._findings = [f for f in self._findings if f.code != "early-stopped"]
        self.best_epoch = state_dict.get("best_epoch")
        self.best_step = state_dict.get("best_step")
        self._first_value = state_dict.get("first_value")
        self._init_value = state_dict.get("init_value")
        self._last_value = state_dict.get("last_value")
        self._last_epoch = state_dict.get("last_epoch")
        self._weights_epoch = state_dict.get("weights_epoch")
        self._weights_step = state_dict.get("weights_step")
        self._best_weights = state_dict.get("best_weights")
        self._best_path = state_dict.get("best_weights_path")
        self._sharded_weights = False
        self._sharded_resumed = bool(state_dict.get("sharded_weights", False))
        self.stop_cause = state_dict.get("stop_cause")
        self._stop_detail = dict(state_dict.get("stop_detail") or {})
        self._last_loss_check_step = int(state_dict.get("last_loss_check_step", -1))

    # ------------------------------------------------------------------ the check
    def _run_early_stopping_check(self, trainer: Any) -> None:
        self._checked = False
        self._pending = None
        self._check_epoch = int(trainer.current_epoch)
        previous_best = self.best_score
        was_stopping = bool(trainer.should_stop)
        self._trainer = trainer
        try:
            super()._run_early_stopping_check(trainer)
        finally:
            self._trainer = None
        if not self._checked:  # metric missing or fast_dev_run: Lightning returned before its collective
            return
        improved = self.best_score is not previous_best
        # every rank stores the same epoch's weights: take rank zero's word for the improvement
        improved = bool(trainer.strategy.broadcast(improved, 0))
        epoch, step = int(trainer.current_epoch), int(trainer.global_step)
        value = self._last_value
        if improved:
            self.best_epoch, self.best_step = epoch, step
            if self.restore_best_weights:
                self.run_safely(trainer, "store the best weights", self._store_best, trainer, epoch, step)
        self._last_epoch = epoch
        if self._pending is not None:
            code, message, evidence = self._pending
            self._pending = None
            if not (code == "non-finite-loss" and self.stop_cause == "non-finite-train-loss"):  # said once
                self.report(trainer, code, Severity.ERROR, message, evidence)
        if trainer.should_stop and not was_stopping and self.stop_cause is None:
            self.stop_cause = "other-rank"
            self._stop_detail = {"epoch": epoch, "value": value}

    def _evaluate_stopping_criteria(self, current: Tensor) -> tuple[bool, str | None]:
        self._checked = True
        value = float(current)
        best_before = float(self.best_score)
        should_stop, reason = super()._evaluate_stopping_criteria(current)
        finite = math.isfinite(value)
        self._last_value = value
        if finite and self._first_value is None:
            self._first_value = value
        if not finite:
            best = f" (best {float(self.best_score):.4g})" if torch.isfinite(self.best_score) else ""
            action = (
                "training was stopped" if self.check_finite else "check_finite=False, so training goes on"
            )
            self._pending = (
                "non-finite-loss",
                f"The monitored {self.monitor} is {value} at epoch {self._epoch_now()}{best}; {action}. "
                "Lower the learning rate; look for log(0), division by zero, or overflow in fp16.",
                {"monitor": self.monitor, "value": value, "best": float(self.best_score)},
            )
        elif not should_stop:
            diverged = self._diverged(value, best_before)
            if diverged is not None:
                ref, ratio = diverged
                should_stop = True
                self.stopping_reason = EarlyStoppingReason.DIVERGENCE_THRESHOLD
                reason = (
                    f"Monitored metric {self.monitor} = {value:.4g} is {ratio:.3g}x its reference {ref:.4g} "
                    f"(> divergence_factor={self.divergence_factor:g}). Signaling Trainer to stop."
                )
                self._set_cause("diverged", value=value, reference=ref, ratio=ratio)
                self._pending = (
                    "loss-diverged",
                    f"The monitored {self.monitor} jumped to {value:.4g} at epoch {self._epoch_now()}, "
                    f"{ratio:.3g}x its reference {ref:.4g} ({self._reference_words(best_before)}; limit "
                    f"{self.divergence_factor:g}x): training diverged and was stopped; lower the learning "
                    "rate, add warm-up or gradient clipping.",
                    {
                        "monitor": self.monitor,
                        "value": value,
                        "reference": ref,
                        "ratio": ratio,
                        "best": best_before,
                        "init": self._init_value,
                        "first": self._first_value,
                        "divergence_factor": self.divergence_factor,
                    },
                )
                return should_stop, reason
        if should_stop:
            cause = {
                EarlyStoppingReason.PATIENCE_EXHAUSTED: "patience",
                EarlyStoppingReason.STOPPING_THRESHOLD: "threshold",
                EarlyStoppingReason.DIVERGENCE_THRESHOLD: "divergence-threshold",
                EarlyStoppingReason.NON_FINITE_METRIC: "non-finite",
            }.get(self.stopping_reason, "other")
            self._set_cause(cause, value=value)
        return should_stop, reason

    def _diverged(self, value: float, best: float) -> tuple[float, float] | None:
        """(reference, ratio) if ``value`` is more than ``divergence_factor`` x the reference: the
        larger of the value before training (else the first checked value) and the best before it."""
        if self.divergence_factor is None or self.mode != "min":
            return None
        base = self._init_value if self._init_value is not None else self._first_value
        if base is None:
            return None
        ref = max(base, best) if math.isfinite(best) else base
        if ref <= 0 or value <= self.divergence_factor * ref:
            return None
        return ref, value / ref

    def _validate_condition_metric(self, logs: dict[str, Tensor]) -> bool:
        """Lightning's check that the monitored metric exists (``strict`` raises when it does not),
        except while no validation has run in this fit: a run without validation data (no val
        dataloader, ``limit_val_batches=0``) cannot produce a validation metric, so the check is
        skipped with one info finding instead of a crash. A metric still missing after a
        validation run (a typo) raises as in Lightning."""
        trainer = self._trainer
        if self.monitor in logs or trainer is None or self._val_runs > 0:
            return super()._validate_condition_metric(logs)
        if not self.has_reported("check-skipped"):
            reason = (
                "limit_val_batches=0"
                if getattr(trainer, "limit_val_batches", None) == 0
                else "no validation has run in this fit (no val dataloader?)"
            )
            self.report(
                trainer,
                "check-skipped",
                Severity.INFO,
                f"RecipeEarlyStopping has no {self.monitor} to check: {reason}; early stopping and "
                f"best-weight restore are off until a validation run logs it (pass validation data, or "
                f"monitor a training metric).",
                {"reason": reason, "monitor": self.monitor, "logged": sorted(logs)[:20]},
            )
        return False

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if trainer.sanity_checking and self._init_value is None:
            self._record_init(trainer)
        if not trainer.sanity_checking:
            self._val_runs += 1
        super().on_validation_end(trainer, pl_module)

    def _record_init(self, trainer: Any) -> None:
        """The monitored value of the sanity check (the untrained model): the divergence reference."""
        value = (getattr(trainer, "callback_metrics", None) or {}).get(self.monitor)
        if isinstance(value, Tensor) and value.numel() == 1:
            v = float(value)
            if math.isfinite(v):
                self._init_value = v

    def _reference_words(self, best: float) -> str:
        if self._init_value is not None:
            words = f"its value before training, {self._init_value:.4g}"
        else:
            words = f"its first value, {self._first_value:.4g}"
        return f"the larger of {words} and its best, {best:.4g}" if math.isfinite(best) else words

    def _set_cause(self, cause: str, **detail: Any) -> None:
        if self.stop_cause is None:  # the first cause wins
            self.stop_cause = cause
            self._stop_detail = {"epoch": self._epoch_now(), **detail}

    def _epoch_now(self) -> int:
        return self._check_epoch

    # ------------------------------------------------------------------ training loss
    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """On logging steps: is the training loss finite? (Every rank takes part in the vote.)"""
        if not self.check_train_loss or trainer.fast_dev_run or self._should_skip_check(trainer):
            return
        step = int(trainer.global_step)
        interval = int(getattr(trainer, "log_every_n_steps", 50) or 50)
        if step == self._last_loss_check_step or step % interval != 0:
            return
        self._last_loss_check_step = step
        value = self.run_safely(trainer, "read the training loss", _non_finite_loss, outputs)
        stop = trainer.strategy.reduce_boolean_decision(value is not None, all=False)
        if not stop:
            return
        trainer.should_stop = True
        if self.stop_cause is not None:
            return
        epoch = int(trainer.current_epoch)
        self.stopped_epoch = epoch
        self.stopping_reason = EarlyStoppingReason.NON_FINITE_METRIC
        self.stop_cause = "non-finite-train-loss"
        self._stop_detail = {"epoch": epoch, "step": step, "value": value}
        seen = "is" if value is not None else "is non-finite on another DDP rank"
        shown = f"{seen} {value}" if value is not None else seen
        self.stopping_reason_message = f"Training loss {shown} at step {step}. Signaling Trainer to stop."
        # reported on every rank (the vote agreed), so on_error="raise" raises everywhere alike
        self.report(
            trainer,
            "non-finite-loss",
            Severity.ERROR,
            f"The training loss {shown} at step {step} (epoch {epoch}); training was stopped. Lower the "
            "learning rate; look for NaN in the data, log(0), division by zero, or overflow in fp16.",
            {"value": value, "step": step, "epoch": epoch},
        )

    # ------------------------------------------------------------------ best weights
    def _store_best(self, trainer: Any, epoch: int, step: int) -> None:
        module = trainer.lightning_module
        self._sharded_weights = _is_sharded(trainer) and _sharded.kind(module, trainer) is not None
        # sharded: each rank keeps its own shard of every tensor (1/world of the model), no collective
        state = _sharded.local_state(module) if self._sharded_weights else module.state_dict()
        if self.best_weights_storage == "disk":
            path = self._disk_path(trainer)
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            cpu = {k: v.detach().to("cpu") for k, v in state.items()}
            torch.save(
                {"epoch": epoch, "global_step": step, "monitor": self.monitor, "state_dict": cpu}, path
            )
            self._best_path = path
        else:
            device = None if self.best_weights_storage == "cpu" else "same"
            self._best_weights = _copy_into(self._best_weights, state, device)
        self._weights_epoch, self._weights_step = epoch, step

    def _disk_path(self, trainer: Any) -> str:
        if self._best_path is not None:
            return self._best_path
        folder = self.best_weights_dir or os.path.join(
            os.fspath(getattr(trainer, "default_root_dir", None) or os.getcwd()), "recipe_best_weights"
        )
        rank = int(getattr(trainer, "global_rank", 0) or 0)
        suffix = f".rank{rank}" if _context.world_size(trainer) > 1 else ""
        name = f"best-{_safe(self.monitor)}-{uuid.uuid4().hex[:8]}{suffix}.pt"
        return os.path.join(folder, name)

    def _load_best(self) -> tuple[dict[str, Tensor] | None, str | None]:
        """The stored best weights, or (None, why not)."""
        if self._weights_epoch is None:
            return None, "no best weights were recorded during this run"
        if self._best_weights is not None:
            return self._best_weights, None
        if not self._best_path:
            if self._sharded_resumed:
                return None, (
                    "the best weights were kept as each rank's shards before the resume and are not "
                    "in the checkpoint (sharded strategy); they were lost with the previous run"
                )
            return None, "the best weights were not kept"
        if not os.path.exists(self._best_path):
            return None, f"the best-weights file {self._best_path!r} is missing"
        blob = torch.load(self._best_path, map_location="cpu", weights_only=True)
        if blob.get("epoch") != self._weights_epoch or blob.get("global_step") != self._weights_step:
            return None, (
                f"the best-weights file {self._best_path!r} holds epoch {blob.get('epoch')} step "
                f"{blob.get('global_step')}, not epoch {self._weights_epoch} step {self._weights_step}"
            )
        return blob["state_dict"], None

    # ------------------------------------------------------------------ end of fit
    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self.run_safely(trainer, "restore the best weights", self._finish, trainer, pl_module)
        RecipeCallback.on_fit_end(self, trainer, pl_module)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        # Ctrl+C is how many runs end: Lightning shuts down gracefully, and the model you keep in
        # the notebook should be the best one then too (no collective involved)
        if isinstance(exception, KeyboardInterrupt):
            self.run_safely(trainer, "restore the best weights", self._finish, trainer, pl_module)
        RecipeCallback.on_exception(self, trainer, pl_module, exception)

    def _finish(self, trainer: Any, pl_module: Any) -> None:
        restored, why_not = False, None
        if self.restore_best_weights:
            weights, why_not = self._load_best()
            if weights is not None and self._sharded_weights:
                _sharded.restore_local_state(pl_module, weights)
                restored = True
                self.restored_epoch = self._weights_epoch
            elif weights is not None:
                pl_module.load_state_dict(weights)
                restored = True
                self.restored_epoch = self._weights_epoch
        self._report_stop(trainer, restored, why_not)

    def _report_stop(self, trainer: Any, restored: bool, why_not: str | None) -> None:
        why, evidence = self._why_stopped(trainer)
        best = float(self.best_score) if torch.isfinite(self.best_score) else None
        if restored:
            step = int(trainer.global_step)
            if self._weights_step == step:
                final = "they are also the final weights"
            else:
                final = f"the final weights, {step - self._weights_step} steps later"
                if self._last_value is not None and self._last_epoch != self._weights_epoch:
                    final += f", had {self.monitor}={self._last_value:.4g} at epoch {self._last_epoch}"
            weights = (
                f"restored the best weights, from epoch {self._weights_epoch} (step {self._weights_step}, "
                f"{self.monitor}={best:.4g}; {final})."
            )
        elif not self.restore_best_weights:
            weights = "kept the final weights (restore_best_weights=False)."
        else:
            weights = f"kept the final weights: {why_not}."
        evidence.update(
            {
                "monitor": self.monitor,
                "best_score": best,
                "best_epoch": self.best_epoch,
                "best_step": self.best_step,
                "last_value": self._last_value,
                "last_epoch": self._last_epoch,
                "restored": restored,
                "restored_epoch": self._weights_epoch if restored else None,
                "restored_step": self._weights_step if restored else None,
                "stopped_epoch": self.stopped_epoch,
                "wait_count": self.wait_count,
                "patience": self.patience,
            }
        )
        self.figures.update(
            {
                "stop_cause": evidence["cause"],
                "best_score": best,
                "best_epoch": self.best_epoch,
                "restored_epoch": evidence["restored_epoch"],
                "last_value": self._last_value,
                "stopped_epoch": self.stopped_epoch,
            }
        )
        self.report(trainer, "early-stopped", Severity.INFO, f"{why}; {weights}", evidence)

    def _why_stopped(self, trainer: Any) -> tuple[str, dict[str, Any]]:
        d = self._stop_detail
        cause = self.stop_cause
        best = float(self.best_score) if torch.isfinite(self.best_score) else float("nan")
        epoch = d.get("epoch", self.stopped_epoch)
        if cause == "patience":
            return (
                f"Training stopped at epoch {epoch}: {self.monitor} did not improve by more than "
                f"min_delta={abs(self.min_delta):g} for {self.wait_count} checks (patience={self.patience}; "
                f"best {best:.4g} at epoch {self.best_epoch}, last {d.get('value', float('nan')):.4g})",
                {"cause": "patience"},
            )
        if cause == "diverged":
            return (
                f"Training stopped at epoch {epoch}: {self.monitor}={d['value']:.4g} diverged "
                f"({d['ratio']:.3g}x its reference {d['reference']:.4g})",
                {"cause": "diverged"},
            )
        value = d.get("value", float("nan"))
        shown = f"{value:.4g}" if isinstance(value, float) else str(value)
        stopped = f"Training stopped at epoch {epoch}"
        if cause == "non-finite":
            return f"{stopped}: {self.monitor} was {value}", {"cause": "non-finite"}
        if cause == "non-finite-train-loss":
            return f"{stopped}, step {d.get('step')}: the training loss was {value}", {"cause": cause}
        if cause == "threshold":
            return (
                f"{stopped}: {self.monitor}={shown} reached stopping_threshold={self.stopping_threshold}",
                {"cause": cause},
            )
        if cause == "divergence-threshold":
            return (
                f"{stopped}: {self.monitor}={shown} crossed divergence_threshold={self.divergence_threshold}",
                {"cause": cause},
            )
        if cause == "other-rank":
            return (
                f"Training stopped at epoch {epoch} because another DDP rank's check asked to stop (log "
                f"{self.monitor} with sync_dist=True so every rank sees the same value)",
                {"cause": "other-rank"},
            )
        checked = self._last_value is not None
        return _ran_out(trainer, self.monitor, self.wait_count, self.patience, checked)


# ---------------------------------------------------------------------------- helpers
def _divergence_factor(value: float | str | None, mode: str) -> float | None:
    if value == "auto":
        return 5.0 if mode == "min" else None
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 1:
        raise ValueError(f"`divergence_factor` must be 'auto', None or a number > 1, got {value!r}")
    if mode != "min":
        raise ValueError(
            "`divergence_factor` only applies to mode='min' (a loss that blows up); with mode='max' "
            f"pass divergence_factor=None or 'auto', got {value!r}"
        )
    return float(value)


def _non_finite_loss(outputs: Any) -> float | None:
    """The training loss (``_probe.find_loss``) as a float if it is NaN/Inf, else None (one host
    sync)."""
    loss = find_loss(outputs)
    if loss is None or loss.numel() == 0:
        return None
    finite = bool(torch.isfinite(loss.detach()).all())
    if finite:
        return None
    bad = loss.detach().float().reshape(-1)
    bad = bad[~torch.isfinite(bad)]
    return float(bad[0])


def _copy_into(
    store: dict[str, Tensor] | None, state: Mapping[str, Tensor], device: str | None
) -> dict[str, Tensor]:
    """Copy ``state`` into ``store`` in place when the layout matches, else allocate once."""

    def target(t: Tensor) -> torch.device:
        return torch.device("cpu") if device is None else t.device

    same = (
        store is not None
        and store.keys() == state.keys()
        and all(
            store[k].shape == v.shape and store[k].dtype == v.dtype and store[k].device == target(v)
            for k, v in state.items()
        )
    )
    if not same:
        return {k: v.detach().to(target(v), copy=True) for k, v in state.items()}
    with torch.no_grad():
        for k, v in state.items():
            store[k].copy_(v.detach())
    return store


def _is_sharded(trainer: Any) -> bool:
    name = type(getattr(trainer, "strategy", None)).__name__.lower()
    return any(s in name for s in _SHARDED)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:60]


def _ran_out(
    trainer: Any, monitor: str, wait: int, patience: int, checked: bool = True
) -> tuple[str, dict[str, Any]]:
    max_steps = int(getattr(trainer, "max_steps", -1) or -1)
    max_epochs = getattr(trainer, "max_epochs", None)
    step, epoch = int(trainer.global_step), int(trainer.current_epoch)
    if not checked:
        tail = f" ({monitor} was never checked: it was never logged)"
    elif wait:
        tail = f" ({monitor} had not improved for {wait} of patience={patience} checks)"
    else:
        tail = f" ({monitor} improved at the last check)"
    if getattr(trainer, "interrupted", False):
        return f"Training was interrupted at epoch {epoch}, step {step}{tail}", {"cause": "interrupted"}
    if max_steps > 0 and step >= max_steps:
        return f"Training ran to max_steps={max_steps} without stopping early{tail}", {"cause": "max_steps"}
    if max_epochs is not None and max_epochs > 0 and epoch >= max_epochs:
        return f"Training ran to max_epochs={max_epochs} without stopping early{tail}", {
            "cause": "max_epochs"
        }
    if getattr(trainer, "should_stop", False):
        return (
            f"Training was stopped at epoch {epoch} by another callback or a time limit{tail}",
            {"cause": "stopped-elsewhere"},
        )
    return f"Training ended at epoch {epoch}, step {step}{tail}", {"cause": "ended"}
