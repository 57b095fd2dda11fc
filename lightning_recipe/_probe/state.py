"""Saving and restoring what a probe touches: RNG states, train/eval modes, gradients, dtype."""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn


@contextmanager
def preserved_rng() -> Iterator[None]:
    """Save and restore Python, NumPy, torch CPU, every CUDA device and the MPS RNG state."""
    py_state = random.getstate()
    np_state = None
    try:
        import numpy as np

        np_state = np.random.get_state()
    except ImportError:  # pragma: no cover - numpy ships with torch
        np = None  # type: ignore[assignment]
    cpu_state = torch.get_rng_state()
    cuda_states = None
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda_states = torch.cuda.get_rng_state_all()
    mps_state = _mps_rng_state()
    try:
        yield
    finally:
        random.setstate(py_state)
        if np_state is not None:
            np.random.set_state(np_state)
        torch.set_rng_state(cpu_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
        if mps_state is not None:
            torch.mps.set_rng_state(mps_state)


def _mps_rng_state() -> Tensor | None:
    try:
        if torch.backends.mps.is_available():
            return torch.mps.get_rng_state()
    except (AttributeError, RuntimeError):  # pragma: no cover - torch without MPS support
        pass
    return None


def seed_rngs(seed: int) -> None:
    """Seed Python, NumPy, torch's CPU generator and the CUDA generators already in use, for
    reproducible probe steps; call it inside :func:`preserved_rng`.

    Unlike ``torch.manual_seed`` it never queues a seed for a CUDA that has not started (that
    seed would replace the user's own when a later fit starts CUDA, out of reach of
    :func:`preserved_rng`), and leaves other accelerators' generators alone.
    """
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:  # pragma: no cover - numpy ships with torch
        pass
    torch.default_generator.manual_seed(seed)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.manual_seed_all(seed)


@contextmanager
def preserved_modes(module: nn.Module) -> Iterator[None]:
    """Restore every submodule's train/eval flag on exit."""
    modes = [(m, m.training) for m in module.modules()]
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


@contextmanager
def preserved_grads(module: nn.Module) -> Iterator[None]:
    """Restore every parameter's ``.grad`` (the tensor object and its values) on exit."""
    saved = [(p, None if p.grad is None else p.grad.detach().clone()) for p in module.parameters()]
    try:
        yield
    finally:
        for p, g in saved:
            if g is None:
                p.grad = None
            elif p.grad is None:
                p.grad = g
            else:
                p.grad.copy_(g)


@contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Temporarily change ``torch.get_default_dtype()``."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)
