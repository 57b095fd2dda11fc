"""One evaluation of the ensemble: its members and running sums, the reduction of the sums over
the ranks, the choice of the ensemble (``selection="top"``), and the verdict in words."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_recipe import _context
from lightning_recipe.control.ensemble.averaging import module_device
from lightning_recipe.control.ensemble.predictions import STATS
from lightning_recipe.control.ensemble.snapshots import Snapshot

#: what is compared: the current model, the snapshot ensemble, the averaged weights
KINDS = ("single", "snapshot_ensemble", "averaged")
#: the info code of the verdict
VERDICT_CODE = "ensemble-evaluated"
#: evidence["why"] of the end-of-training "never evaluated" skip
NO_EVALUATION = "no evaluation"


@dataclass
class Evaluation:
    """The members and running sums of one evaluation (one validation run)."""

    stored: list[Snapshot]
    subsets: list[list[int]]
    models: list[nn.Module] = field(default_factory=list)
    averaged: nn.Module | None = None  # the averaged weights' model evaluated with the members
    acc: Tensor | None = None
    ok: bool = False
    step: int = 0
    epoch: int = 0
    bn_note: str | None = None

    @property
    def n_members(self) -> int:
        return len(self.stored) + 1


def subsets_for(selection: str, n_members: int, k: int) -> list[list[int]]:
    """Which members (0 = the current model) each candidate ensemble averages."""
    everyone = list(range(n_members))
    if selection == "top" and n_members > k:
        return [[i for i in everyone if i != j] for j in everyone]  # drop one, decided at the end
    return [everyone]


def reduce_over_ranks(trainer: Any, ev: Evaluation, num_snapshots: int) -> tuple[Tensor | None, float]:
    """Sum every rank's rows with one ``trainer.strategy.reduce(..., "sum")``, on every rank,
    always (the payload size depends on ``num_snapshots`` only). Returns the summed rows
    ``(rows, STATS)``, or ``None`` unless every rank evaluated the same members, and how many
    ranks could."""
    k = num_snapshots
    max_rows = (k + 1) + 1 + (k + 1)  # members, averaged, candidate ensembles: fixed on every rank
    n_rows = ev.n_members + 1 + len(ev.subsets)
    device = module_device(trainer.lightning_module)
    local = torch.zeros(max_rows * STATS + 2, device=device)
    if ev.ok and ev.acc is not None:
        local[: n_rows * STATS] = ev.acc.reshape(-1).to(device)
        local[-2] = 1.0
    local[-1] = float(ev.n_members)
    total = trainer.strategy.reduce(local, reduce_op="sum")
    values = total.detach().cpu().double()
    world = _context.world_size(trainer)
    agreed = round(float(values[-2])) == world and round(float(values[-1])) == world * ev.n_members
    stats = values[: n_rows * STATS].reshape(-1, STATS) if agreed else None
    return stats, float(values[-2])


def split_metrics(stats: Tensor, n_members: int) -> tuple[list[dict], dict, list[dict]]:
    """(every member's, the averaged model's, every candidate ensemble's) loss and accuracy."""
    metrics = [_metric(row) for row in stats]
    return metrics[:n_members], metrics[n_members], metrics[n_members + 1 :]


def choose(
    subsets: list[list[int]], members: list[dict], rank_by: str, selection: str
) -> tuple[int, int | None]:
    """(index of the chosen subset, the member it leaves out or None)."""
    if len(subsets) == 1:
        return 0, None
    if rank_by == "accuracy" and all(m["accuracy"] is not None for m in members):
        scores = [-m["accuracy"] for m in members]
    else:
        scores = [m["loss"] if m["loss"] is not None else math.inf for m in members]
    worst = max(range(len(members)), key=lambda i: (scores[i], i))
    return worst, worst


def _metric(row: Tensor) -> dict[str, float | None]:
    loss_total, n, correct, n_acc = (float(v) for v in row)
    return {
        "loss": loss_total / n if n > 0 else None,
        "accuracy": correct / n_acc if n_acc > 0 else None,
    }


def evaluation_record(
    ev: Evaluation, members: int, member_epochs: list[int], measured: tuple[dict, dict, dict]
) -> tuple[dict[str, Any], dict[str, float]]:
    """The history record of one evaluation and its TensorBoard scalars; ``measured`` holds the
    single model's, the snapshot ensemble's and the averaged weights' metrics."""
    record: dict[str, Any] = {
        "step": ev.step,
        "epoch": ev.epoch,
        "members": members,
        "member_epochs": member_epochs,
    }
    scalars: dict[str, float] = {}
    for kind, m in zip(KINDS, measured):
        for key in ("loss", "accuracy"):
            if m[key] is not None:
                record[f"{kind}_{key}"] = m[key]
                scalars[f"recipe/ensemble/{kind}/{key}"] = m[key]
    if ev.bn_note:
        record["note"] = ev.bn_note
    return record, scalars


def winner(record: dict[str, Any]) -> str:
    """The kind with the lowest finite validation loss, or ``"unknown"``."""
    scores = {k: record.get(f"{k}_loss") for k in KINDS}
    scores = {k: v for k, v in scores.items() if v is not None and math.isfinite(v)}
    return min(scores, key=scores.get) if scores else "unknown"


def verdict_message(r: dict[str, Any], averaged_path: str | None) -> str:
    """The verdict in words: the measured numbers and which one wins by how much."""
    single, ens, avg = (r.get(f"{k}_loss") for k in KINDS)
    win = winner(r)

    def rel(v: float | None) -> str:
        if v is None or single is None or single == 0 or not math.isfinite(v) or not math.isfinite(single):
            return ""
        return f" ({(v - single) / abs(single):+.1%} vs single)"

    parts = [
        f"On the validation data at step {r['step']} (epoch {r['epoch']}), validation loss: single model "
        f"{_fmt(single)}, snapshot ensemble of {r['members']} (epochs {r.get('member_epochs')}) "
        f"{_fmt(ens)}{rel(ens)}, averaged weights (EMA) {_fmt(avg)}{rel(avg)}"
    ]
    accs = [r.get(f"{k}_accuracy") for k in KINDS]
    if all(a is not None for a in accs):
        parts.append(f"; accuracy {accs[0]:.2%} / {accs[1]:.2%} / {accs[2]:.2%}")
    if win == "averaged":
        where = f" (saved to {averaged_path})" if averaged_path else ""
        tail = f": the averaged weights win; use callback.averaged_model(){where}."
    elif win == "snapshot_ensemble":
        tail = ": the snapshot ensemble wins; use callback.ensemble() (one forward pass per member)."
    elif win == "single":
        tail = (
            ": the single model wins; the cheap ensembles do not help this run (they usually do on a "
            "plateau with a noisy, high learning rate)."
        )
    else:
        tail = ": the losses are not finite, so there is nothing to compare."
    return "".join(parts) + tail


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4g}"


def end_of_fit(finding: Any) -> bool:
    """The verdict made once at the end of training (superseded when the fit is resumed)."""
    return finding.code == VERDICT_CODE or (
        finding.code == "check-skipped" and finding.evidence.get("why") == NO_EVALUATION
    )


# ---------------------------------------------------------------------------- evaluate="fit_end"
def val_loader(trainer: Any) -> Any | None:
    """The trainer's first validation dataloader, or ``None``."""
    loaders = getattr(trainer, "val_dataloaders", None)
    if loaders is None:
        return None
    if isinstance(loaders, (list, tuple)):
        return loaders[0] if loaders else None
    if isinstance(loaders, Mapping):
        return next(iter(loaders.values()), None)
    return loaders


def val_batch_limit(trainer: Any, loader: Any) -> int | None:
    """How many batches of the first validation dataloader the trainer runs (``None``: all)."""
    limits = getattr(trainer, "num_val_batches", None)
    if isinstance(limits, (list, tuple)) and limits:
        value = limits[0]
        return int(value) if isinstance(value, (int, float)) and math.isfinite(value) else None
    return None
