"""CheckpointEnsemble: the recipe's cheap ensembles from one run, measured on the validation data.

The callback itself: Lightning's hooks, what runs when, and the state that survives a resume. The
work is in the sibling modules: ``averaging`` (the EMA of the weights), ``snapshots`` (the kept
checkpoints), ``predictions`` (averaging predictions, per-batch sums), ``evaluation`` (the
reduction over the ranks and the verdict), ``batchnorm`` and ``export`` (what you get back).
"""

from __future__ import annotations

import os
import uuid
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel

from lightning_recipe import _context, _sharded, tensorboard
from lightning_recipe._probe import (
    LossCall,
    ProbeSkip,
    StepFn,
    capture_step,
    copy_module,
    is_manual_optimization,
    preserved_rng,
)
from lightning_recipe._validate import check_int
from lightning_recipe.batch import BatchAdapter, BatchLayoutError, Getter, detach_clone
from lightning_recipe.callback import RecipeCallback
from lightning_recipe.control.ensemble import averaging, batchnorm, export, sharding
from lightning_recipe.control.ensemble import snapshots as store
from lightning_recipe.control.ensemble.evaluation import (
    NO_EVALUATION,
    VERDICT_CODE,
    Evaluation,
    choose,
    end_of_fit,
    evaluation_record,
    reduce_over_ranks,
    split_metrics,
    subsets_for,
    val_batch_limit,
    val_loader,
    verdict_message,
    winner,
)
from lightning_recipe.control.ensemble.predictions import batch_rows
from lightning_recipe.control.ensemble.sharding import ShardedMode
from lightning_recipe.control.ensemble.snapshots import Snapshot
from lightning_recipe.findings import Severity

SELECTIONS = ("last", "top")
RANK_BY = ("loss", "accuracy")
STORAGES = ("cpu", "disk")
EVALUATE = ("validation", "fit_end")


