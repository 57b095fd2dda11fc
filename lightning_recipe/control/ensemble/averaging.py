"""The exponential (Polyak) average of the weights, kept with ``torch.optim.swa_utils``."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from lightning_recipe._probe import copy_module
from lightning_recipe.control.ensemble.snapshots import cpu_state


def new_average(
    module: nn.Module,
    trainer: Any,
    device: torch.device,
    decay: float,
    use_buffers: bool,
    loaded: dict[str, Any] | None = None,
) -> AveragedModel:
    """An ``AveragedModel`` (EMA, ``decay``) of a safe copy of ``module`` (``_probe.copy_module``)
    on ``device``; ``loaded`` (an :func:`average_state`) restores a resumed average."""
    clone = copy_module(module, trainer).to(device)
    for p in clone.parameters():
        p.requires_grad_(False)
    avg = AveragedModel(nn.Module(), multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=use_buffers)
    avg.module = clone  # AveragedModel would deep-copy again; ours is already a safe copy
    if loaded is not None:
        load_average(avg, loaded)
    return avg


def load_average(avg: AveragedModel, loaded: dict[str, Any]) -> None:
    """Restore an :func:`average_state` into ``avg``."""
    avg.module.load_state_dict(loaded["module"])
    avg.n_averaged.fill_(int(loaded["n_averaged"]))


def warmed_up_decay(decay: float, n_updates: int, warmup: bool) -> float:
    """``min(decay, (1 + n) / (10 + n))`` after ``n`` updates (TensorFlow's
    ``ExponentialMovingAverage(num_updates=...)``), or ``decay`` without warm-up."""
    n = n_updates
    return min(decay, (1 + n) / (10 + n)) if warmup else decay


def update_average(avg: AveragedModel, module: nn.Module, decay: float) -> None:
    """One EMA update of ``avg`` towards ``module``'s current weights."""
    avg.multi_avg_fn = get_ema_multi_avg_fn(decay)
    avg.update_parameters(module)


def average_state(avg: AveragedModel) -> dict[str, Any]:
    """The average as it travels in the callback state: weights in CPU memory and ``n_averaged``."""
    return {"module": cpu_state(avg.module), "n_averaged": int(avg.n_averaged)}


def module_device(module: nn.Module) -> torch.device:
    """The device of the first parameter (or buffer); CPU for a module without either."""
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")
