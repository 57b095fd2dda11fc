"""Running the user's own step on a copy of the model, and seeing what reaches the loss.

Every check needs "the loss of this model on this batch" and often "the logits and targets
that went into the loss". Rather than guessing the model's ``forward`` signature, we call the
user's ``training_step`` on a deep copy of the LightningModule (``self.log`` silenced, the
trainer's loggers hidden) inside a :class:`LossCapture` torch-function mode that records every
call to a ``torch.nn.functional`` loss (``nn.CrossEntropyLoss`` and friends call those too).
RNG state is saved and restored around everything, so the real run is bit-identical.
"""

from __future__ import annotations

import copy
import inspect
import math
import random
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from lightning_recipe import _context, _losses, _sharded
from lightning_recipe._losses import ModuleLossCall, ModuleLossRecorder

StepFn = Callable[[nn.Module, Any], Any]

LOSS_FUNCTIONS: dict[Callable[..., Any], str] = {
    F.cross_entropy: "cross_entropy",
    F.nll_loss: "nll_loss",
    F.binary_cross_entropy: "binary_cross_entropy",
    F.binary_cross_entropy_with_logits: "binary_cross_entropy_with_logits",
    F.mse_loss: "mse_loss",
    F.l1_loss: "l1_loss",
    F.smooth_l1_loss: "smooth_l1_loss",
    F.huber_loss: "huber_loss",
    F.kl_div: "kl_div",
    F.multi_margin_loss: "multi_margin_loss",
    F.multilabel_margin_loss: "multilabel_margin_loss",
    F.multilabel_soft_margin_loss: "multilabel_soft_margin_loss",
    F.soft_margin_loss: "soft_margin_loss",
    F.poisson_nll_loss: "poisson_nll_loss",
    F.gaussian_nll_loss: "gaussian_nll_loss",
    F.hinge_embedding_loss: "hinge_embedding_loss",
    F.cosine_embedding_loss: "cosine_embedding_loss",
    F.margin_ranking_loss: "margin_ranking_loss",
    F.triplet_margin_loss: "triplet_margin_loss",
    F.ctc_loss: "ctc_loss",
}
_LOSS_BY_NAME = {name: fn for fn, name in LOSS_FUNCTIONS.items()}
#: losses over class scores with integer (or probability) targets
CLASS_LOSSES = ("cross_entropy", "nll_loss", "multi_margin_loss")
#: losses where "predict the target mean" is the natural baseline
REGRESSION_LOSSES = ("mse_loss", "l1_loss", "smooth_l1_loss", "huber_loss")


class ProbeSkip(Exception):
    """A check cannot run on this model / batch; the message is the reason shown to the user."""


@dataclass
class LossCall:
    """One call to a loss function seen during a probed step."""

    name: str
    input: Tensor
    target: Any
    kwargs: dict[str, Any]
    output: Tensor
    args: tuple = ()
    #: "sigmoid" / "softmax" when the input is (a view of) the output of that function
    squashed_by: str | None = None

    @property
    def function(self) -> Callable[..., Any]:
        """The ``torch.nn.functional`` loss that was called."""
        return _LOSS_BY_NAME[self.name]

    def recompute(self, new_input: Tensor) -> Tensor:
        """The same loss call (target, weights, reduction...) on another input."""
        args = (new_input, *self.args[1:])
        kwargs = {k: v for k, v in self.kwargs.items() if k != "input"}
        return self.function(*args, **kwargs)


_SQUASHERS: dict[Callable[..., Any], str] = {
    torch.sigmoid: "sigmoid",
    torch.Tensor.sigmoid: "sigmoid",
    F.sigmoid: "sigmoid",
    torch.softmax: "softmax",
    torch.Tensor.softmax: "softmax",
    F.softmax: "softmax",
}


def _storage_ptr(t: Tensor) -> int:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return -1