class CheckpointEnsemble(ShardedMode, RecipeCallback):
    """Two cheap ensembles from a single run, evaluated against the model you are training.

    cs231n (Model Ensembles): "different checkpoints of a single model" and a "running average of
    parameters during training" give ensemble gains without training several models; this callback
    measures both instead of assuming them: ``num_snapshots`` weight snapshots whose predictions it
    averages, and an EMA of the weights (``torch.optim.swa_utils``, BatchNorm statistics recomputed
    from the first ``bn_batches`` training batches). It evaluates the current model, the snapshot
    ensemble and the averaged weights on the whole validation set with your own
    ``validation_step`` and loss, logs ``recipe/ensemble/<which>/loss`` and ``.../accuracy``, and
    hands back :meth:`ensemble`, :meth:`averaged_model` and the averaged checkpoint. Unlike
    Lightning's ``WeightAveraging`` it never touches your model, optimizer or RNG.

    Reports ``ensemble-evaluated`` (info, at the end of training): the measured numbers and which
    one wins by how much. FSDP2: snapshots and EMA kept sharded (``ensemble.sharding``).

    Thresholds: see docs/thresholds.md#checkpoint-ensemble.

    Args:
        num_snapshots: ensemble size K (>= 2).
        selection: ``"last"`` (the last K validation runs) or ``"top"`` (the best K by ``rank_by``,
            measured on the data it is scored on, so optimistic; needs ``evaluate="validation"``).
        rank_by: ``"loss"`` or ``"accuracy"`` for ``selection="top"``.
        storage: ``"cpu"`` or ``"disk"`` for the snapshots; ``snapshot_dir`` for the files
            (default ``<default_root_dir>/recipe_snapshots``).
        ema_decay: EMA decay per update, in (0, 1); ``ema_warmup``: use ``min(ema_decay,
            (1 + n) / (10 + n))`` after ``n`` updates.
        ema_every_n_steps: update the average every this many optimizer steps.
        ema_device: where the averaged model lives (default: the model's device).
        bn_batches: training batches stashed to recompute BatchNorm statistics (0: average buffers).
        evaluate: ``"validation"`` (every validation run) or ``"fit_end"`` (one pass at the end).
        averaged_path: where to save the averaged checkpoint; ``None`` for the default
            (``<log_dir>/recipe_averaged.ckpt``), ``False`` to not save it.
        get_input, get_target: batch readers (used to forward stashed batches of manual-
            optimization models); step_fn: ``(model, batch) -> loss`` used instead of your steps.
        on_error: ``"warn"`` or ``"raise"``.

    Example::

        ens = CheckpointEnsemble(num_snapshots=3)
        trainer = L.Trainer(callbacks=[ens], logger=TensorBoardLogger("runs"))
        trainer.fit(model, datamodule)
        print(ens.figures["winner"], ens.figures["averaged_loss"], ens.figures["single_loss"])
        best = ens.averaged_model()        # or MyModule.load_from_checkpoint(ens.averaged_path)
        trainer.validate(ens.ensemble(), datamodule)
    """

    codes = (VERDICT_CODE,)
    #: a sharded model's members are rebuilt whole at each evaluation (``ensemble.sharding``), so
    #: no full copy is needed at fit start
    needs_full_copy = False

    #: place of this callback's charts in the Recipe section (lower first)
    chart_rank = 60

    def __init__(
        self,
        num_snapshots: int = 3,
        selection: str = "last",
        rank_by: str = "loss",
        storage: str = "cpu",
        snapshot_dir: str | os.PathLike | None = None,
        ema_decay: float = 0.999,
        ema_warmup: bool = True,
        ema_every_n_steps: int = 1,
        ema_device: str | torch.device | None = None,
        bn_batches: int = 4,
        evaluate: str = "validation",
        averaged_path: str | os.PathLike | bool | None = None,
        *,
        get_input: Getter | None = None,
        get_target: Getter | None = None,
        step_fn: StepFn | None = None,
        on_error: str = "warn",
    ) -> None:
        super().__init__(on_error=on_error)
        check_int("num_snapshots", num_snapshots, 2)
        check_int("ema_every_n_steps", ema_every_n_steps, 1)
        check_int("bn_batches", bn_batches, 0)
        for name, value, allowed in (
            ("selection", selection, SELECTIONS),
            ("rank_by", rank_by, RANK_BY),
            ("storage", storage, STORAGES),
            ("evaluate", evaluate, EVALUATE),
        ):
            if value not in allowed:
                raise ValueError(f"`{name}` must be one of {allowed}, got {value!r}")
        if selection == "top" and evaluate != "validation":
            raise ValueError(
                "`selection='top'` ranks snapshots by their measured validation score, so it needs "
                f"`evaluate='validation'`; got evaluate={evaluate!r}"
            )
        if isinstance(ema_decay, bool) or not isinstance(ema_decay, (int, float)) or not 0 < ema_decay < 1:
            raise ValueError(f"`ema_decay` must be a number in (0, 1), got {ema_decay!r}")
        if not isinstance(ema_warmup, bool):
            raise TypeError(f"`ema_warmup` must be True or False, got {ema_warmup!r}")
        if snapshot_dir is not None and not isinstance(snapshot_dir, (str, os.PathLike)):
            raise TypeError(f"`snapshot_dir` must be a path or None, got {type(snapshot_dir).__name__}")
        if averaged_path is True or not (
            averaged_path in (None, False) or isinstance(averaged_path, (str, os.PathLike))
        ):
            raise TypeError(f"`averaged_path` must be a path, None (default) or False, got {averaged_path!r}")
        if step_fn is not None and not callable(step_fn):
            raise TypeError(
                f"`step_fn` must be a callable (model, batch) -> loss, got {type(step_fn).__name__}"
            )
        if ema_device is not None:
            try:
                ema_device = torch.device(ema_device)
            except (TypeError, RuntimeError) as exc:
                raise ValueError(f"`ema_device` must be a torch device or None, got {ema_device!r}") from exc
        self.num_snapshots = num_snapshots
        self.selection = selection
        self.rank_by = rank_by
        self.storage = storage
        self.snapshot_dir = None if snapshot_dir is None else os.fspath(snapshot_dir)
        self.ema_decay = float(ema_decay)
        self.ema_warmup = ema_warmup
        self.ema_every_n_steps = ema_every_n_steps
        self.ema_device = ema_device
        self.bn_batches = bn_batches
        self.evaluate = evaluate
        self._averaged_path_arg = averaged_path
        self.adapter = BatchAdapter(get_input, get_target)
        self.step_fn = step_fn
        #: path of the saved averaged checkpoint (after fit), else None
        self.averaged_path: str | None = None
        #: one dict per evaluation: step, epoch and the measured losses/accuracies
        self.history: list[dict[str, Any]] = []
        self._avg: AveragedModel | None = None
        self._avg_loaded: dict[str, Any] | None = None
        self._n_updates = 0
        self._last_update_step = 0
        self._bn_fresh = False
        self._has_bn = False
        self._snapshots: list[Snapshot] = []
        self._serial = 0
        self._stash: list[Any] = []
        self._template_ref: Any = None  # weakref to the trained module (set at fit start)
        self._loss_name: str | None = None
        self._use_training_step: bool | None = None
        self._run_id = uuid.uuid4().hex[:8]
        self._final_avg_state: dict[str, Tensor] | None = None
        self._eval: Evaluation | None = None
        self._disabled = False  # agreed on every rank (through a collective)
        self._missing_on_resume: list[str | None] = []
        self._shard: str | None = None  # the model's sharding (``_sharded.kind``), same on every rank
        self._ema: sharding.ShardedAverage | None = None  # sharded: the EMA of this rank's shards
        self._sharded_lost: str | None = None  # resumed from a sharded run: what the checkpoint lacks
        self._in_fit = False  # between fit start and fit end (a checkpoint may be restored in between)

    # ------------------------------------------------------------------ layout
    def tensorboard_charts(self) -> dict[str, dict[str, tuple[str, list[str]]]]:
        return {
            "Recipe": {
                "single vs ensemble vs averaged (validation loss)": (
                    "Multiline",
                    [r"recipe/ensemble/(single|snapshot_ensemble|averaged)/loss"],
                ),
                "single vs ensemble vs averaged (validation accuracy)": (
                    "Multiline",
                    [r"recipe/ensemble/(single|snapshot_ensemble|averaged)/accuracy"],
                ),
            }
        }

    # ------------------------------------------------------------------ fit start: the average
    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        super().on_fit_start(trainer, pl_module)
        self._template_ref = weakref.ref(pl_module)
        self.averaged_path = None
        self._stash = []
        self._disabled = False
        self._has_bn = batchnorm.has_batchnorm(pl_module)
        self._shard = _sharded.kind(pl_module, trainer)
        if self._shard is not None:
            self._start_sharded(trainer, pl_module)  # every rank: one all-reduce
        else:
            self.run_safely(trainer, "create the averaged model", self._create_average, trainer, pl_module)
        self._in_fit = True
        self._report_resume(trainer)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._report_resume(trainer)  # strategies that restore the checkpoint after fit start

    def _report_resume(self, trainer: Any) -> None:
        if self._sharded_lost:
            self.report(
                trainer,
                "check-skipped",
                Severity.INFO,
                f"CheckpointEnsemble resumed from a sharded run: {self._sharded_lost}.",
                {"why": "sharded resume"},
            )
            self._sharded_lost = None
        if self._missing_on_resume:
            self.report(
                trainer,
                "check-skipped",
                Severity.INFO,
                f"CheckpointEnsemble resumed without {len(self._missing_on_resume)} snapshot file(s) "
                f"({self._missing_on_resume}); the ensemble goes on with the others.",
                {"missing": list(self._missing_on_resume)},
            )
            self._missing_on_resume = []

    def _create_average(self, trainer: Any, pl_module: nn.Module) -> None:
        device = self.ema_device or averaging.module_device(pl_module)
        if self._avg is not None:  # a second fit with the same callback: keep averaging
            self._avg.module.to(device)
            return
        use_buffers = not (self._has_bn and self.bn_batches > 0)
        self._avg = averaging.new_average(
            pl_module, trainer, device, self.ema_decay, use_buffers, self._avg_loaded
        )
        self._avg_loaded = None

    def _has_average(self) -> bool:
        return self._avg is not None or self._ema is not None

    # ------------------------------------------------------------------ training: stash + EMA
    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self._has_bn and len(self._stash) < self.bn_batches and self.active and self._has_average():
            self.run_safely(
                trainer, "stash a training batch", lambda: self._stash.append(detach_clone(batch))
            )

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = int(trainer.global_step)
        if not self._has_average() or not self.active or step <= self._last_update_step:
            return
        if step % self.ema_every_n_steps:
            return
        self.run_safely(trainer, "update the averaged weights", self._update_average, pl_module, step)

    def _update_average(self, pl_module: nn.Module, step: int) -> None:
        decay = averaging.warmed_up_decay(self.ema_decay, self._n_updates, self.ema_warmup)
        if self._ema is not None:
            self._ema.update(pl_module, decay)  # sharded: this rank's shards, no collective
        else:
            assert self._avg is not None
            averaging.update_average(self._avg, pl_module, decay)
        self._n_updates += 1
        self._last_update_step = step
        self._bn_fresh = False

    # ------------------------------------------------------------------ validation ride-along
    def _fitting(self, trainer: Any) -> bool:
        fn = getattr(getattr(trainer, "state", None), "fn", None)
        return str(getattr(fn, "value", fn)).lower() == "fit" and not trainer.sanity_checking

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        self._eval = None
        if not self._fitting(trainer) or self.evaluate != "validation" or self._disabled:
            return
        self._eval = self._begin(trainer, pl_module)

    def on_validation_batch_end(
        self,
        trainer: Any,
        pl_module: Any,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        ev = self._eval
        if ev is None or not ev.ok or dataloader_idx != 0:
            return
        if self._guard(trainer, "evaluate the ensemble", self._eval_batch, ev, batch, batch_idx) is None:
            ev.ok = False

    def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        ev, self._eval = self._eval, None
        if ev is None:
            return
        self._finish(trainer, ev)  # every rank: contains the collective

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        if self._fitting(trainer) and self.evaluate == "fit_end" and self.active and not self._disabled:
            self.run_safely(trainer, "take a snapshot", self._snapshot_last, trainer, pl_module)

    # ------------------------------------------------------------------ end of training
    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        # every branch below is decided by agreed state only: the collectives run on every rank
        if not self._disabled:
            if self.evaluate == "fit_end":
                self._evaluate_at_end(trainer, pl_module)
            self._finalize_average(trainer)
        self._stash = []
        self._verdict(trainer)

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self._in_fit = False
        if self._avg is not None and self.ema_device is None:
            self._avg.module.to("cpu")  # free the accelerator; moved back if fit is called again
        if self._ema is not None and self.ema_device is None:
            self._ema.to("cpu")
        super().on_fit_end(trainer, pl_module)

    def _evaluate_at_end(self, trainer: Any, pl_module: Any) -> None:
        loaders = val_loader(trainer)
        ev = self._begin(trainer, pl_module)
        if loaders is None:
            ev.ok = False
            self.report(
                trainer,
                "check-skipped",
                Severity.INFO,
                "CheckpointEnsemble(evaluate='fit_end') found no validation dataloader to evaluate on.",
                {"why": "no validation dataloader"},
            )
        else:
            if (
                self._guard(trainer, "evaluate at the end of training", self._iterate, trainer, ev, loaders)
                is None
            ):
                ev.ok = False
        self._finish(trainer, ev)

    def _iterate(self, trainer: Any, ev: Evaluation, loader: Any) -> bool:
        if not ev.ok:
            return False
        with preserved_rng():
            for i, batch in enumerate(loader):
                limit = val_batch_limit(trainer, loader)
                if limit is not None and i >= limit:
                    break
                batch = trainer.strategy.batch_to_device(batch, dataloader_idx=0)
                self._eval_batch(ev, batch, i)
        return True

    # ------------------------------------------------------------------ one evaluation
    def _begin(self, trainer: Any, pl_module: Any) -> Evaluation:
        """Plan the rows, then copy the members (may fail locally; the collectives still run)."""
        stored = self._members_for_eval(int(trainer.global_step))
        n_members = len(stored) + 1
        ev = Evaluation(stored=stored, subsets=subsets_for(self.selection, n_members, self.num_snapshots))
        ev.ok = self.active and self._has_average()
        if self._shard is not None:
            self._rebuild_members(trainer, pl_module, ev)  # every rank: contains the collectives
        elif ev.ok:
            ev.ok = bool(
                self._guard(trainer, "copy the ensemble members", self._load_members, trainer, pl_module, ev)
            )
        self._refresh_bn(trainer, ev)  # ends in a collective under DDP with BatchNorm: every rank
        return ev

    def _guard(self, trainer: Any, what: str, fn: Callable[..., Any], *args: Any) -> Any:
        """``run_safely``, but a model or batch we cannot read is a ``check-skipped`` info finding."""

        def attempt() -> Any:
            try:
                return fn(*args)
            except (ProbeSkip, BatchLayoutError) as why:
                self.report(
                    trainer,
                    "check-skipped",
                    Severity.INFO,
                    f"CheckpointEnsemble turned itself off: {str(why).rstrip('.')}.",
                )
                self._broken = True
                self.teardown_diagnostics()
                return None

        return self.run_safely(trainer, what, attempt)

    def _members_for_eval(self, step: int) -> list[Snapshot]:
        return store.members_for_eval(self._snapshots, step, self.selection, self.num_snapshots)

    def _load_members(self, trainer: Any, pl_module: Any, ev: Evaluation) -> bool:
        current = copy_module(pl_module, trainer).eval()
        models = [current]
        for snap in ev.stored:
            member = copy_module(pl_module, trainer)
            member.load_state_dict(snap.load())
            models.append(member.eval())
        assert self._avg is not None
        ev.models, ev.averaged = models, self._avg.module
        self._stamp(trainer, ev)
        return True

    def _stamp(self, trainer: Any, ev: Evaluation) -> None:
        ev.step, ev.epoch = int(trainer.global_step), int(trainer.current_epoch)
        newest = self._snapshots[-1] if self._snapshots else None
        if newest is not None and newest.step == ev.step:  # at the end of fit: the epoch just finished
            ev.epoch = newest.epoch

    def _refresh_bn(self, trainer: Any, ev: Evaluation) -> None:
        """Recompute the averaged model's BatchNorm statistics from the stashed training batches."""
        if not (self._has_bn and self.bn_batches > 0):
            return
        ok = ev.ok and ev.averaged is not None and bool(self._stash)
        if ok and not self._bn_fresh:
            ok = bool(
                self.run_safely(trainer, "recompute BatchNorm statistics", self._update_bn, ev.averaged)
            )
        target = ev.averaged if ok else None
        batchnorm.sync_bn(trainer, trainer.lightning_module, target, ok)  # every rank, when world_size > 1
        if ev.ok and not self._stash:
            ev.bn_note = (
                "no training batch was stashed; the averaged model used the live BatchNorm statistics"
            )
        self._bn_fresh = ok

    def _update_bn(self, model: nn.Module) -> bool:
        return batchnorm.recompute_bn(model, self._stash, self._bn_step)

    def _bn_step(self, model: nn.Module, batch: Any) -> None:
        batchnorm.forward_batch(model, batch, self.step_fn, self.adapter)

    # ------------------------------------------------------------------ per batch
    def _eval_batch(self, ev: Evaluation, batch: Any, batch_idx: int) -> bool:
        assert ev.averaged is not None
        ev.averaged.eval()
        calls = [self._run_eval(m, batch, batch_idx) for m in ev.models]
        calls.append(self._run_eval(ev.averaged, batch, batch_idx))
        with torch.no_grad():
            rows = batch_rows(calls, ev.subsets)
        ev.acc = rows if ev.acc is None else ev.acc + rows
        self._loss_name = calls[0].name
        return True

    def _run_eval(self, model: nn.Module, batch: Any, batch_idx: int) -> LossCall:
        """The loss call of ``step_fn``, else of the module's ``validation_step`` if it makes one
        (decided on the first batch), else of its ``training_step``; in eval mode, no grad."""
        with preserved_rng(), torch.no_grad():
            if self.step_fn is None and self._use_training_step is None:
                result = capture_step(model, "validation_step", batch, batch_idx)
                if result.main_call is not None:
                    self._use_training_step = False
                    return result.main_call
                if is_manual_optimization(model):
                    raise ProbeSkip(
                        "validation_step calls no torch.nn.functional loss and the module uses manual "
                        "optimisation; pass step_fn=lambda model, batch: loss"
                    )
                self._use_training_step = True
            hook = "training_step" if self._use_training_step else "validation_step"
            result = capture_step(model, hook, batch, batch_idx, self.step_fn)
        call = result.main_call
        if call is None:
            raise ProbeSkip(
                "neither validation_step nor training_step calls a torch.nn.functional loss, so there is "
                "no prediction to average; pass step_fn=lambda model, batch: loss"
            )
        return call

    # ------------------------------------------------------------------ end of one evaluation
    def _finish(self, trainer: Any, ev: Evaluation) -> None:
        """Reduce the sums over every rank (always, on every rank), then summarise."""
        stats, ranks_ok = reduce_over_ranks(trainer, ev, self.num_snapshots)
        ev.models, ev.averaged = [], None
        if stats is None:
            self._disabled = True
            if self.active:
                self.report(
                    trainer,
                    "check-skipped",
                    Severity.INFO,
                    "CheckpointEnsemble could not evaluate on every rank (see the other findings, or the "
                    "validation loop had no batch) and turned itself off.",
                    {"ranks_ok": ranks_ok, "world_size": _context.world_size(trainer)},
                )
            self.teardown_diagnostics()
            return
        self.run_safely(trainer, "summarise the evaluation", self._summarise, trainer, ev, stats)

    def _summarise(self, trainer: Any, ev: Evaluation, stats: Tensor) -> None:
        members, averaged, ensembles = split_metrics(stats, ev.n_members)
        chosen, dropped = choose(ev.subsets, members, self.rank_by, self.selection)
        self._update_store(trainer, ev, members, dropped)
        epochs = [s.epoch for s in self._snapshots] if self.selection == "top" else None
        member_epochs = epochs or [s.epoch for s in self._snapshots][-len(ev.subsets[chosen]) :]
        record, scalars = evaluation_record(
            ev, len(ev.subsets[chosen]), member_epochs, (members[0], ensembles[chosen], averaged)
        )
        self.history.append(record)
        tensorboard.log_scalars(trainer, scalars, step=ev.step)
        self.figures.update({k: v for k, v in record.items() if k not in ("step",)})
        self.figures.update(
            {"evaluations": len(self.history), "evaluated_at_step": ev.step, "winner": winner(record)}
        )

    # ------------------------------------------------------------------ snapshots
    def _update_store(self, trainer: Any, ev: Evaluation, members: list[dict], dropped: int | None) -> None:
        for snap, m in zip(ev.stored, members[1:]):
            snap.scores = store.known_scores(m)
        module = trainer.lightning_module
        if self.selection == "last":
            self._add_snapshot(trainer, module, members[0])
            return
        if dropped == 0:  # the current model is the worst candidate: keep the stored ones
            return
        if dropped is not None:
            gone = ev.stored[dropped - 1]
            self._snapshots = [s for s in self._snapshots if s is not gone]
            store.remove_file(gone)
        self._add_snapshot(trainer, module, members[0])

    def _snapshot_last(self, trainer: Any, pl_module: Any) -> None:
        self._add_snapshot(trainer, pl_module, {})

    def _add_snapshot(self, trainer: Any, module: nn.Module, scores: dict) -> None:
        step, epoch = int(trainer.global_step), int(trainer.current_epoch)
        if self._snapshots and self._snapshots[-1].step == step and self.selection == "last":
            self._snapshots[-1].scores = store.known_scores(scores)
            return
        self._serial += 1
        path = None
        if self.storage == "disk":
            path = store.snapshot_path(trainer, self.snapshot_dir, self._run_id, self._serial)
        sharded = self._shard is not None  # this rank's shards, no collective
        self._snapshots.append(store.take_snapshot(module, self._serial, epoch, step, scores, path, sharded))
        while len(self._snapshots) > self.num_snapshots:
            store.remove_file(self._snapshots.pop(0))

    # ------------------------------------------------------------------ final average + verdict
    def _finalize_average(self, trainer: Any) -> None:
        ev = Evaluation(stored=[], subsets=[])
        ev.ok = self.active and self._has_average()
        if self._shard is not None:
            self._unshard_results(trainer, ev)  # every rank: contains the collectives
        elif ev.ok and self._avg is not None:
            ev.averaged = self._avg.module
        self._refresh_bn(trainer, ev)  # a collective under DDP when there is BatchNorm: every rank
        if ev.ok:
            self.run_safely(trainer, "save the averaged weights", self._save_average, trainer, ev)
        if _context.world_size(trainer) > 1:  # every rank learns where rank zero saved it
            self.averaged_path = trainer.strategy.broadcast(self.averaged_path, 0)
        if self.averaged_path:
            self.figures["averaged_checkpoint"] = self.averaged_path

    def _save_average(self, trainer: Any, ev: Evaluation) -> None:
        assert ev.averaged is not None
        state = store.cpu_state(ev.averaged)
        self._final_avg_state = state
        if self._averaged_path_arg is False or not _context.is_global_zero(trainer):
            return
        self.averaged_path = export.save_averaged(trainer, ev.averaged, state, self._averaged_path_arg)

    def _verdict(self, trainer: Any) -> None:
        if not self.history:
            if not self.has_reported("check-skipped") and not self.has_reported("internal-error"):
                self.report(
                    trainer,
                    "check-skipped",
                    Severity.INFO,
                    "CheckpointEnsemble never evaluated (no validation run finished during fit).",
                    {"why": NO_EVALUATION},
                )
            return
        last = self.history[-1]
        message = verdict_message(last, self.averaged_path)
        self.report(trainer, VERDICT_CODE, Severity.INFO, message, dict(last))

    # ------------------------------------------------------------------ results for the user
    def averaged_model(self) -> nn.Module:
        """Your LightningModule class with the averaged weights (BatchNorm statistics recomputed for
        them), in eval mode, on the device of the model you trained."""
        state = self._final_avg_state
        if state is None:
            if self._ema is not None:
                raise RuntimeError(
                    "averaged_model(): the average of a sharded model is kept as each rank's shards and "
                    "made whole at the end of a fit in which the ensemble ran on every rank; not yet here "
                    "(call it after trainer.fit, and see the findings)"
                )
            if self._avg is None:
                raise RuntimeError("averaged_model(): nothing averaged yet; call it after trainer.fit")
            state = self._avg.module.state_dict()
        return export.user_copy(self._template_module(), state).eval()

    def ensemble(self) -> nn.Module:
        """Your LightningModule class whose ``forward`` averages the snapshots' predictions
        (probabilities for classifiers, outputs for regression; for ``cross_entropy`` it returns
        the log of the averaged probabilities, which ``argmax``/``softmax``/``cross_entropy`` read
        as logits). The members are in ``.recipe_members``; steps that call ``self(x)`` use the
        ensemble, steps that call a submodule directly use the newest snapshot's weights."""
        if not self._snapshots:
            raise RuntimeError("ensemble(): no snapshot was taken yet; call it after trainer.fit")
        if any(s.sharded for s in self._snapshots):
            raise RuntimeError(
                "ensemble(): the snapshots of a sharded model are kept as each rank's shards and made "
                "whole at the end of a fit in which the ensemble ran on every rank; not yet here (call it "
                "after trainer.fit, and see the findings)"
            )
        return export.snapshot_ensemble(self._template_module(), self._snapshots, self._loss_name)

    def _template_module(self) -> nn.Module:
        module = self._template_ref() if self._template_ref is not None else None
        if module is None:
            raise RuntimeError("the trained module is gone; keep a reference to it to build the results")
        return module

    # ------------------------------------------------------------------ lifecycle / state
    def __getstate__(self) -> dict[str, Any]:
        # picklable (ddp_spawn pickles the callbacks): no weakref, no evaluation in flight
        state = dict(self.__dict__)
        state.update(_template_ref=None, _eval=None, _stash=[])
        return state

    def teardown_diagnostics(self) -> None:
        if self._eval is not None:
            self._eval.models, self._eval.averaged = [], None
        self._stash = []

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._eval, self._in_fit = None, False
        super().on_exception(trainer, pl_module, exception)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        avg = None
        if self._avg is not None:
            avg = averaging.average_state(self._avg)
        elif self._avg_loaded is not None:
            avg = self._avg_loaded
        # sharded: each rank's shards differ and a checkpoint holds one rank's callback state, so
        # the shards stay out of it (whole snapshots, made at the end of training, go in)
        kept = [s for s in self._snapshots if not s.sharded]
        state.update(
            {
                "averaged": avg,
                "sharded_average": self._ema is not None,
                "sharded_snapshots": len(self._snapshots) - len(kept),
                "n_updates": self._n_updates,
                "last_update_step": self._last_update_step,
                "snapshots": [s.to_state() for s in kept],
                "serial": self._serial,
                "run_id": self._run_id,
                "history": list(self.history),
                "loss_name": self._loss_name,
                "use_training_step": self._use_training_step,
            }
        )
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        # a checkpoint written at the end of training (ModelCheckpoint's save_last does that, after
        # every on_train_end) holds that fit's end-of-training verdict; the resumed fit gives its own
        self._findings = [f for f in self._findings if not end_of_fit(f)]
        loaded = state_dict.get("averaged")
        if self._in_fit:
            # restored after fit start (strategies that restore after setup: FSDP, ModelParallel,
            # DeepSpeed): the average made at fit start takes the checkpoint's, or restarts
            if self._avg is not None and loaded is not None:
                averaging.load_average(self._avg, loaded)
            if self._ema is not None:
                self._ema.n_averaged = 0  # the first update copies the restored weights
        else:
            self._avg_loaded, self._avg, self._ema = loaded, None, None
        self._n_updates = int(state_dict.get("n_updates", 0))
        self._last_update_step = int(state_dict.get("last_update_step", 0))
        snaps = [Snapshot.from_state(d) for d in state_dict.get("snapshots", [])]
        self._snapshots = [s for s in snaps if not s.missing]
        self._missing_on_resume = [s.path for s in snaps if s.missing]
        self._serial = int(state_dict.get("serial", len(snaps)))
        self._run_id = state_dict.get("run_id", self._run_id)
        self.history = list(state_dict.get("history", []))
        self._loss_name = state_dict.get("loss_name")
        self._use_training_step = state_dict.get("use_training_step")
        lost = int(state_dict.get("sharded_snapshots", 0) or 0)
        if state_dict.get("sharded_average") or lost:
            self._n_updates = 0  # the average starts again: so does its warm-up
            what = (
                f"its averaged weights and {lost} snapshot(s) were" if lost else "its averaged weights were"
            )
            again = "the ensemble and the average start" if lost else "the average starts"
            self._sharded_lost = (
                f"{what} kept as each rank's shards, which are not in the checkpoint; {again} again from here"
            )


__all__ = ["CheckpointEnsemble"]
