"""InputIndependentBaseline: does the model do better with its real inputs than with zeros?"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from lightning_recipe import _sharded, stats, tensorboard
from lightning_recipe._probe import (
    EvalStep,
    LossCall,
    ProbeSkip,
    StepFn,
    StepResult,
    copy_module,
    is_manual_optimization,
    know_nothing_loss,
    preserved_rng,
    track_hook,
    untrack_hook,
)
from lightning_recipe.batch import (
    BatchAdapter,
    BatchLayoutError,
    BatchStash,
    Getter,
    LeafGetter,
    map_tensors,
    tensor_leaves,
)
from lightning_recipe.callback import RecipeCallback
from lightning_recipe.findings import Severity

TAG = "recipe/input_independent"
MAX_HISTORY = 200
#: each kept validation batch is cut to its first examples (bounded memory, bounded cost)
MAX_EXAMPLES = 256
#: key of the "zeroing the input changed the loss target" flag in the host transfer
_TARGET_MOVED = "_target_moved"


class InputIndependentBaseline(RecipeCallback):
    """Compare the validation loss with real inputs against the loss with all inputs zeroed.

    Karpathy: "train an input-independent baseline (e.g. easiest is to just set all your inputs to
    zero) ... does your model learn to extract any information out of the input at all?" Rather
    than training a second model, after every validation run (not the sanity check) this callback
    runs your ``validation_step`` (``training_step`` when it calls no loss function) on a copy of
    the model in eval mode over the first ``num_batches`` validation batches the trainer ran, once
    as they are and once with the input zeroed. It logs ``recipe/input_independent/real_loss``,
    ``.../zero_loss``, ``.../chance_loss`` and ``.../gap`` = ``(baseline - real) / |baseline|``
    with ``baseline = min(zero_loss, chance_loss)``. When the target is made from the input
    (autoencoders, next-token prediction) the batch is kept and what the model *reads* is zeroed
    instead: the ids each ``nn.Embedding`` gets, or the float input where a leaf layer reads it
    (``figures["zeroed"]``); a batch where neither works is not judged (``check-skipped``).

    Reports ``input-independent`` (error) when, after the first ``warmup`` validation runs, the gap
    is below ``min_gap`` on ``patience`` runs in a row (a run whose gap grew by ``min_gap / 2`` is
    still learning and does not count): the inputs never reach the model, the labels do not depend
    on them, or it has learned nothing yet.

    Thresholds: see docs/thresholds.md#input-independent-baseline.

    Args:
        num_batches: how many validation batches to evaluate (each costs two forward passes).
        min_gap: smallest gap ``(baseline - real) / |baseline|`` that counts as a clear gap.
        warmup: validation runs at the start of fit that are never judged.
        patience: validation runs in a row without a clear gap before the finding.
        get_input: ``callable(batch) -> Tensor`` for batch layouts the guess cannot read.
        get_target: ``callable(batch) -> Tensor | None`` likewise.
        step_fn: ``callable(model, batch) -> loss`` replacing ``training_step`` (needed under
            manual optimisation).
        on_error: ``"warn"`` or ``"raise"`` (stop the fit with ``RecipeError`` on the finding).

    Example::

        trainer = L.Trainer(callbacks=[InputIndependentBaseline()], logger=TensorBoardLogger("runs"))
        trainer.fit(model, datamodule)  # errors "[input-independent] ..." if inputs carry nothing
    """

    codes = ("input-independent",)
    what = "compare real and zeroed inputs"

    #: place of this callback's charts in the Recipe section (lower first)
    chart_rank = 30

    def __init__(
        self,
        num_batches: int = 2,
        min_gap: float = 0.05,
        warmup: int = 2,
        patience: int = 2,
        *,
        get_input: Getter | None = None,
        get_target: Getter | None = None,
        step_fn: StepFn | None = None,
        on_error: str = "warn",
    ) -> None:
        super().__init__(on_error=on_error)
        for name, value, low in (
            ("num_batches", num_batches, 1),
            ("warmup", warmup, 0),
            ("patience", patience, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"`{name}` must be an int >= {low}, got {value!r}")
        if (
            isinstance(min_gap, bool)
            or not isinstance(min_gap, (int, float))
            or not math.isfinite(min_gap)
            or not 0 <= min_gap < 1
        ):
            raise ValueError(f"`min_gap` must be a number in [0, 1), got {min_gap!r}")
        self.num_batches = num_batches
        self.min_gap = float(min_gap)
        self.warmup = warmup
        self.patience = patience
        self.read_batches_with(get_input, get_target, step_fn)
        self._eval_step = EvalStep(step_fn)
        self._reset()

    def _reset(self) -> None:
        self._stash = BatchStash(self.num_batches, self.adapter, MAX_EXAMPLES)
        self._gave_up = False
        self._input_verified = False
        self._zero_mode = "batch"
        self._reader_names: list[str] = []
        self._eval_step = EvalStep(self.step_fn)
        self._runs = 0
        self._streak = 0
        self._history: deque[dict[str, float]] = deque(maxlen=MAX_HISTORY)

    def tensorboard_charts(self) -> dict[str, dict[str, tuple[str, list[str]]]]:
        return {"Recipe": {"real vs zero-input loss": ("Multiline", [rf"{TAG}/(real|zero|chance)_loss"])}}

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit":
            self._reset()

    def on_validation_batch_start(
        self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if self._stash.full or self._gave_up or not self.active:
            return
        self.run_safely(
            trainer,
            "on_validation_batch_start",
            self._stash.offer,
            batch,
            dataloader_idx,
            batch_idx,
        )

    def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        # not @guarded: every rank must reach the collective below after every validation run
        if getattr(trainer, "sanity_checking", False) or not _fitting(trainer):
            return
        self._runs += 1
        # sharded model: its full weights for the copy (ranks agree first; nothing under DDP)
        need = self.active and not self._gave_up and bool(self._stash.batches)
        with _sharded.gathered(trainer, pl_module, need=need):
            flat = bool(
                self.run_safely(trainer, "on_validation_epoch_end", self._measure, trainer, pl_module)
            )
        flat = bool(trainer.strategy.reduce_boolean_decision(flat, all=True))
        if self._runs <= self.warmup:
            return
        self._streak = self._streak + 1 if flat else 0
        if self.active and self._streak >= self.patience and not self.has_reported("input-independent"):
            self.run_safely(trainer, "on_validation_epoch_end", self._report_flat, trainer)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self.run_safely(trainer, "on_train_end", self._end_of_training, trainer)
        self._stash.clear()  # no validation run follows: free the kept batches' device memory

    def _end_of_training(self, trainer: Any) -> None:
        if not self._history and not self._gave_up and not self.has_reported("check-skipped"):
            self._skip(
                trainer,
                "no validation run ended during training (no val_dataloader, limit_val_batches=0, "
                "or training ended before the first validation)",
                at_end=True,
            )

    def teardown_diagnostics(self) -> None:
        self._stash.clear()

    # ------------------------------------------------------------------ work
    def _measure(self, trainer: Any, pl_module: Any) -> bool:
        """Evaluate real vs zeroed inputs and log; True when the gap is not clear (rank-local)."""
        if self._gave_up or not self._stash.batches:
            return False
        if self.step_fn is None and is_manual_optimization(pl_module):
            return self._give_up(
                trainer,
                "the module uses manual optimisation, so its training_step steps the optimizers; "
                "pass step_fn=lambda model, batch: loss",
            )
        try:
            losses = self._evaluate(trainer, pl_module)
        except (ProbeSkip, BatchLayoutError) as why:
            return self._give_up(trainer, str(why))
        real, zero = losses["real_loss"], losses["zero_loss"]
        # the best the model could do without its input: the zero-input loss, capped at the
        # know-nothing loss (zeros can be out of distribution and give a loss above chance)
        baseline = min(zero, losses.get("chance_loss", zero))
        gap = (baseline - real) / max(abs(baseline), 1e-8)
        row = {"step": float(trainer.global_step), **losses, "gap": gap}
        self._history.append(row)
        metrics = {f"{TAG}/{k}": v for k, v in row.items() if k != "step" and math.isfinite(v)}
        tensorboard.log_scalars(trainer, metrics)
        self.figures.update({k: v for k, v in row.items() if k != "step"})
        self.figures["validation_runs"] = self._runs
        if not (math.isfinite(real) and math.isfinite(zero)):
            return False  # non-finite losses are the loss monitors' business
        growth = gap - self._history[-2]["gap"] if len(self._history) > 1 else 0.0
        # a gap that grew by half the margin since the last run: still learning, not flat yet
        return gap < self.min_gap and growth < self.min_gap / 2

    def _evaluate(self, trainer: Any, pl_module: Any) -> dict[str, float]:
        model = copy_module(pl_module, trainer)
        try:
            model.eval()
            reals, zeros, chances, moved = [], [], [], []
            with preserved_rng(), torch.no_grad():
                if not self._input_verified:
                    self._verify_input(model, self._stash.batches[0])
                for batch in self._stash.batches:
                    result = self._eval_step(model, batch)
                    if result.data_loss is None:
                        raise ProbeSkip(f"{self._eval_step.name} returned no loss on a validation batch")
                    reals.append(result.data_loss.detach().float().reshape(()))
                    chance = _chance_loss(result.main_call)
                    if chance is not None:
                        chances.append(chance)
                    if self._zero_mode == "reference" and chance is not None:
                        zeros.append(chance.detach().float().reshape(()))
                        continue
                    try:
                        zero = self._zero_run(model, batch)
                    except _CannotZero as why:
                        if chance is None:
                            raise ProbeSkip(str(why)) from why
                        # the model cannot run without its input (a forecasting model windowing
                        # a series by the mask it carries): the user's own loss of a
                        # know-nothing prediction is the baseline
                        self._zero_mode = "reference"
                        self.figures["zeroed"] = (
                            f"{why}; the baseline is the know-nothing loss of the same loss call"
                        )
                        zeros.append(chance.detach().float().reshape(()))
                        continue
                    zeros.append(zero.data_loss.detach().float().reshape(()))
                    moved.append(self._target_moved(batch, result.main_call, zero.main_call))
        finally:
            del model
        values = {"real_loss": torch.stack(reals).mean(), "zero_loss": torch.stack(zeros).mean()}
        if len(chances) == len(reals):
            values["chance_loss"] = torch.stack(chances).mean()
        if moved:
            values[_TARGET_MOVED] = torch.stack([m.float().to(reals[0].device) for m in moved]).amax()
        host = stats.to_host(values)  # the one host transfer of this validation run
        if host.pop(_TARGET_MOVED, 0.0) > 0:
            why = (
                "the loss target changes when the input is zeroed (the targets are computed from the "
                "input: an autoencoder, a language model, a self-supervised loss), so the zero-input "
                "loss is no baseline"
            )
            if "chance_loss" not in host:
                raise ProbeSkip(f"{why}; pass get_input/get_target if the input was guessed wrong")
            # no layer reads the input as such (the model cuts windows out of it first): the
            # user's own loss of a know-nothing prediction is the baseline from now on
            self._zero_mode = "reference"
            self.figures["zeroed"] = f"{why}; the baseline is the know-nothing loss of the same loss call"
            host["zero_loss"] = host["chance_loss"]
        return host

    def _verify_input(self, model: Any, batch: Any) -> None:
        """Make sure the tensor that gets zeroed reaches the model (once per fit).

        The input is guessed from keys and positions; in a batch like ``(sample_weight, x, y)``
        or ``(index, x, y)`` the guess is a tensor the model never reads, so zeroing it changes
        nothing and a healthy model would look input-independent. When zeroing the guess leaves
        the model's output unchanged, each other tensor with the batch's size is zeroed in turn
        and the first one that changes the output becomes the input. When none does, the model
        really ignores its batch and is judged as it is."""
        self._input_verified = True
        real = self._eval_step(model, batch)
        try:
            zero = self._zero_run(model, batch)
        except _CannotZero:
            return  # judged against the know-nothing loss (or skipped) by the caller
        if bool(self._target_moved(batch, real.main_call, zero.main_call)):
            self._use_reader(model, batch, real)
            return
        if self.adapter.get_input is not None or not _same_output(real, zero):
            return
        guess = self.adapter.input(batch)
        size = guess.shape[0] if guess.dim() > 0 else None
        for index, leaf in enumerate(tensor_leaves(batch)):
            if leaf is guess or leaf.dim() == 0 or leaf.shape[0] != size:
                continue
            zeroed = map_tensors(batch, lambda t, leaf=leaf: torch.zeros_like(t) if t is leaf else t)
            try:
                changed = not _same_output(real, self._eval_step(model, zeroed))
            except Exception:
                continue  # the model cannot run with this tensor zeroed: not the one to use
            if changed:
                self.adapter = BatchAdapter(LeafGetter(index), self.adapter.get_target)
                self.figures["input"] = (
                    f"tensor {index} of the batch ({tuple(leaf.shape)}, {leaf.dtype}): the guessed "
                    f"input ({tuple(guess.shape)}, {guess.dtype}) does not reach the model's output"
                )
                return

    def _use_reader(self, model: Any, batch: Any, real: StepResult) -> None:
        """The targets are made from the input (a language model, an autoencoder): zero what the
        model reads instead -- the ids the embeddings get from the input, or the input of the
        first layers that receive the float input -- and keep the batch, so the targets stay.
        Kept when some layer reads the input and the loss target stays;
        otherwise the batch-zeroing stays and the run is skipped (target moved). A model whose
        output does not change is blind to its input and is judged as such."""
        try:
            zeroed = self._reader_run(model, batch)
        except Exception:
            return
        if not self._reader_names:
            return  # no layer reads the input as such: nothing to zero
        calls = real.main_call, zeroed.main_call
        if calls[0] is not None and calls[1] is not None and bool(_differs(calls[0].target, calls[1].target)):
            return
        self._zero_mode = "reader"
        self.figures["zeroed"] = "what the model reads, the targets kept: " + ", ".join(self._reader_names)

    def _reader_run(self, model: Any, batch: Any) -> StepResult:
        reader = _ZeroReader(self.adapter.input(batch))
        with reader.attached(model):
            result = self._eval_step(model, batch)
        self._reader_names = reader.names or self._reader_names
        return result

    def _zero_run(self, model: Any, batch: Any) -> StepResult:
        try:
            if self._zero_mode == "reader":
                result = self._reader_run(model, batch)
            else:
                result = self._eval_step(model, self.adapter.zero_inputs(batch))
        except Exception as exc:
            raise _CannotZero(
                f"the model could not run on zeroed inputs ({type(exc).__name__}: {exc}); pass "
                "get_input=lambda batch: ... if the guessed input is not the model's input"
            ) from exc
        if result.data_loss is None:
            raise ProbeSkip(f"{self._eval_step.name} returned no loss on zeroed inputs")
        return result

    def _target_moved(self, batch: Any, real: LossCall | None, zero: LossCall | None) -> Tensor:
        """A 0-d device flag: zeroing the input changed what the loss compares against (no sync).

        Read from the loss calls when both runs made one; without a loss call to read, a batch
        that carries no target of its own (``BatchAdapter.target`` is None) counts as changed:
        the step can only have made its targets from the input."""
        if real is not None and zero is not None:
            return _differs(real.target, zero.target)
        if self._zero_mode == "reader":
            return torch.zeros(())  # the batch itself is untouched
        return torch.tensor(float(self.adapter.target(batch) is None))

    def _report_flat(self, trainer: Any) -> None:
        recent = list(self._history)[-self.patience :]
        last = recent[-1]
        gaps = ", ".join(f"{round(r['gap'], 3) + 0.0:.1%}" for r in recent)
        runs = f"the last {len(recent)} validation runs" if len(recent) > 1 else "the last validation run"
        chance = last.get("chance_loss")
        vs_chance = f" (chance level {chance:.4g})" if chance is not None else ""
        self.report(
            trainer,
            "input-independent",
            Severity.ERROR,
            f"With real inputs the validation loss is {last['real_loss']:.4g}, with all inputs zeroed "
            f"{last['zero_loss']:.4g}{vs_chance}: the real inputs beat the better of those baselines by "
            f"{gaps} on {runs}, under the {self.min_gap:.0%} a model "
            "that uses its input shows (healthy runs: 10% or more after two epochs); the model "
            "extracts no information from its input: check that the inputs reach the model and that "
            "the labels depend on them (not shuffled apart from them), or whether it learned nothing "
            "at all (learning rate far too low).",
            {
                "real_loss": last["real_loss"],
                "zero_loss": last["zero_loss"],
                "chance_loss": chance,
                "gaps": [r["gap"] for r in recent],
                "min_gap": self.min_gap,
                "patience": self.patience,
                "validation_runs": self._runs,
            },
        )

    def _give_up(self, trainer: Any, reason: str) -> bool:
        self._gave_up = True
        self._stash.clear()
        self._skip(trainer, reason)
        return False

    def _skip(self, trainer: Any, reason: str, at_end: bool = False) -> None:
        self.skip(trainer, reason, once=True, end_of_fit=at_end)

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "runs": self._runs,
            "streak": self._streak,
            "history": [dict(r) for r in self._history],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        # the end-of-training skip of a checkpoint saved after on_train_end is that fit's verdict:
        # the resumed fit decides again at its own end
        self._findings = [f for f in self._findings if not f.evidence.get("end_of_fit")]
        self._reset()
        self._runs = int(state_dict.get("runs", 0))
        self._streak = int(state_dict.get("streak", 0))
        self._history.extend({str(k): float(v) for k, v in r.items()} for r in state_dict.get("history", []))


# ---------------------------------------------------------------------------- helpers
def _chance_loss(call: LossCall | None) -> Tensor | None:
    """The loss of a know-nothing prediction with the same loss call, or ``None``."""
    try:
        ref = know_nothing_loss(call)
    except Exception:
        return None
    if ref is None:
        return None
    out = ref[0].detach().float()
    return (out if out.dim() == 0 else out.mean()).reshape(())


def _same_output(a: StepResult, b: StepResult) -> bool:
    """The two runs produced the same model output (the loss call's input), or, without a loss
    call to compare, the same loss (one host sync, once per fit)."""
    if a.main_call is not None and b.main_call is not None:
        x, y = a.main_call.input, b.main_call.input
        return x.shape == y.shape and bool(torch.equal(x, y))
    if a.data_loss is None or b.data_loss is None:
        return False
    return bool(torch.equal(a.data_loss, b.data_loss))


def _differs(a: Any, b: Any) -> Tensor:
    """A 0-d flag (on ``a``'s device): the two loss targets differ (NaN equals NaN)."""
    if not isinstance(a, Tensor) or not isinstance(b, Tensor):
        try:
            same = a is b or bool(a == b)
        except Exception:
            same = False
        return torch.tensor(float(not same))
    if a.shape != b.shape:
        return torch.ones((), device=a.device)
    diff = a != b.to(a.device)
    if a.is_floating_point():
        diff &= ~(a.isnan() & b.to(a.device).isnan())
    return diff.any()


class _CannotZero(ProbeSkip):
    """The step failed on zeroed inputs."""


class _ZeroReader:
    """Zeroes what the model reads of its input while the batch (and so the targets made from it)
    stays: the ids every ``nn.Embedding`` gets from the input (same storage, e.g.
    ``tokens[:, :-1]``, or the input's batch size) become id 0, as :meth:`BatchAdapter.zero_inputs`
    makes them; for a float input, the input of every leaf module that receives it (or a view of
    it) becomes zeros."""

    def __init__(self, x: Tensor) -> None:
        self.x = x
        self.integer = not (x.is_floating_point() or x.is_complex())
        self.names: list[str] = []

    def _reads_input(self, t: Any) -> bool:
        if not isinstance(t, Tensor) or t.dtype != self.x.dtype:
            return False
        if _storage(t) == _storage(self.x):
            return True
        return self.integer and t.dim() >= 1 and self.x.dim() >= 1 and t.shape[0] == self.x.shape[0]

    @contextmanager
    def attached(self, model: nn.Module) -> Iterator[None]:
        handles = []
        for name, m in model.named_modules():
            label = name or type(m).__name__
            embedding = isinstance(m, (nn.Embedding, nn.EmbeddingBag))
            leaf = m is not model and not any(True for _ in m.children())
            if embedding if self.integer else leaf:
                handles.append(track_hook(m.register_forward_pre_hook(self._zero_input(label))))
        try:
            yield
        finally:
            for h in handles:
                untrack_hook(h)

    def _zero_input(self, label: str) -> Any:
        def hook(mod: nn.Module, args: Any) -> Any:
            if args and self._reads_input(args[0]):
                if label not in self.names:
                    self.names.append(label)
                return (torch.zeros_like(args[0]), *args[1:])
            return None

        return hook


def _storage(t: Tensor) -> int:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return -1


def _fitting(trainer: Any) -> bool:
    fn = getattr(getattr(trainer, "state", None), "fn", None)
    return getattr(fn, "value", fn) in ("fit", None)