class LossCapture(TorchFunctionMode):
    """Records calls to ``torch.nn.functional`` losses (only the outermost one of each), and
    whether a loss input is the output of a sigmoid / softmax (by tensor storage; the outputs
    are kept alive while capturing so a freed address cannot be mistaken for one)."""

    def __init__(self, model: nn.Module | None = None) -> None:
        super().__init__()
        self.calls: list[LossCall] = []
        self._squashed: dict[int, tuple[str, Tensor]] = {}
        #: loss-like calls of ``model``'s loss modules and distribution log-likelihoods (``_losses``)
        self.modules = ModuleLossRecorder(model)

    def __enter__(self) -> LossCapture:
        self.modules.__enter__()
        try:
            return super().__enter__()
        except BaseException:
            self.modules.__exit__(None, None, None)
            raise

    def result(self, loss: Tensor | None) -> StepResult:
        """The :class:`StepResult` of a step that returned ``loss``: its functional loss calls
        and the module / distribution loss calls that may have made ``loss``."""
        module_calls = [*self.modules.calls, *self.modules.distribution_calls(loss)]
        return StepResult(loss=loss, calls=self.calls, module_calls=module_calls)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        squash = _SQUASHERS.get(func)
        if squash is not None and isinstance(out, Tensor):
            self._squashed[_storage_ptr(out)] = (squash, out)
            return out
        name = LOSS_FUNCTIONS.get(func)
        if name is not None and args and isinstance(args[0], Tensor) and isinstance(out, Tensor):
            target = args[1] if len(args) > 1 else kwargs.get("target")
            hit = self._squashed.get(_storage_ptr(args[0]))
            self.calls.append(
                LossCall(name, args[0], target, dict(kwargs), out, tuple(args), hit[0] if hit else None)
            )
        return out

    def __exit__(self, *exc: Any) -> Any:
        self._squashed.clear()
        try:
            return super().__exit__(*exc)
        finally:
            self.modules.__exit__(*exc)


@dataclass
class StepResult:
    """The loss a probed step returned and the loss-function calls it made."""

    loss: Tensor | None
    calls: list[LossCall] = field(default_factory=list)
    #: losses computed by modules without trainable parameters (custom losses, torchmetrics
    #: metrics used as losses) and negative log-likelihoods of distributions (``_losses``)
    module_calls: list[ModuleLossCall] = field(default_factory=list)

    @property
    def main_call(self) -> LossCall | ModuleLossCall | None:
        """The data loss: the functional loss call whose value equals the step's loss if there
        is one (no regulariser added), else a module loss call whose value equals it, else the
        first scalar functional loss call, else a module loss call on the loss's graph."""
        scalar = [c for c in self.calls if c.output.dim() == 0]
        lv = None
        if self.loss is not None and self.loss.numel() == 1:
            lv = float(self.loss.detach().reshape(()))
            for c in scalar:
                cv = float(c.output.detach())
                if abs(cv - lv) <= 1e-6 * max(1.0, abs(lv)):
                    return c
        if lv is not None:
            for m in self.module_calls:
                mv = float(m.output.detach().reshape(()))
                if abs(mv - lv) <= 1e-6 * max(1.0, abs(lv)):
                    return m
        if scalar:
            return scalar[0]
        if self.calls:
            return self.calls[0]
        if self.loss is not None and self.loss.requires_grad:
            return next((m for m in self.module_calls if m.output.requires_grad), None)
        return None

    @property
    def data_loss(self) -> Tensor | None:
        """The data loss (regularisers left out when we can tell them apart)."""
        call = self.main_call
        if call is not None:
            out = call.output
            return out if out.dim() == 0 else out.mean()
        return self.loss


