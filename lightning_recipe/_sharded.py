"""Seeing the whole model when it is sharded (FSDP2 / ``ModelParallelStrategy``, FSDP, DeepSpeed).

Under a sharding strategy each rank holds a shard of every parameter (and gradient):

* FSDP2 (``fully_shard``, Lightning's ``ModelParallelStrategy``): parameters are ``DTensor``\\ s
  sharded on dim 0 over the data-parallel mesh; ``to_local()`` is this rank's rows.
* FSDP (``FSDPStrategy``, ``use_orig_params=True``): every original parameter is a 1-D view of
  this rank's part of a flat parameter (possibly empty).
* DeepSpeed stage 3: ``param.ds_tensor`` is this rank's partition (``param`` itself is empty);
  stage 2 keeps full parameters (only gradients and optimizer states are partitioned).

This module holds the shard-aware helpers the callbacks share, found by duck typing (no import of
FSDP or DeepSpeed unless the model uses them):

* :func:`local` / :func:`share`: a tensor's local shard, and its part of the squared norm of the
  whole tensor; :func:`all_reduce_sum` adds those parts over the ranks in **one** collective, so
  a monitor computes the norms of all its tensors with one all-reduce per logging step.
* :func:`gather_point` / :func:`full_copy`: the full (unsharded) weights gathered once at a point
  every rank reaches together (fit start, the first batch, a validation run), then a plain
  unsharded copy of the module made from them on each rank without any communication, so the
  one-shot checks and the probes run in a world of one process as they do under DDP. The gather
  is bounded by :func:`copy_budget_mb` (``LIGHTNING_RECIPE_SHARDED_COPY_MB``, default 4096 MB of
  full weights, and half the free GPU memory on CUDA); beyond it the checks skip and say how much
  memory they would need.
* :func:`local_snapshot` / :func:`restore_local`: a copy of each rank's own shards (best weights
  of early stopping, snapshots), kept sharded and loaded back shard by shard, without
  communication.

Every collective here is called only from hooks that every rank reaches at the same point, and
only when there is something to measure (a logging step, a first batch, a validation run).
"""

from __future__ import annotations

import copy
import os
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

#: default bound on the full weights gathered for the one-shot checks, per rank
DEFAULT_COPY_BUDGET_MB = 4096.0
ENV_BUDGET = "LIGHTNING_RECIPE_SHARDED_COPY_MB"
_STRATEGY_WORDS = ("fsdp", "deepspeed", "modelparallel")


class NotGathered(Exception):
    """No full copy can be made of a sharded module at this point; the message says why."""


# ---------------------------------------------------------------------------- detection
def is_dtensor(t: Any) -> bool:
    """A ``torch.distributed.tensor.DTensor`` (duck-typed: ``to_local`` and ``placements``)."""
    return isinstance(t, Tensor) and hasattr(t, "to_local") and hasattr(t, "placements")


def _is_ds_param(t: Any) -> bool:
    return isinstance(t, Tensor) and hasattr(t, "ds_tensor") and hasattr(t, "ds_id")


def _fsdp1_modules(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if type(m).__name__ == "FullyShardedDataParallel"]


def sharded_strategy(trainer: Any) -> bool:
    """True for a strategy whose class name says it shards (FSDP, DeepSpeed, ModelParallel)."""
    name = type(getattr(trainer, "strategy", None)).__name__.lower()
    return any(word in name for word in _STRATEGY_WORDS)


def _root(trainer: Any, module: nn.Module) -> nn.Module:
    """The module that owns the parameters: FSDP1 and DeepSpeed wrap the LightningModule."""
    wrapped = getattr(getattr(trainer, "strategy", None), "model", None)
    return wrapped if isinstance(wrapped, nn.Module) else module


