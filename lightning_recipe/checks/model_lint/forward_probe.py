"""One forward pass of a copy, watched by hooks: what ``bias-before-norm``, ``output-no-bias``
and ``softmax-before-loss`` read."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_recipe._probe import (
    HookSet,
    StepFn,
    _storage_ptr,
    copy_module,
    looks_like_probabilities,
    preserved_rng,
    run_step,
)

LAYERS_WITH_BIAS = (nn.Linear, nn.modules.conv._ConvNd, nn.Bilinear)


@dataclass
class ForwardProbe:
    """What one forward pass of a copy shows: bias before BatchNorm, the output layer, the loss."""

    bias_before_norm: list[tuple[str, str]] = field(default_factory=list)
    output_layer: str | None = None
    output_layer_has_bias: bool | None = None
    loss_fn: str | None = None
    probabilities: dict[str, float] | None = None

    @classmethod
    def run(cls, module: nn.Module, trainer: Any | None, batch: Any, step_fn: StepFn | None) -> ForwardProbe:
        """One step of a copy of ``module`` on ``batch``; a BatchNorm's input is matched with the
        layer that produced it by tensor identity, the loss input with its layer by storage."""
        clone = copy_module(module, trainer)
        names = {id(m): n for n, m in clone.named_modules()}
        produced: dict[int, tuple[str, nn.Module, Tensor]] = {}  # id(output) -> producer
        by_storage: dict[int, tuple[str, nn.Module]] = {}
        probe = cls()

        def after(m: nn.Module, args: Any, out: Any) -> None:
            if isinstance(out, Tensor):
                produced.setdefault(id(out), (names[id(m)], m, out))
                if any(True for _ in m.parameters(recurse=False)):
                    by_storage.setdefault(_storage_ptr(out), (names[id(m)], m))

        def before(m: nn.Module, args: Any) -> None:
            x = args[0] if args else None
            hit = produced.get(id(x)) if isinstance(x, Tensor) else None
            if hit is not None and hit[2] is x:
                name, src = hit[0], hit[1]
                # a frozen (pretrained) layer is not the user's to change
                if isinstance(src, LAYERS_WITH_BIAS) and src.bias is not None and src.bias.requires_grad:
                    pair = (name, names[id(m)])
                    if pair not in probe.bias_before_norm:
                        probe.bias_before_norm.append(pair)

        try:
            with HookSet() as hooks:
                for m in clone.modules():
                    hooks.forward(m, after)
                    if isinstance(m, nn.modules.batchnorm._BatchNorm):
                        hooks.forward(m, before, pre=True)
                with preserved_rng(), torch.no_grad():
                    result = run_step(clone, batch, step_fn)
                call = result.main_call
                if call is not None:
                    probe.loss_fn = call.name
                    probe.probabilities = looks_like_probabilities(call)
                    owner = by_storage.get(_storage_ptr(call.input))
                    if owner is not None:
                        probe.output_layer = owner[0] or "(root)"
                        if isinstance(owner[1], LAYERS_WITH_BIAS):
                            probe.output_layer_has_bias = owner[1].bias is not None
        finally:
            produced.clear()
            by_storage.clear()
        return probe