# ---------------------------------------------------------------------------- RNG and modes
@contextmanager
def preserved_rng() -> Iterator[None]:
    """Save and restore Python, NumPy, torch CPU, every CUDA device and the MPS RNG state."""
    py_state = random.getstate()
    np_state = None
    try:
        import numpy as np

        np_state = np.random.get_state()
    except ImportError:  # pragma: no cover - numpy ships with torch
        np = None  # type: ignore[assignment]
    cpu_state = torch.get_rng_state()
    cuda_states = None
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda_states = torch.cuda.get_rng_state_all()
    mps_state = _mps_rng_state()
    try:
        yield
    finally:
        random.setstate(py_state)
        if np_state is not None:
            np.random.set_state(np_state)
        torch.set_rng_state(cpu_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
        if mps_state is not None:
            torch.mps.set_rng_state(mps_state)


def _mps_rng_state() -> Tensor | None:
    try:
        if torch.backends.mps.is_available():
            return torch.mps.get_rng_state()
    except (AttributeError, RuntimeError):  # pragma: no cover - torch without MPS support
        pass
    return None


def seed_rngs(seed: int) -> None:
    """Seed Python, NumPy, torch's CPU generator and the CUDA generators already in use, for
    reproducible probe steps; call it inside :func:`preserved_rng`.

    Unlike ``torch.manual_seed`` it never queues a seed for a CUDA that has not started (that
    seed would replace the user's own when a later fit starts CUDA, out of reach of
    :func:`preserved_rng`), and leaves other accelerators' generators alone.
    """
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:  # pragma: no cover - numpy ships with torch
        pass
    torch.default_generator.manual_seed(seed)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.manual_seed_all(seed)


@contextmanager
def preserved_modes(module: nn.Module) -> Iterator[None]:
    """Restore every submodule's train/eval flag on exit."""
    modes = [(m, m.training) for m in module.modules()]
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


@contextmanager
def preserved_grads(module: nn.Module) -> Iterator[None]:
    """Restore every parameter's ``.grad`` (the tensor object and its values) on exit."""
    saved = [(p, None if p.grad is None else p.grad.detach().clone()) for p in module.parameters()]
    try:
        yield
    finally:
        for p, g in saved:
            if g is None:
                p.grad = None
            elif p.grad is None:
                p.grad = g
            else:
                p.grad.copy_(g)


@contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Temporarily change ``torch.get_default_dtype()``."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


# ---------------------------------------------------------------------------- model copies
_RECIPE_HOOK_IDS: set[int] = set()


def track_hook(handle: Any) -> Any:
    """Remember a hook handle registered by this package so copies can drop it."""
    _RECIPE_HOOK_IDS.add(handle.id)
    return handle


def untrack_hook(handle: Any) -> None:
    """Remove a hook registered with :func:`track_hook`."""
    _RECIPE_HOOK_IDS.discard(handle.id)
    handle.remove()


class HookSet:
    """The hooks this package attaches for one step (or one probe), removed together.

    Every hook goes through :func:`track_hook`, so model copies made while it is attached drop
    it. Use it as a context manager for a probe, or keep it on the callback and call
    :meth:`remove` when the logging step is over.

    Example::

        with HookSet() as hooks:
            for m in model.modules():
                hooks.forward(m, on_output)
            model(x)
    """

    def __init__(self) -> None:
        self._handles: list[Any] = []

    def forward(self, module: nn.Module, fn: Callable[..., Any], *, pre: bool = False, **kwargs: Any) -> Any:
        """Register a forward hook (``pre=True``: a forward pre-hook) on ``module``."""
        register = module.register_forward_pre_hook if pre else module.register_forward_hook
        handle = track_hook(register(fn, **kwargs))
        self._handles.append(handle)
        return handle

    def remove(self) -> None:
        """Remove every hook of the set (safe to call twice)."""
        handles, self._handles = self._handles, []
        for h in handles:
            untrack_hook(h)

    def __len__(self) -> int:
        return len(self._handles)

    def __bool__(self) -> bool:
        return bool(self._handles)

    def __enter__(self) -> HookSet:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks_with_kwargs",
)


def _strip_recipe_hooks(module: nn.Module) -> None:
    if not _RECIPE_HOOK_IDS:
        return
    for m in module.modules():
        for name in _HOOK_DICTS:
            hooks = m.__dict__.get(name)
            if hooks:
                for hid in list(hooks):
                    if hid in _RECIPE_HOOK_IDS:
                        del hooks[hid]


#: the step methods Lightning replaces with compiled ones on ``trainer.fit(torch.compile(model))``
_COMPILED_STEPS = ("forward", "training_step", "validation_step", "test_step", "predict_step")