def kind(module: nn.Module, trainer: Any | None = None) -> str | None:
    """``"dtensor"`` (FSDP2 / tensor parallel), ``"fsdp"`` (flat parameters), ``"deepspeed"``
    (stage-3 partitions) or ``None`` when the parameters of ``module`` are whole on every rank."""
    params = list(module.parameters())
    fsdp2 = _fsdp2_class()
    if any(is_dtensor(p) for p in params):
        return "dtensor"
    if fsdp2 is not None and any(isinstance(m, fsdp2) for m in module.modules()):
        return "dtensor"  # FSDP2 after a forward without backward: whole tensors registered
    if any(_is_ds_param(p) for p in params):
        return "deepspeed"
    owner = _root(trainer, module) if trainer is not None else module
    if _fsdp1_modules(owner) or any(type(p).__name__ == "FlatParameter" for p in params):
        return "fsdp"
    return None


def world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def _rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


# ---------------------------------------------------------------------------- local shards and norms
def full(t: Tensor) -> Tensor:
    """The whole of ``t``: a DTensor's ``full_tensor()`` (a collective: every rank must call it
    at the same point), anything else as it is."""
    return t.full_tensor() if is_dtensor(t) else t


def ensure_resharded(module: nn.Module) -> None:
    """FSDP2 leaves a module unsharded after a forward without backward (validation), with
    plain full tensors registered in place of its ``DTensor`` parameters until the next
    forward; reshard it (local: frees the gathered copy, values unchanged) so that the
    registered parameters are the sharded ones the optimizer steps."""
    fsdp2 = _fsdp2_class()
    if fsdp2 is None:
        return
    if all(is_dtensor(p) for p in module.parameters()):
        return
    for m in module.modules():  # a module's FSDP group may hold its children's parameters
        if isinstance(m, fsdp2):
            m.reshard()


def local(t: Tensor) -> Tensor:
    """This rank's part of ``t``: a DTensor's local shard, a DeepSpeed partition, else ``t``."""
    if is_dtensor(t):
        return t.to_local()
    if _is_ds_param(t) and t.numel() == 0:
        return t.ds_tensor
    return t


def shards(t: Tensor, kind_: str | None) -> int:
    """Over how many ranks the elements of ``t`` are spread (1: every rank holds all of it)."""
    if is_dtensor(t):
        n = 1
        mesh = t.device_mesh
        for dim, placement in enumerate(t.placements):
            if placement.is_shard():
                n *= mesh.size(dim)
        return n
    if kind_ in ("fsdp", "deepspeed") and not (kind_ == "deepspeed" and not _is_ds_param(t)):
        return world_size()
    return 1


def share(local_norms: Tensor, tensors: Sequence[Tensor], kind_: str | None) -> Tensor:
    """Each rank's part of the squared norms of the whole tensors: ``local_norm**2`` for a
    tensor spread over every rank, divided by the number of ranks that hold the same elements
    (a tensor replicated on every rank counts once in the sum). Add the parts over the ranks
    with :func:`all_reduce_sum` and take the square root."""
    world = world_size()
    weights = torch.tensor(
        [shards(t, kind_) / world for t in tensors], device=local_norms.device, dtype=torch.float32
    )
    return local_norms.float().square() * weights


def all_reduce_sum(vec: Tensor) -> Tensor:
    """Sum ``vec`` over every rank in place (one collective); a no-op in a world of one."""
    if world_size() > 1:
        torch.distributed.all_reduce(vec, op=torch.distributed.ReduceOp.SUM)
    return vec


