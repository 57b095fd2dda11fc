"""BatchNorm statistics for the averaged weights.

Running statistics do not average with the weights: they are recomputed for the averaged
weights with ``torch.optim.swa_utils.update_bn`` from stashed *training* batches, run through
the user's own step, and under DDP averaged over the ranks (pooled variance, one all-reduce).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import update_bn

from lightning_recipe import _context
from lightning_recipe._probe import StepFn, call_training_step, is_manual_optimization, preserved_rng
from lightning_recipe.batch import BatchAdapter
from lightning_recipe.control.ensemble.averaging import module_device


def has_batchnorm(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


class StepForward(nn.Module):
    """Lets ``swa_utils.update_bn`` drive the user's own step: ``forward(batch)`` runs it."""

    def __init__(self, model: nn.Module, run: Callable[[nn.Module, Any], Any]) -> None:
        super().__init__()
        self.model = model
        self._run = run

    def forward(self, batch: Any) -> None:
        self._run(self.model, batch)


def forward_batch(model: nn.Module, batch: Any, step_fn: StepFn | None, adapter: BatchAdapter) -> None:
    """One training-mode pass over ``batch``: ``step_fn``, else ``model(input)`` for a
    manual-optimization module (its ``training_step`` steps the optimizers), else the module's
    ``training_step``."""
    if step_fn is not None:
        step_fn(model, batch)
    elif is_manual_optimization(model):
        model(adapter.input(batch))
    else:
        call_training_step(model, batch)


def recompute_bn(model: nn.Module, batches: list[Any], run: Callable[[nn.Module, Any], Any]) -> bool:
    """``update_bn`` on ``model`` over ``batches`` (each passed through ``run``), RNG restored;
    leaves ``model`` in eval mode."""
    runner = StepForward(model, run)
    with preserved_rng():
        update_bn([(b,) for b in batches], runner)
    model.eval()
    return True


def sync_bn(trainer: Any, shape_model: nn.Module, target: nn.Module | None, ok: bool) -> None:
    """Average the BatchNorm running statistics of ``target`` over the ranks (pooled variance).

    Every rank calls it; the payload size comes from ``shape_model`` (the trained module, same
    structure on every rank), so a rank that failed locally sends zeros and is left out."""
    if _context.world_size(trainer) <= 1:
        return
    sizes = [m.num_features for m in shape_model.modules() if _tracks_stats(m)]
    if not sizes:
        return
    device = module_device(shape_model)
    payload = torch.zeros(2 * sum(sizes) + 1, device=device)
    bns = [m for m in target.modules() if _tracks_stats(m)] if ok and target is not None else []
    if ok and [m.num_features for m in bns] == sizes:
        parts = []
        for m in bns:
            mean, var = m.running_mean.detach().float(), m.running_var.detach().float()
            parts += [mean, var + mean * mean]
        payload[:-1] = torch.cat(parts).to(device)
        payload[-1] = 1.0
    else:
        bns = []
    total = trainer.strategy.reduce(payload, reduce_op="sum")
    ranks_ok = float(total[-1])
    if not bns or ranks_ok < 1:
        return
    flat = total[:-1] / ranks_ok
    offset = 0
    with torch.no_grad():
        for m in bns:
            c = m.num_features
            mean, second = flat[offset : offset + c], flat[offset + c : offset + 2 * c]
            offset += 2 * c
            m.running_mean.copy_(mean.to(m.running_mean.device, m.running_mean.dtype))
            m.running_var.copy_(
                (second - mean * mean).clamp_min(0).to(m.running_var.device, m.running_var.dtype)
            )


def _tracks_stats(m: nn.Module) -> bool:
    return (
        isinstance(m, nn.modules.batchnorm._BatchNorm)
        and getattr(m, "running_mean", None) is not None
        and getattr(m, "running_var", None) is not None
    )