def _run_eagerly(clone: nn.Module) -> None:
    """Make a copy of a ``torch.compile``d model run without dynamo.

    * ``torch.compile(submodule)``: the copy's ``OptimizedModule`` keeps its place (parameter
      names keep ``_orig_mod.``, so state dicts still match the real model) but calls the module
      it wraps directly; probing a compiled copy would compile it again for every mode the checks
      use (no_grad, eval, float64, a TorchFunctionMode) and use up dynamo's recompile limit that
      is meant for the user's model.
    * ``trainer.fit(torch.compile(model))``: Lightning puts compiled wrappers of the *original*
      model's bound ``forward`` / ``*_step`` methods in its ``__dict__``; ``deepcopy`` keeps them,
      so the copy's steps would run (and train) the real model. The copy drops them and uses its
      class's methods.
    """
    try:
        from torch._dynamo.eval_frame import OptimizedModule
    except Exception:  # pragma: no cover - torch without dynamo
        return
    for m in clone.modules():
        if isinstance(m, OptimizedModule):
            m.forward = m._orig_mod.__call__
    if clone.__dict__.get("_compiler_ctx"):
        for name in _COMPILED_STEPS:
            clone.__dict__.pop(name, None)
        clone.__dict__["_compiler_ctx"] = None


class _LocalStrategy:
    """The trainer's strategy as a copy sees it: everything reads through, but its collectives
    act as in a world of one process (``all_gather`` and ``reduce`` return the local tensor,
    ``broadcast`` the local object, ``barrier`` returns at once). The checks run the user's step
    on copies a data-dependent number of times per rank (time budgets, retries, steps to
    memorise), so a collective reached from a copy would wait forever for the other ranks."""

    def __init__(self, strategy: Any) -> None:
        object.__setattr__(self, "_strategy", strategy)

    def __getattr__(self, name: str) -> Any:
        return getattr(object.__getattribute__(self, "_strategy"), name)

    def __setattr__(self, name: str, value: Any) -> None:
        pass

    @staticmethod
    def all_gather(tensor: Any, group: Any = None, sync_grads: bool = False) -> Any:
        return tensor

    @staticmethod
    def reduce(tensor: Any, group: Any = None, reduce_op: Any = "mean") -> Any:
        return tensor

    @staticmethod
    def broadcast(obj: Any, src: int = 0) -> Any:
        return obj

    @staticmethod
    def barrier(name: str | None = None) -> None:
        return None

    @staticmethod
    def reduce_boolean_decision(decision: bool, all: bool = True) -> bool:
        return decision


class _SilentTrainer:
    """Stands in for the trainer on a module copy: everything reads through, but no logger is
    reachable (user code on the copy cannot write to the user's logs) and the copy lives in a
    world of one process (rank 0 of 1, a strategy whose collectives stay local), so a probe
    cannot hang the other ranks. ``torch.distributed`` called directly is out of reach."""

    def __init__(self, trainer: Any) -> None:
        object.__setattr__(self, "_trainer", trainer)
        object.__setattr__(self, "strategy", _LocalStrategy(trainer.strategy))

    logger = None
    loggers: tuple = ()
    world_size = 1
    num_nodes = 1
    global_rank = 0
    local_rank = 0
    node_rank = 0
    is_global_zero = True

    def __getattr__(self, name: str) -> Any:
        return getattr(object.__getattribute__(self, "_trainer"), name)

    def __setattr__(self, name: str, value: Any) -> None:
        pass  # a step on a copy must not change the real trainer


def _noop(*args: Any, **kwargs: Any) -> None:
    return None


