"""Cheap device-side statistics with one host transfer per logging step.

Monitors compute everything on the device and call :func:`to_host` once per logging step; no
``.item()`` per layer, no ``.cpu()`` in hooks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

_HALF = (torch.float16, torch.bfloat16)


def norms(tensors: Sequence[Tensor], device: torch.device | None = None) -> Tensor:
    """L2 norm of each tensor, as one float32 vector on ``device`` (default: the first tensor's).

    Uses ``torch._foreach_norm`` per (device, dtype) group, so it is one kernel per group rather
    than one per tensor. Half-precision tensors are reduced into float32 (a finite float16
    tensor can have a norm above 65504). Non-finite tensors give non-finite norms (callers can
    test for that).
    """
    if not tensors:
        return torch.zeros(0, device=device)
    device = device or tensors[0].device
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.device, t.dtype), []).append(i)
    out = torch.empty(len(tensors), device=device, dtype=torch.float32)
    for (_, dtype), idx in groups.items():
        group = [tensors[i].detach() for i in idx]
        try:
            vals = torch._foreach_norm(group, 2, dtype=torch.float32 if dtype in _HALF else None)
        except (RuntimeError, TypeError, AttributeError):  # exotic dtypes / old torch
            vals = [torch.linalg.vector_norm(g.float()) for g in group]
        out[torch.tensor(idx, device=device)] = torch.stack([v.float().to(device) for v in vals])
    return out


def to_host(values: dict[str, Tensor]) -> dict[str, float]:
    """Move a dict of scalar (0-d or 1-element) device tensors to Python floats in one transfer."""
    if not values:
        return {}
    keys = list(values)
    first = values[keys[0]]
    device = first.device if isinstance(first, Tensor) else torch.device("cpu")
    packed = torch.stack(
        [
            (
                v.detach().reshape(()).float().to(device)
                if isinstance(v, Tensor)
                else torch.tensor(float(v), device=device)
            )
            for v in values.values()
        ]
    ).cpu()
    return {k: float(x) for k, x in zip(keys, packed.tolist())}


def vector_to_host(vec: Tensor) -> list[float]:
    """A 1-D device tensor as a list of floats (one transfer)."""
    return [float(x) for x in vec.detach().float().cpu().tolist()]
