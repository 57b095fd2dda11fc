"""Model copies that are safe to run the user's steps on, and the hooks this package attaches."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import Any

from torch import Tensor, nn

from lightning_recipe import _losses, _sharded
from lightning_recipe._probe.base import ProbeSkip
from lightning_recipe._probe.state import preserved_rng

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


class _Absorb:
    """The logger a step sees on a copy: every attribute, call, item and ``with`` is taken and
    does nothing, so ``self.logger.experiment.add_image(...)`` in a step runs on a probe without
    writing to the user's logs."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return self

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self

    def __getitem__(self, key: Any) -> Any:
        return self

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *args: Any) -> bool:
        return False

    def __iter__(self) -> Iterator[Any]:
        return iter(())


class _SilentTrainer:
    """Stands in for the trainer on a module copy: everything reads through, but no logger is
    reachable (``logger`` takes every call and does nothing; ``loggers`` is empty: user code on the
    copy cannot write to the user's logs) and the copy lives in a world of one process (rank 0 of
    1, a strategy whose collectives stay local), so a probe cannot hang the other ranks.
    ``torch.distributed`` called directly is out of reach."""

    def __init__(self, trainer: Any) -> None:
        object.__setattr__(self, "_trainer", trainer)
        object.__setattr__(self, "strategy", _LocalStrategy(trainer.strategy))

    logger = _Absorb()
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
    own = module.__dict__.get("_trainer")
    if own is not None:  # the trainer the module points at is shared, never deep-copied
        memo[id(own)] = own
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