class _LocalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """A SyncBatchNorm on a copy: normalises with its own batch, calls no collective."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")


def _localize_sync_batchnorm(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.SyncBatchNorm):
            m.__class__ = _LocalBatchNorm


def copy_module(module: nn.Module, trainer: Any | None = None) -> nn.Module:
    """A deep copy of a (Lightning)Module that is safe to run the user's steps on.

    Datasets and data loaders held as attributes are shared, not copied. On the copy,
    ``log``/``log_dict`` do nothing, hooks this package registered are dropped,
    ``self.trainer`` (when given) reads through to the trainer without reaching its loggers, and
    ``SyncBatchNorm`` layers use the local batch only: checks are rank-local, and a copy that
    all-gathers while it fails on one rank only would leave the other ranks waiting.

    A sharded model (FSDP2 ``DTensor`` parameters, FSDP flat parameters, DeepSpeed stage 3) is
    copied unsharded from the full weights that :func:`lightning_recipe._sharded.gather_point`
    gathered at a point every rank reached together; the copy itself never communicates.
    Raises :class:`ProbeSkip` if the model cannot be copied (for a sharded model: no full
    weights gathered for its current state, or beyond the memory budget, with the reason).
    """
    from torch.utils.data import DataLoader, Dataset

    memo: dict[int, Any] = {}
    for value in vars(module).values():
        if isinstance(value, (Dataset, DataLoader)):
            memo[id(value)] = value
    if trainer is not None:
        memo[id(trainer)] = trainer
    _losses.detach_non_leaf_state(module, memo)
    try:
        with preserved_rng():
            if _sharded.kind(module, trainer) is not None:
                clone = _sharded.full_copy(module, memo)
            else:
                clone = copy.deepcopy(module, memo)
    except _sharded.NotGathered as exc:
        raise ProbeSkip(str(exc)) from exc
    except Exception as exc:
        raise ProbeSkip(f"the model could not be deep-copied ({type(exc).__name__}: {exc})") from exc
    _strip_recipe_hooks(clone)
    _run_eagerly(clone)
    _localize_sync_batchnorm(clone)
    for m in clone.modules():
        if hasattr(m, "log_dict") and hasattr(m, "training_step"):
            object.__setattr__(m, "log", _noop)
            object.__setattr__(m, "log_dict", _noop)
            if trainer is not None and "_trainer" in m.__dict__:
                m.__dict__["_trainer"] = _SilentTrainer(trainer)
    return clone


# ---------------------------------------------------------------------------- running steps
#: the step hooks a probe can call, as Lightning calls them
STEP_HOOKS = ("training_step", "validation_step", "test_step", "predict_step")


def call_step(module: nn.Module, hook: str, batch: Any, batch_idx: int = 0, dataloader_idx: int = 0) -> Any:
    """``module.<hook>(...)`` with every signature Lightning accepts.

    * ``step(batch)``, ``step(batch, batch_idx)``, ``step(batch, batch_idx, dataloader_idx)``
      (``dataloader_idx`` passed only when the step asks for it without a default);
    * ``step(dataloader_iter)``: the step gets an iterator yielding ``(batch, batch_idx,
      dataloader_idx)`` once, as Lightning's ``dataloader_iter`` does for one batch.

    Raises :class:`ProbeSkip` when the module has no such step.
    """
    if hook not in STEP_HOOKS:
        raise ValueError(f"`hook` must be one of {STEP_HOOKS}, got {hook!r}")
    step = getattr(module, hook, None)
    if step is None:
        raise ProbeSkip(f"the module has no {hook}; pass step_fn=(model, batch) -> loss")
    try:
        params = inspect.signature(step).parameters
    except (TypeError, ValueError):
        return step(batch, batch_idx)
    if "dataloader_iter" in params:
        return step(iter([(batch, batch_idx, dataloader_idx)]))
    positional = [
        p
        for p in params.values()
        if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]
    var_positional = any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params.values())
    kwargs: dict[str, Any] = {}
    dl = params.get("dataloader_idx")
    if dl is not None and dl.default is inspect.Parameter.empty:
        kwargs["dataloader_idx"] = dataloader_idx
    if len(positional) >= 2 or var_positional:
        return step(batch, batch_idx, **kwargs)
    return step(batch, **kwargs)


def takes_dataloader_iter(module: nn.Module, hook: str = "training_step") -> bool:
    """True when ``module.<hook>`` takes ``dataloader_iter`` (Lightning then hands callbacks no
    batch: ``on_train_batch_start`` gets ``None``)."""
    step = getattr(module, hook, None)
    try:
        return step is not None and "dataloader_iter" in inspect.signature(step).parameters
    except (TypeError, ValueError):
        return False


def peek_train_batch(trainer: Any) -> Any:
    """The first batch of the training data, on the device, read without disturbing the run:
    for steps that take ``dataloader_iter``, where the callbacks get no batch. A fresh iterator
    over ``trainer.train_dataloader`` (the RNG restored afterwards, so the run's own shuffling is
    unchanged) and the strategy's own transfer. Raises :class:`ProbeSkip` when there is none."""
    loader = getattr(trainer, "train_dataloader", None)
    if loader is None:
        raise ProbeSkip("training_step takes dataloader_iter and the training data could not be read")
    try:
        with preserved_rng():
            batch = next(iter(loader))
    except Exception as exc:
        raise ProbeSkip(
            "training_step takes dataloader_iter and reading a first batch failed "
            f"({type(exc).__name__}: {exc})"
        ) from exc
    if isinstance(batch, tuple) and len(batch) == 3 and type(loader).__name__ == "CombinedLoader":
        batch = batch[0]  # CombinedLoader yields (batch, batch_idx, dataloader_idx)
    try:
        return trainer.strategy.batch_to_device(batch, dataloader_idx=0)
    except Exception:
        return batch


