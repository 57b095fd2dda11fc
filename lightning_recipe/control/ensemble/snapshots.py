"""The kept checkpoints of the run: their weights in CPU memory or in files, which of them the
next evaluation averages, and where their files go."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_recipe import _context, _sharded


@dataclass
class Snapshot:
    """One kept checkpoint of the run (its weights in CPU memory or in a file); ``sharded``: the
    weights are this rank's shards of a sharded model (see ``ensemble.sharding``)."""

    serial: int
    epoch: int
    step: int
    state: dict[str, Tensor] | None = None
    path: str | None = None
    scores: dict[str, float] = field(default_factory=dict)
    sharded: bool = False

    def load(self) -> dict[str, Tensor]:
        if self.state is not None:
            return self.state
        if self.path is None or not os.path.exists(self.path):
            raise FileNotFoundError(f"snapshot file {self.path!r} is missing")
        return torch.load(self.path, map_location="cpu", weights_only=True)

    def to_state(self) -> dict[str, Any]:
        return {
            "serial": self.serial,
            "epoch": self.epoch,
            "step": self.step,
            "state": self.state,
            "path": self.path,
            "scores": dict(self.scores),
            "sharded": self.sharded,
        }

    @classmethod
    def from_state(cls, d: Mapping[str, Any]) -> Snapshot:
        return cls(
            int(d["serial"]),
            int(d["epoch"]),
            int(d["step"]),
            d.get("state"),
            d.get("path"),
            dict(d.get("scores") or {}),
            bool(d.get("sharded", False)),
        )

    @property
    def missing(self) -> bool:
        """Kept in a file that is no longer there (a resume from an older checkpoint)."""
        return self.state is None and (self.path is None or not os.path.exists(self.path))


def cpu_state(module: nn.Module) -> dict[str, Tensor]:
    """A copy of ``module``'s state dict in CPU memory."""
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def known_scores(scores: Mapping[str, float | None]) -> dict[str, float]:
    """The measured scores (``None``: not measured, e.g. no accuracy for a regression)."""
    return {k: v for k, v in scores.items() if v is not None}


def take_snapshot(
    module: nn.Module,
    serial: int,
    epoch: int,
    step: int,
    scores: Mapping[str, Any],
    path: str | None,
    sharded: bool = False,
) -> Snapshot:
    """Copy ``module``'s weights (``sharded``: this rank's shards of them, no communication): into
    the file ``path`` (``storage="disk"``) or, for ``None``, into CPU memory."""
    if sharded:
        state = {k: v.detach().to("cpu", copy=True) for k, v in _sharded.local_state(module).items()}
    else:
        state = cpu_state(module)
    snap = Snapshot(serial, epoch, step, scores=known_scores(scores), sharded=sharded)
    store(snap, state, path)
    return snap


def store(snap: Snapshot, state: dict[str, Tensor], path: str | None) -> None:
    """Keep ``state`` as the snapshot's weights: in the file ``path``, or in CPU memory."""
    if path is not None:
        snap.path, snap.state = path, None
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, path)
    else:
        snap.state = state


def snapshot_path(trainer: Any, snapshot_dir: str | None, run_id: str, serial: int) -> str:
    """``<snapshot_dir or default_root_dir/recipe_snapshots>/<run_id>/snapshot-<serial>[.rank<r>].pt``."""
    root = snapshot_dir or os.path.join(
        os.fspath(getattr(trainer, "default_root_dir", None) or os.getcwd()), "recipe_snapshots"
    )
    rank = int(getattr(trainer, "global_rank", 0) or 0)
    suffix = f".rank{rank}" if _context.world_size(trainer) > 1 else ""
    return os.path.join(root, run_id, f"snapshot-{serial:05d}{suffix}.pt")


def members_for_eval(snapshots: list[Snapshot], step: int, selection: str, k: int) -> list[Snapshot]:
    """The stored snapshots the evaluation at ``step`` averages with the current model."""
    others = [s for s in snapshots if s.step != step]  # the current model is a member anyway
    if selection == "last":
        return others[-(k - 1) :]
    return others


def remove_file(snap: Snapshot) -> None:
    """Delete the snapshot's file, if it has one (a file already gone is fine)."""
    if snap.path and os.path.exists(snap.path):
        try:
            os.remove(snap.path)
        except OSError:
            pass
