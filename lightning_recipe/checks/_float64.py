"""The float64 copy of the gradient check: casts inside the user's step and state kept as plain
attributes go to float64, and stop-gradients keep their graph for the analytic pass."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode


# ---------------------------------------------------------------------------- float64 everywhere
class _Float32IsFloat64(TorchFunctionMode):
    """On the float64 copy, ``.float()`` and ``.to(torch.float32)`` inside the user's step give
    float64: ``F.one_hot(y, C).float()`` as a BCE target, or a mask cast with ``.float()``,
    would otherwise meet a float64 prediction and stop the check with a dtype error."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is Tensor.float:
            return Tensor.double(*args, **kwargs)
        if func is Tensor.to:
            if kwargs.get("dtype") is torch.float32:
                kwargs = {**kwargs, "dtype": torch.float64}
            args = tuple(torch.float64 if a is torch.float32 else a for a in args)
        return func(*args, **kwargs)


# ---------------------------------------------------------------------------- stop-gradients
class _NoDetach(TorchFunctionMode):
    """``detach()`` of a tensor that requires a gradient returns a view that keeps the graph."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func in _DETACH and args and isinstance(args[0], Tensor) and args[0].requires_grad:
            return args[0].view_as(args[0])
        return func(*args, **kwargs)


_DETACH = (Tensor.detach, torch.detach)


def _no_grad_enter(self: Any) -> None:
    self.prev = torch.is_grad_enabled()


def _no_grad_exit(self: Any, *exc: Any) -> None:
    torch.set_grad_enabled(self.prev)


@contextmanager
def _keep_stop_gradients() -> Iterator[None]:
    """For the analytic pass only: ``detach()`` keeps the graph and ``torch.no_grad()`` does not
    turn gradients off, so the analytic gradient is the derivative of the very function the
    finite differences see. A stop-gradient (SimSiam/BYOL targets, straight-through
    estimators, a teacher under ``no_grad``) is a design choice, not a wrong backward; without
    this it would read as a relative error of 1-2. The ``no_grad`` class is restored on exit."""
    cls = torch.autograd.grad_mode.no_grad
    saved = cls.__dict__["__enter__"], cls.__dict__["__exit__"]
    cls.__enter__, cls.__exit__ = _no_grad_enter, _no_grad_exit  # type: ignore[method-assign]
    try:
        with _NoDetach():
            yield
    finally:
        cls.__enter__, cls.__exit__ = saved  # type: ignore[method-assign]


def _double_plain_state(model: nn.Module) -> None:
    """Cast to float64 the floating-point tensors that modules keep as plain attributes (directly
    or in a dict / list attribute), which ``.double()`` leaves alone: state a metric object used
    as a loss accumulates into (``state += loss`` would otherwise stay float32 and make the whole
    loss float32 on the float64 copy)."""

    def cast(value: Any) -> Any:
        if isinstance(value, Tensor) and value.is_floating_point() and value.dtype != torch.float64:
            if isinstance(value, nn.Parameter):
                return value
            return value.detach().to(torch.float64)
        return value

    for m in model.modules():
        for name, value in list(vars(m).items()):
            if name in ("_parameters", "_buffers", "_modules") or name.startswith("__"):
                continue
            if isinstance(value, Tensor):
                new = cast(value)
                if new is not value:
                    object.__setattr__(m, name, new)
            elif isinstance(value, dict):
                for k, v in list(value.items()):
                    if isinstance(v, Tensor):
                        value[k] = cast(v)
            elif isinstance(value, list):
                value[:] = [cast(v) for v in value]