def batch_or_peek(trainer: Any, module: nn.Module, batch: Any) -> Any:
    """The batch a training-batch hook got, or for ``training_step(self, dataloader_iter)``
    (where Lightning hands callbacks ``None``) the first training batch, read once per fit and
    shared by every callback (:func:`peek_train_batch`). Raises :class:`ProbeSkip` if unreadable."""
    if batch is not None or trainer is None or not takes_dataloader_iter(module):
        return batch
    state = _context.trainer_state(trainer)
    if state.peeked_batch is None:
        state.peeked_batch = peek_train_batch(trainer)
    return state.peeked_batch


def call_training_step(module: nn.Module, batch: Any, batch_idx: int = 0) -> Any:
    """``module.training_step`` as Lightning would call it (see :func:`call_step`)."""
    return call_step(module, "training_step", batch, batch_idx)


def find_loss(output: Any) -> Tensor | None:
    """The loss in what a step returned, or ``None``: a tensor, a mapping with a tensor under
    ``"loss"``, or an object with a tensor ``.loss`` attribute (Hugging Face style outputs).
    A ``None`` return (the step skipped the batch) or anything else gives ``None``."""
    if output is None:
        return None
    if isinstance(output, Tensor):
        return output
    loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
    return loss if isinstance(loss, Tensor) else None


def extract_loss(output: Any) -> Tensor | None:
    """The loss in a ``training_step`` return value (:func:`find_loss`); ``None`` for ``None``.
    Raises :class:`ProbeSkip` for a return value that holds no loss tensor."""
    if output is None:
        return None
    loss = find_loss(output)
    if loss is not None:
        return loss
    if isinstance(output, Mapping):
        raise ProbeSkip("training_step returned a dict without a tensor under 'loss'")
    raise ProbeSkip(f"training_step returned a {type(output).__name__}, not a loss tensor")


def run_step(module: nn.Module, batch: Any, step_fn: StepFn | None = None, batch_idx: int = 0) -> StepResult:
    """Run one step (the user's ``training_step`` or ``step_fn``) and capture its loss calls.

    When no loss call explains the loss (a plain Python loss function), the step itself becomes
    the loss call (``_losses.step_call``): the model's forward output is the prediction, and
    ``recompute`` reruns the step with it replaced (never on a model whose loss call was seen)."""

    def step() -> Any:
        return step_fn(module, batch) if step_fn is not None else call_training_step(module, batch, batch_idx)

    with LossCapture(module) as capture:
        out = step()
    result = capture.result(extract_loss(out))
    name = "step_fn" if step_fn is not None else "training_step"
    result.module_calls += _losses.unexplained_step(
        capture.modules, result, module, batch, name, find_loss, step
    )
    return result


def call_validation_step(module: nn.Module, batch: Any, batch_idx: int = 0) -> Any:
    """``module.validation_step`` as Lightning would call it (see :func:`call_step`)."""
    return call_step(module, "validation_step", batch, batch_idx)


def capture_step(
    module: nn.Module, hook: str, batch: Any, batch_idx: int = 0, step_fn: StepFn | None = None
) -> StepResult:
    """Run ``step_fn(module, batch)`` when given, else ``module.<hook>`` (:func:`call_step`), under
    a :class:`LossCapture`: the loss calls it made and the loss it returned (:func:`find_loss`).

    Unlike :func:`run_step` it accepts any return value: a ``validation_step`` that returns
    nothing, or only metrics, gives ``loss=None`` and its loss calls still count.
    """

    def step() -> Any:
        return step_fn(module, batch) if step_fn is not None else call_step(module, hook, batch, batch_idx)

    with LossCapture(module) as capture:
        out = step()
    result = capture.result(find_loss(out))
    name = "step_fn" if step_fn is not None else hook
    result.module_calls += _losses.unexplained_step(
        capture.modules, result, module, batch, name, find_loss, step
    )
    return result


