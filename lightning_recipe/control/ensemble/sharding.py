"""The checkpoint ensemble of a sharded model (FSDP2 / ``ModelParallelStrategy``: ``DTensor`` weights).

Snapshots and the EMA are kept as each rank's own shards (:func:`lightning_recipe._sharded.local_state`,
:func:`~lightning_recipe._sharded.ema_update_local`): 1/world of the model each, no communication
during training. At an evaluation every rank rebuilds each member's whole tensors at the same
point (:func:`~lightning_recipe._sharded.full_state`: one all-gather per sharded tensor per
member) and makes a plain unsharded copy from them without communication
(:func:`~lightning_recipe._sharded.adopted` + ``copy_module``), so each rank evaluates its own
validation shard as under DDP, with the same reduction. Replicated tensors (BatchNorm statistics,
which FSDP2 keeps per rank) are rank zero's. At the end of training the average and the kept
snapshots are made whole, for ``averaged_model()``, ``ensemble()`` and the averaged checkpoint.

Under FSDP (flat parameters) or DeepSpeed stage 3 whole tensors cannot be rebuilt from the shards,
and ``num_snapshots + 1`` unsharded copies may exceed ``LIGHTNING_RECIPE_SHARDED_COPY_MB``: then
the callback turns itself off at fit start with one ``check-skipped`` that gives the reason and
the memory it would need, the same on every rank.

Every function here that communicates says so; the callback calls them only where every rank is
at the same point with the same agreed decision (:func:`agree`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from lightning_recipe import _context, _sharded
from lightning_recipe._probe import copy_module
from lightning_recipe.control.ensemble import snapshots as store
from lightning_recipe.control.ensemble.averaging import module_device
from lightning_recipe.control.ensemble.evaluation import Evaluation
from lightning_recipe.findings import Severity

T = TypeVar("T")
MB = 2**20


def copies_needed(num_snapshots: int, selection: str) -> int:
    """How many unsharded copies an evaluation holds at most: the members (the current model and
    up to K-1 stored snapshots; ``"top"`` keeps K and drops one after measuring) and the average."""
    return num_snapshots + (2 if selection == "top" else 1)


@dataclass
class Plan:
    """What an evaluation of the sharded ensemble needs: ``refusal`` (the same on every rank) or
    ``fits_free`` False (this rank's accelerator memory; the ranks vote) turn it off."""

    evidence: dict[str, Any]
    refusal: str | None = None
    free_refusal: str = ""
    fits_free: bool = True


def plan(trainer: Any, module: nn.Module, copies: int) -> Plan:
    """Size the evaluation of a sharded ``module`` (no communication): the kind of sharding, the
    full weights of ``copies`` unsharded copies against :func:`lightning_recipe._sharded.copy_budget_mb`
    (and half the free accelerator memory of this rank)."""
    kind = _sharded.kind(module, trainer)
    full_mb = _sharded.full_nbytes(module, trainer) / MB
    need = copies * full_mb
    budget = _sharded.copy_budget_mb()
    evidence: dict[str, Any] = {
        "sharding": kind,
        "full_weights_mb": round(full_mb, 6),
        "unsharded_copies": copies,
        "needed_mb": round(need, 6),
        "budget_mb": budget,
        "world_size": _context.world_size(trainer),
    }
    what = (
        f"an evaluation of the ensemble holds {copies} unsharded copies of the model (the members and the "
        f"averaged weights), {need:.1f} MB of full weights per rank ({full_mb:.1f} MB each)"
    )
    out = Plan(evidence=evidence)
    out.free_refusal = (
        f"CheckpointEnsemble is off: {what}, more than half of the free accelerator memory of at least "
        "one rank (lower num_snapshots)"
    )
    if kind != "dtensor":
        out.refusal = (
            f"CheckpointEnsemble is off under this sharding ({kind}): it keeps its snapshots and EMA as "
            "each rank's shards and rebuilds whole tensors for the evaluation, which it can do for FSDP2 "
            f"(DTensor) weights only, not from {kind} shards; {what}"
        )
    elif need > budget:
        out.refusal = (
            f"CheckpointEnsemble is off: {what}, beyond the {budget:.0f} MB allowed (set "
            f"{_sharded.ENV_BUDGET} to raise it, or lower num_snapshots)"
        )
    free = _sharded.free_device_mb(module)
    out.fits_free = free is None or need <= free / 2
    return out


def _summed(trainer: Any, values: Sequence[float]) -> tuple[Tensor, Tensor]:
    local = torch.tensor(
        [float(v) for v in values], dtype=torch.float64, device=module_device(trainer.lightning_module)
    )
    total = trainer.strategy.reduce(local.clone(), reduce_op="sum")
    return local.cpu(), total.detach().cpu()


def votes(trainer: Any, flags: Sequence[bool]) -> list[int]:
    """How many ranks say yes to each of ``flags``: one all-reduce, on every rank, always."""
    _, total = _summed(trainer, [1.0 if f else 0.0 for f in flags])
    return [round(float(v)) for v in total]


def fingerprint(snapshots: Sequence[Any]) -> list[int]:
    """What must be the same on every rank before the members are rebuilt: which snapshots, and
    whether each is kept sharded."""
    return [2 * int(s.serial) + int(bool(s.sharded)) for s in snapshots]


def agree(trainer: Any, ok: bool, fingerprint: Sequence[int]) -> bool:
    """True on every rank when every rank is ``ok`` with the same ``fingerprint`` (the members it
    is about to rebuild), else False on every rank: one all-reduce, on every rank, always."""
    fp = [float(x) for x in fingerprint]
    local, total = _summed(trainer, [1.0 if ok else 0.0, len(fp), sum(fp), sum(x * x for x in fp)])
    world = _context.world_size(trainer)
    return round(float(total[0])) == world and torch.equal(total[1:], local[1:] * world)


def rebuild(
    module: nn.Module, items: Sequence[tuple[Mapping[str, Tensor], bool]], make: Callable[[dict], T]
) -> list[T]:
    """``make(whole state)`` for every ``(state, sharded)`` item, in order: a sharded state is
    rebuilt whole first (a collective per sharded tensor: every rank calls this at the same point
    with the same items), a whole one is used as it is. One member's whole tensors at a time.

    A local failure in ``make`` does not stop the loop (the other ranks are in the collectives of
    the next members): the first one is raised once every collective has run."""
    out: list[T] = []
    error: BaseException | None = None
    for state, sharded in items:
        whole = dict(state)
        if sharded:
            whole = _sharded.full_state(module, state)
            from_rank_zero(module, whole)
        if error is None:
            try:
                out.append(make(whole))
            except Exception as exc:  # raised below, after the collectives of the other members
                error = exc
        del whole
    if error is not None:
        raise error
    return out


def from_rank_zero(module: nn.Module, whole: dict[str, Tensor]) -> None:
    """Replace the tensors of ``whole`` that are not sharded (buffers: FSDP2 keeps each rank's own
    BatchNorm statistics, it does not broadcast them as DDP does) by rank zero's, as a
    distributed checkpoint keeps them, so every rank rebuilds the same model: one broadcast per
    dtype, on every rank (the same names and dtypes everywhere: the model's). In place of the
    dict's entries; the tensors it held are not modified."""
    if _sharded.world_size() <= 1:
        return
    sharded = {n for n, p in module.named_parameters() if _sharded.is_dtensor(p)}
    groups: dict[torch.dtype, list[str]] = {}
    for n, t in whole.items():  # the module's order, the same on every rank
        if n not in sharded:
            groups.setdefault(t.dtype, []).append(n)
    device = module_device(module)
    for dtype, names in groups.items():
        wire = torch.uint8 if dtype == torch.bool else dtype
        flat = torch.cat([whole[n].detach().reshape(-1).to(device, wire) for n in names])
        torch.distributed.broadcast(flat, src=0)
        offset = 0
        for n in names:
            k = whole[n].numel()
            whole[n] = flat[offset : offset + k].view(whole[n].shape).to(whole[n].device, dtype)
            offset += k


def unsharded_copy(module: nn.Module, trainer: Any, state: Mapping[str, Tensor]) -> nn.Module:
    """A plain (unsharded) copy of the sharded ``module`` holding the whole tensors of ``state``,
    in eval mode (no communication)."""
    with _sharded.adopted(module, state):
        clone = copy_module(module, trainer)
    clone.load_state_dict(state, strict=False)  # the buffers (and any weights left whole)
    return clone.eval()


def cpu_copy(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}


def local_nbytes(state: Mapping[str, Tensor] | None) -> int:
    return sum(t.numel() * t.element_size() for t in (state or {}).values())


def memory(
    copies: Sequence[nn.Module], snapshots: Sequence[Mapping[str, Tensor] | None], ema: Mapping[str, Tensor]
) -> dict[str, float]:
    """The figures of one evaluation, MB per rank: the unsharded copies it evaluated, and what is
    kept sharded between evaluations (the snapshots held in memory, the EMA)."""
    held = sum(sum(t.numel() * t.element_size() for t in m.state_dict().values()) for m in copies)
    return {
        "evaluation_copies_mb": round(held / MB, 6),
        "snapshot_shards_mb": round(sum(local_nbytes(s) for s in snapshots) / MB, 6),
        "ema_shards_mb": round(local_nbytes(ema) / MB, 6),
    }


class ShardedAverage:
    """The EMA of this rank's shards (``torch.optim.swa_utils``' rule: the first update copies,
    the next ones ``lerp`` by ``1 - decay``), on ``device``; no communication."""

    def __init__(self, module: nn.Module, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.state: dict[str, Tensor] = {
            k: v.detach().to(self.device, copy=True) for k, v in _sharded.local_state(module).items()
        }
        self.n_averaged = 0

    def update(self, module: nn.Module, decay: float) -> None:
        previous = self.state if self.n_averaged > 0 else None
        self.state = _sharded.ema_update_local(previous, module, decay, self.device)
        self.n_averaged += 1

    def to(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.state = {k: v.to(self.device) for k, v in self.state.items()}

    @property
    def nbytes(self) -> int:
        return local_nbytes(self.state)


class ShardedMode:
    """The sharded half of :class:`~lightning_recipe.control.ensemble.CheckpointEnsemble` (a mixin:
    the callback's own state and helpers). Each method that communicates is called by the
    callback on every rank at the same point; inside, the ranks agree (one all-reduce) before
    any rebuild, so a local failure never leaves a rank out of a collective."""

    # set by CheckpointEnsemble
    _ema: ShardedAverage | None
    _snapshots: list[store.Snapshot]

    def _start_sharded(self, trainer: Any, pl_module: nn.Module) -> None:
        """Sharded model: size the evaluation's unsharded copies against the budget, agree on every
        rank (one all-reduce, always), then keep the EMA as this rank's shards."""
        copies = copies_needed(self.num_snapshots, self.selection)
        sized = self.run_safely(trainer, "size the sharded ensemble", plan, trainer, pl_module, copies)
        yes = votes(trainer, [sized is not None, sized is None or sized.fits_free])
        world = _context.world_size(trainer)
        why = None
        if sized is None or yes[0] < world:
            why = ("CheckpointEnsemble could not be set up on every rank (see the other findings)", {})
        elif sized.refusal is not None:
            reason = "memory" if sized.evidence["sharding"] == "dtensor" else "sharding"
            why = (sized.refusal, {**sized.evidence, "why": reason})
        elif yes[1] < world:
            why = (sized.free_refusal, {**sized.evidence, "why": "memory"})
        if why is not None:
            self._disabled = True
            self.report(trainer, "check-skipped", Severity.INFO, f"{why[0]}.", dict(why[1]))
            return
        assert sized is not None
        self.figures["sharded"] = dict(sized.evidence)
        device = self.ema_device or module_device(pl_module)
        if self._ema is not None:  # a second fit with the same callback: keep averaging
            self._ema.to(device)
        else:
            self.run_safely(
                trainer, "create the averaged shards", self._create_sharded_average, pl_module, device
            )
        self._avg_loaded = None

    def _create_sharded_average(self, pl_module: nn.Module, device: torch.device) -> None:
        self._ema = ShardedAverage(pl_module, device)

    def _rebuild_members(self, trainer: Any, pl_module: nn.Module, ev: Evaluation) -> None:
        """Sharded: read this rank's shards of the stored members (local), agree that every rank
        has the same members (one all-reduce, always), then rebuild every member's and the
        average's whole weights together (collectives) into unsharded copies."""
        read = None
        if ev.ok:
            read = self._guard(trainer, "read the snapshots", lambda: [s.load() for s in ev.stored])
        if not agree(trainer, read is not None, fingerprint(ev.stored)):
            ev.ok = False
            return
        assert read is not None and self._ema is not None
        items = [
            (_sharded.local_state(pl_module), True),
            *((state, s.sharded) for state, s in zip(read, ev.stored)),
            (self._ema.state, True),
        ]
        copies = self._guard(
            trainer,
            "copy the ensemble members",
            rebuild,
            pl_module,
            items,
            lambda whole: unsharded_copy(pl_module, trainer, whole),
        )
        ev.ok = copies is not None
        if copies is None:
            return
        ev.models, ev.averaged = copies[:-1], copies[-1]
        self._bn_fresh = False  # a fresh copy of the averaged weights
        self._stamp(trainer, ev)
        self.figures["sharded"] = {
            **self.figures.get("sharded", {}),
            **memory(copies, [s.state for s in self._snapshots], self._ema.state),
        }

    def _unshard_results(self, trainer: Any, ev: Evaluation) -> None:
        """Sharded, at the end of training: the whole weights of the average and of the kept
        snapshots, for the averaged checkpoint, :meth:`averaged_model` and :meth:`ensemble`
        (every rank agrees, then rebuilds them together; CPU memory, like the DDP snapshots)."""
        snaps = [s for s in self._snapshots if s.sharded]
        read = None
        if ev.ok:
            read = self._guard(trainer, "read the snapshots", lambda: [s.load() for s in snaps])
        if not agree(trainer, read is not None, fingerprint(snaps)):
            ev.ok = False
            return
        assert read is not None and self._ema is not None
        items = [(self._ema.state, True), *((state, True) for state in read)]
        whole = self._guard(
            trainer,
            "rebuild the whole weights",
            rebuild,
            trainer.lightning_module,
            items,
            cpu_copy,
        )
        ev.ok = whole is not None
        if whole is None:
            return
        for snap, state in zip(snaps, whole[1:]):
            store.store(snap, state, snap.path)
            snap.sharded = False
        self._bn_fresh = False  # a fresh copy of the averaged weights
        averaged = self._guard(
            trainer,
            "copy the averaged weights",
            unsharded_copy,
            trainer.lightning_module,
            trainer,
            whole[0],
        )
        ev.ok, ev.averaged = averaged is not None, averaged