def pack_samples(samples: Sequence[Tensor], total: int, device: torch.device) -> tuple[Tensor, int]:
    """Histogram samples of sharded tensors, ready to travel in the all-reduce of the norms: each
    rank puts a subsample of its shard (at most ``total / world`` values) in its own slot of a
    zero vector, NaN-padded; summed over the ranks, every slot holds one rank's values (the
    histograms leave NaN out). Returns the vector and the slot length."""
    world, me = world_size(), _rank()
    per = max(1, -(-total // world))
    out = torch.zeros(len(samples) * world * per, device=device, dtype=torch.float32)
    for i, sample in enumerate(samples):
        flat = sample.detach().reshape(-1).float().to(device)
        if flat.numel() > per:
            stride = -(-flat.numel() // per)
            flat = flat[::stride][:per]
        start = (i * world + me) * per
        out[start : start + per] = float("nan")
        out[start : start + flat.numel()] = flat
    return out, per


def unpack_samples(vec: Tensor, count: int, per: int) -> list[Tensor]:
    """The whole-tensor samples out of a summed :func:`pack_samples` vector."""
    size = world_size() * per
    return [vec[i * size : (i + 1) * size] for i in range(count)]


def global_nbytes(t: Tensor, kind_: str | None) -> int:
    """Bytes of the whole tensor (the same number on every rank)."""
    if is_dtensor(t):
        return t.numel() * t.element_size()
    if _is_ds_param(t):
        return int(getattr(t, "ds_numel", t.numel())) * t.element_size()
    return local(t).numel() * t.element_size() * (shards(t, kind_) if kind_ == "fsdp" else 1)


# ---------------------------------------------------------------------------- full copies
def copy_budget_mb() -> float:
    """The most full weights (MB, per rank) gathered for the one-shot checks: the environment
    variable ``LIGHTNING_RECIPE_SHARDED_COPY_MB``, else 4096."""
    raw = os.environ.get(ENV_BUDGET)
    try:
        return float(raw) if raw else DEFAULT_COPY_BUDGET_MB
    except ValueError:
        return DEFAULT_COPY_BUDGET_MB


@dataclass
class _Gathered:
    key: tuple
    tensors: dict[int, Tensor] = field(default_factory=dict)  # id(param) -> full tensor
    versions: dict[int, int] = field(default_factory=dict)  # id(param) -> local shard version
    nbytes: int = 0


_GATHERED: weakref.WeakKeyDictionary[nn.Module, _Gathered] = weakref.WeakKeyDictionary()
_REFUSED: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()
#: what the last gathers cost, for the report (bytes of full weights, time)
stats: dict[str, Any] = {}


def _version(t: Tensor) -> int:
    try:
        return int(local(t)._version)
    except (AttributeError, RuntimeError):
        return -1


def full_nbytes(module: nn.Module, trainer: Any | None = None) -> int:
    kind_ = kind(module, trainer)
    return sum(global_nbytes(p, kind_) for p in module.parameters())


def gather_point(trainer: Any, module: nn.Module, need: bool = True) -> bool:
    """Gather the full weights of a sharded ``module`` for :func:`full_copy`: a collective, so
    every rank must call it at the same point (with the same ``need``; ``need=False``: nothing).

    A no-op when the parameters are not sharded, when the weights were already gathered at this
    global step of this fit, or when the full weights exceed :func:`copy_budget_mb` (then
    :func:`full_copy` raises :class:`NotGathered` with the memory it would need). Returns True
    when it gathered (the caller may :func:`release` them when done).
    """
    if not need:
        return False
    kind_ = kind(module, trainer)
    if kind_ is None:
        return False
    key = (id(trainer), int(getattr(trainer, "global_step", 0)))
    held = _GATHERED.get(module)
    if held is not None and held.key == key:
        return False
    _GATHERED.pop(module, None)
    _REFUSED.pop(module, None)
    nbytes = full_nbytes(module, trainer)
    mb = nbytes / 2**20
    budget = copy_budget_mb()
    free_mb = free_device_mb(module)
    if mb > budget or (free_mb is not None and mb > free_mb / 2):
        limit = budget if mb > budget else free_mb / 2
        _REFUSED[module] = (
            f"an unsharded copy of the sharded model needs {mb:.0f} MB of full weights per rank (plus "
            f"as much again for the probe's working copy), beyond the {limit:.0f} MB allowed "
            f"(set {ENV_BUDGET} to raise it)"
        )
        return False
    import time

    start = time.perf_counter()
    gathered = _Gathered(key=key, nbytes=nbytes)
    params = list(dict.fromkeys(module.parameters()))
    if kind_ == "dtensor":
        with torch.no_grad():
            for p in params:
                if is_dtensor(p):  # a plain tensor here is whole already: copied when needed
                    gathered.tensors[id(p)] = p.full_tensor().detach()
                    gathered.versions[id(p)] = _version(p)
    else:
        _gather_by_context(trainer, module, params, kind_, gathered)
    _GATHERED[module] = gathered
    stats.update(
        {
            "full_weights_mb": mb,
            "gathers": int(stats.get("gathers", 0)) + 1,
            "last_gather_seconds": time.perf_counter() - start,
        }
    )
    return True


@contextmanager
def gathered(trainer: Any, module: nn.Module, need: bool) -> Iterator[None]:
    """The full weights of a sharded ``module`` gathered for the block and freed after it (if
    this call gathered them). ``need`` may differ between ranks: they agree first (one boolean
    all-reduce), then gather together. Nothing at all happens when the model is not sharded, so
    under DDP no collective is added. Every rank must enter the block at the same point."""
    if kind(module, trainer) is None:
        yield
        return
    need = bool(trainer.strategy.reduce_boolean_decision(bool(need), all=False))
    fresh = gather_point(trainer, module, need)
    try:
        yield
    finally:
        if fresh:
            release(module)


def _gather_by_context(
    trainer: Any, module: nn.Module, params: list[Tensor], kind_: str, gathered: _Gathered
) -> None:
    """FSDP (flat parameters) and DeepSpeed stage 3: summon the full parameters with the
    framework's own context manager (a collective) and clone them."""
    if kind_ == "fsdp":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        root = _root(trainer, module)
        context: Any = FSDP.summon_full_params(root, writeback=False, recurse=True)
    else:
        import deepspeed  # type: ignore[import-not-found]

        context = deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    with context, torch.no_grad():
        for p in params:
            gathered.tensors[id(p)] = p.detach().clone()
            gathered.versions[id(p)] = -2  # checked by the context, not by versions


@contextmanager
def adopted(module: nn.Module, state: Mapping[str, Tensor]) -> Iterator[None]:
    """Within the block, :func:`full_copy` (hence ``copy_module``) copies a sharded ``module``
    with the whole tensors of ``state`` (by parameter name, e.g. from :func:`full_state`)
    instead of gathered weights: no communication, so it also works after fit, on one rank."""
    previous = _GATHERED.get(module)
    entry = _Gathered(key=("adopted",))
    for n, p in module.named_parameters():
        if is_dtensor(p) and n in state:
            entry.tensors[id(p)] = state[n].to(local(p).device)
            entry.versions[id(p)] = _version(p)
    _GATHERED[module] = entry
    try:
        yield
    finally:
        if previous is not None:
            _GATHERED[module] = previous
        else:
            _GATHERED.pop(module, None)


def release(module: nn.Module) -> None:
    """Free the gathered full weights of ``module`` (local, no communication)."""
    _GATHERED.pop(module, None)


def release_stale(trainer: Any, module: nn.Module) -> None:
    """Free the gathered weights once training has moved past the step they were gathered at."""
    held = _GATHERED.get(module)
    if held is not None and held.key != (id(trainer), int(getattr(trainer, "global_step", 0))):
        _GATHERED.pop(module, None)


def is_gathered(module: nn.Module) -> bool:
    return module in _GATHERED


def free_device_mb(module: nn.Module) -> float | None:
    """Free memory in MB of the CUDA device holding ``module``'s parameters; ``None`` off CUDA."""
    p = next(iter(module.parameters()), None)
    if p is None or p.device.type != "cuda":
        return None
    try:
        free, _ = torch.cuda.mem_get_info(p.device)
    except RuntimeError:
        return None
    return free / 2**20


def full_copy(module: nn.Module, memo: dict[int, Any]) -> nn.Module:
    """A plain (unsharded) deep copy of a sharded ``module`` from the weights gathered by
    :func:`gather_point` (no communication). Raises :class:`NotGathered` when there are none
    for the current weights (not gathered at this point, over the budget, or changed since)."""
    kind_ = kind(module)
    refused = _REFUSED.get(module)
    held = _GATHERED.get(module)
    if held is None:
        raise NotGathered(
            refused
            or "the full weights of the sharded model were not gathered at this point of the fit "
            "(they are gathered at fit start, on the first batch and at validation runs)"
        )
    params = list(dict.fromkeys(module.parameters()))
    for p in params:
        if is_dtensor(p) and (id(p) not in held.tensors or held.versions[id(p)] != _version(p)):
            raise NotGathered("the sharded model's weights changed since they were gathered")
        if not is_dtensor(p) and kind_ != "dtensor" and id(p) not in held.tensors:
            raise NotGathered("the sharded model's weights changed since they were gathered")
    restore: list[tuple[nn.Module, type]] = []
    fsdp2 = _fsdp2_class()
    try:
        for m in module.modules():
            if fsdp2 is not None and isinstance(m, fsdp2):
                restore.append((m, type(m)))
                m.__class__ = plain_type(m)
            for value in vars(m).values():  # device meshes and FSDP states are shared, not copied
                if _shared_by_copy(value):
                    memo[id(value)] = value
            for v in m.__dict__.values():
                if isinstance(v, dict):
                    for item in v.values():
                        if _shared_by_copy(item):
                            memo[id(item)] = item
        for p in params:
            whole = held.tensors.get(id(p), p)  # FSDP2: a plain registered tensor is whole
            memo[id(p)] = nn.Parameter(whole.detach().clone(), requires_grad=p.requires_grad)
        for b in module.buffers():
            if is_dtensor(b):
                memo[id(b)] = b.full_tensor().clone()
        clone = copy.deepcopy(module, memo)
    finally:
        for m, cls in restore:
            m.__class__ = cls
    _strip_sharding(clone)
    if kind_ == "fsdp" and _fsdp1_modules(clone):
        raise NotGathered(
            "the model holds nested FullyShardedDataParallel wrappers; a copy cannot unwrap them"
        )
    return clone


def plain_type(module: nn.Module) -> type:
    """The module's own class (FSDP2 swaps in a subclass named ``FSDP<Class>``)."""
    fsdp2 = _fsdp2_class()
    if fsdp2 is not None and isinstance(module, fsdp2):
        return next(b for b in type(module).__mro__[1:] if not issubclass(b, fsdp2))
    return type(module)


def _fsdp2_class() -> type | None:
    try:
        from torch.distributed.fsdp import FSDPModule

        return FSDPModule
    except ImportError:  # pragma: no cover - torch < 2.6
        return None


def _shared_by_copy(value: Any) -> bool:
    name = type(value).__name__
    module = type(value).__module__ or ""
    return name == "DeviceMesh" or (
        module.startswith("torch.distributed") and name in ("FSDPState", "_FSDPState")
    )


_HOOK_DICTS = (
    ("_forward_pre_hooks", ("_forward_pre_hooks_with_kwargs",)),
    ("_forward_hooks", ("_forward_hooks_with_kwargs", "_forward_hooks_always_called")),
    ("_backward_pre_hooks", ()),
    ("_backward_hooks", ()),
    ("_state_dict_hooks", ()),
    ("_state_dict_pre_hooks", ()),
    ("_load_state_dict_pre_hooks", ()),
    ("_load_state_dict_post_hooks", ()),
)
_SHARDING_MODULES = ("torch.distributed.fsdp", "torch.distributed._composable", "torch.distributed.tensor")


def _from_sharding(hook: Any) -> bool:
    fn = getattr(hook, "func", hook)  # functools.partial
    owner = getattr(fn, "__self__", None)
    names = [getattr(fn, "__module__", None) or "", type(owner).__module__ if owner is not None else ""]
    return any(n.startswith(_SHARDING_MODULES) for n in names)


def _strip_sharding(clone: nn.Module) -> None:
    """Drop what the sharding framework attached to the copy's modules: its hooks and state."""
    for m in clone.modules():
        d = m.__dict__
        for name, companions in _HOOK_DICTS:
            hooks = d.get(name)
            if not hooks:
                continue
            for hid in [h for h, fn in hooks.items() if _from_sharding(getattr(fn, "hook", fn))]:
                del hooks[hid]
                for companion in companions:
                    d.get(companion, {}).pop(hid, None)
        for key in [k for k in d if k.startswith("__composable_api_state_key")]:
            del d[key]
        for key in ("_is_fsdp_managed_module", "_fsdp_use_orig_params"):
            d.pop(key, None)


# ---------------------------------------------------------------------------- sharded snapshots
def local_snapshot(params: Iterable[Tensor], device: torch.device | str | None = None) -> list[Tensor]:
    """A copy of this rank's shard of every parameter (no communication): the memory of the
    model divided by the number of ranks."""
    with torch.no_grad():
        return [local(p).detach().to(device or local(p).device, copy=True) for p in params]


def restore_local(params: Iterable[Tensor], saved: Sequence[Tensor]) -> None:
    """Load shards saved by :func:`local_snapshot` back into the same parameters, in place."""
    with torch.no_grad():
        for p, s in zip(params, saved):
            local(p).copy_(s.to(local(p).device))


def local_state(module: nn.Module) -> dict[str, Tensor]:
    """This rank's shard of every parameter and buffer, by name (views: copy them to keep them).
    FSDP2 modules left unsharded by a forward without backward are resharded first, so the
    shards have the same layout whenever they are taken."""
    ensure_resharded(module)
    out = {n: local(p.detach()) for n, p in module.named_parameters()}
    out.update({n: local(b) for n, b in module.named_buffers()})
    return out


def restore_local_state(module: nn.Module, state: Mapping[str, Tensor]) -> None:
    """Load shards taken by :func:`local_state` back in place, rank by rank (no collective)."""
    ensure_resharded(module)
    with torch.no_grad():
        for n, t in [*module.named_parameters(), *module.named_buffers()]:
            if n in state:
                local(t).copy_(state[n].to(local(t).device))


def full_state(module: nn.Module, shards: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
    """The whole tensors of a state taken by :func:`local_state` (default: the module's current
    one), by name, ready for ``load_state_dict`` on an unsharded copy. A collective per sharded
    tensor (FSDP2 ``DTensor`` only): every rank must call it at the same point. Raises
    :class:`NotGathered` for other kinds of sharding."""
    kind_ = kind(module)
    if kind_ not in (None, "dtensor"):
        raise NotGathered(f"whole tensors cannot be rebuilt from {kind_} shards")
    ensure_resharded(module)
    shards = local_state(module) if shards is None else shards
    persistent = set(module.state_dict().keys())  # what load_state_dict expects
    from torch.distributed.tensor import DTensor

    out: dict[str, Tensor] = {}
    with torch.no_grad():
        for n, t in [*module.named_parameters(), *module.named_buffers()]:
            if n not in shards or n not in persistent:
                continue
            if is_dtensor(t):
                whole = DTensor.from_local(
                    shards[n].to(local(t).device),
                    device_mesh=t.device_mesh,
                    placements=t.placements,
                    shape=t.shape,
                    stride=t.stride(),
                    run_check=False,
                )
                out[n] = whole.full_tensor()
            else:
                out[n] = shards[n]
    return out


def ema_update_local(
    ema: dict[str, Tensor] | None, module: nn.Module, decay: float, device: torch.device | str | None = None
) -> dict[str, Tensor]:
    """Exponential moving average of the module's floating-point shards, kept sharded: each rank
    averages its own shard (1/world of the model, no collective). The first call copies.
    :func:`full_state` turns it into whole tensors when the average is evaluated."""
    current = local_state(module)
    if ema is None or ema.keys() != current.keys():
        return {n: t.detach().to(device or t.device, copy=True) for n, t in current.items()}
    with torch.no_grad():
        for n, t in current.items():
            if t.is_floating_point():
                ema[n].lerp_(t.to(ema[n].device, ema[n].dtype), 1.0 - decay)
            else:
                ema[n].copy_(t)
    return ema


def describe(module: nn.Module, trainer: Any | None = None) -> dict[str, Any]:
    """Figures for the report: how the model is sharded and what a full copy costs."""
    kind_ = kind(module, trainer)
    return {
        "sharding": kind_,
        "full_weights_mb": full_nbytes(module, trainer) / 2**20,
        "local_weights_mb": sum(local(p).numel() * p.element_size() for p in module.parameters()) / 2**20,
        "world_size": world_size(),
        "copy_budget_mb": copy_budget_mb(),
    }