def has_own_validation_step(module: nn.Module) -> bool:
    own = getattr(type(module), "validation_step", None)
    if own is None:
        return False
    try:
        from lightning.pytorch import LightningModule
    except ImportError:  # pragma: no cover - lightning is a dependency
        return True
    return own is not getattr(LightningModule, "validation_step", None)


class EvalStep:
    """Runs the user's step on a validation batch to read its loss: ``step_fn`` when given, else
    the module's own ``validation_step`` when it makes a loss call (it computes what the user
    calls the validation loss, without the augmentation, mixup or masking a ``training_step``
    may add), else ``training_step``. The choice is made on the first batch and kept, so real
    and zeroed inputs always go through the same step.
    """

    def __init__(self, step_fn: StepFn | None = None) -> None:
        self.step_fn = step_fn
        self.mode: str | None = "step_fn" if step_fn is not None else None

    @property
    def name(self) -> str:
        return self.mode or "training_step"

    def __call__(self, module: nn.Module, batch: Any) -> StepResult:
        if self.mode is None:
            try:
                result = self._validation(module, batch)
            except Exception:
                result = None
            self.mode = "validation_step" if result is not None else "training_step"
            if result is not None:
                return result
        if self.mode == "validation_step":
            result = self._validation(module, batch)
            if result is None:
                raise ProbeSkip("validation_step made no loss call on this batch")
            return result
        if self.step_fn is None and is_manual_optimization(module):
            raise ProbeSkip(
                "the module uses manual optimisation, so its training_step steps the optimizers, and "
                "its validation_step makes no loss call; pass step_fn=lambda model, batch: loss"
            )
        return run_step(module, batch, self.step_fn)

    @staticmethod
    def _validation(module: nn.Module, batch: Any) -> StepResult | None:
        if not has_own_validation_step(module):
            return None
        with LossCapture(module) as capture:
            out = call_validation_step(module, batch)
        if capture.calls:
            return capture.result(extract_loss(out))
        result = capture.result(find_loss(out))
        return result if result.module_calls and result.main_call is not None else None


def is_manual_optimization(module: nn.Module) -> bool:
    """True for a LightningModule with ``automatic_optimization = False``."""
    return getattr(module, "automatic_optimization", True) is False


# ---------------------------------------------------------------------------- reading losses
@dataclass
class ClassScores:
    """Class scores and integer targets from a classification loss call, flattened to (N, C)."""

    scores: Tensor  # (N, C)
    target: Tensor | None  # (N,) integer classes, or None (probability targets)
    num_classes: int
    class_dim: int


def class_scores(call: LossCall) -> ClassScores | None:
    """View a classification loss call as (N, C) scores; ``None`` if it is not one."""
    if call.name not in CLASS_LOSSES:
        return None
    x = call.input.detach()
    if x.dim() == 1:  # unbatched (C,)
        x = x.unsqueeze(0)
        tgt = call.target.reshape(1) if isinstance(call.target, Tensor) else None
        return ClassScores(x, tgt, x.shape[1], 1)
    if x.dim() < 2:
        return None
    c = x.shape[1]
    scores = x.movedim(1, -1).reshape(-1, c)
    target = call.target if isinstance(call.target, Tensor) else None
    if target is not None and not target.is_floating_point():
        target = target.reshape(-1)
        if target.numel() != scores.shape[0]:
            target = None
    elif target is not None:
        target = None  # probability targets: no integer classes
    return ClassScores(scores, target, c, 1)


# ---------------------------------------------------------------------------- know-nothing reference
#: the reference kinds :func:`know_nothing` returns
CHANCE, MEAN_PREDICTOR = _losses.CHANCE, _losses.MEAN_PREDICTOR


def chance_input(call: LossCall) -> Tensor | None:
    """The prediction of a classifier that knows nothing (uniform over the classes) in the input
    format of the loss in ``call``; ``None`` for other losses."""
    x = call.input.detach()
    if call.name in ("cross_entropy", "multi_margin_loss", "binary_cross_entropy_with_logits"):
        return torch.zeros_like(x)
    if call.name == "nll_loss":
        c = x.shape[1] if x.dim() > 1 else x.shape[0]
        return torch.full_like(x, -math.log(c))
    if call.name == "binary_cross_entropy":
        return torch.full_like(x, 0.5)
    return None


def know_nothing(call: LossCall | ModuleLossCall | None) -> tuple[Tensor, str] | None:
    """The know-nothing prediction for the loss in ``call`` and which reference it is: uniform
    class scores (:data:`CHANCE`) for classification losses, the target mean
    (:data:`MEAN_PREDICTOR`) for regression losses with float targets; ``None`` otherwise."""
    if call is None or not isinstance(call, LossCall):
        return None
    base = chance_input(call)
    if base is not None:
        return base, CHANCE
    target = call.target
    if (
        call.name in REGRESSION_LOSSES
        and isinstance(target, Tensor)
        and target.is_floating_point()
        and target.numel() > 0
    ):
        mean = target.detach().float().mean().to(call.input.dtype)
        return mean.expand_as(call.input.detach()), MEAN_PREDICTOR
    return None


def know_nothing_loss(call: LossCall | ModuleLossCall | None) -> tuple[Tensor, str] | None:
    """The loss of :func:`know_nothing`'s prediction through the same loss call (same target,
    weights, reduction), and which reference it is; for any other loss (a custom module, a
    metric, a distribution's likelihood, a functional loss without a known chance level) the
    user's own loss with the prediction replaced by a constant (``_losses.know_nothing_loss``:
    the target mean, uniform class scores or the batch-mean prediction, the lowest); ``None``
    when there is none."""
    if call is None:
        return None
    ref = know_nothing(call) if isinstance(call, LossCall) else None
    if ref is None:
        return _losses.know_nothing_loss(call)
    with torch.no_grad():
        return call.recompute(ref[0]), ref[1]


def rounding_eps(dtype: torch.dtype) -> float:
    """Machine epsilon of a floating dtype (float32's for anything else): the relative rounding
    step that tolerances on values computed in that dtype must allow for."""
    try:
        return float(torch.finfo(dtype).eps) if dtype.is_floating_point else float(torch.finfo().eps)
    except TypeError:
        return float(torch.finfo().eps)


def looks_like_probabilities(call: LossCall) -> dict[str, float] | None:
    """Evidence that a loss expecting logits / log-probabilities got probabilities.

    ``cross_entropy`` and ``multi_margin_loss`` expect logits, ``nll_loss`` log-probabilities:
    rows that lie in [0, 1] and sum to 1 are a softmax output (raw scores never do that).
    ``binary_cross_entropy_with_logits`` expects logits; values alone cannot tell a sigmoid
    output from small logits at init, so it is flagged only when the input is the output of a
    ``sigmoid`` call seen during the step.
    Rows must sum to 1 within ``max(1e-3, 2 * eps)`` of the input's dtype: probabilities rounded
    to bfloat16 (eps 2^-7) sum to 1 only within eps / 2.
    Returns ``None`` when the input does not look like probabilities.
    """
    x = call.input.detach().float()
    if x.numel() == 0 or not bool(torch.isfinite(x).all()):
        return None
    lo, hi = float(x.min()), float(x.max())
    if call.name in CLASS_LOSSES:
        view = class_scores(call)
        if view is None or view.num_classes < 2:
            return None
        sums = view.scores.float().sum(dim=1)
        smin, smax = float(sums.min()), float(sums.max())
        tol = max(1e-3, 2 * rounding_eps(call.input.dtype))
        if lo >= -1e-6 and hi <= 1 + 1e-6 and abs(smin - 1) < tol and abs(smax - 1) < tol:
            return {"min": lo, "max": hi, "row_sum_min": smin, "row_sum_max": smax}
        return None
    squashed = call.name == "binary_cross_entropy_with_logits" and call.squashed_by == "sigmoid"
    if squashed and lo >= 0.0 and hi <= 1.0:
        return {"min": lo, "max": hi, "count": float(x.numel()), "produced_by": "sigmoid"}
    return None
