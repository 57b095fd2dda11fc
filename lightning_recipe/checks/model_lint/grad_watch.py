"""The gradient watch behind ``params-not-updating`` (no gradient) and ``grad-not-zeroed``.

Per optimizer it keeps, on the device, which trainable parameters ever got a non-zero gradient
at a step and which were stepped without their gradient being cleared since the step before;
:meth:`GradWatch.result` reads the flags in one transfer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_recipe import stats
from lightning_recipe._probe import HookSet
from lightning_recipe.checks.model_lint._common import opt_params


@dataclass
class GradResult:
    no_grad: list[tuple[str, int, bool]]  # (name, numel, ever had a grad tensor)
    carried: list[str]
    #: (name, numel) of parameters without a gradient whose module never ran a forward while
    #: watched: unused by design (an optional branch, an option turned off) or forgotten
    never_ran: list[tuple[str, int]] = field(default_factory=list)


class GradWatch:
    """Per optimizer: which trainable parameters ever got a non-zero gradient at a step, and
    which were stepped without their gradient being cleared since the previous step. The flags
    live on the device; :meth:`result` reads them in one transfer."""

    def __init__(self, module: nn.Module, optimizers: list[Any]) -> None:
        self.names = {id(p): n for n, p in module.named_parameters()}
        self.groups: dict[int, _OptState] = {}
        for opt in optimizers:
            params = [p for p in opt_params(opt) if p.requires_grad]
            if params:
                self.groups[id(_unwrap(opt))] = _OptState(params)
        self.steps = 0
        # which modules run a forward while watched (pre-hooks, removed by :meth:`result`)
        self._owner = {id(p): id(m) for m in module.modules() for p in m.parameters(recurse=False)}
        self._ran: set[int] = set()
        self._hooks = HookSet()
        ran = self._ran

        def mark(module: nn.Module, args: Any) -> None:
            # a plain function over a set of ids: a deep copy of the model made while the hooks
            # are on (a probe) copies functions by reference, never this watch and its tensors
            ran.add(id(module))

        for m in module.modules():
            self._hooks.forward(m, mark, pre=True)

    def close(self) -> None:
        """Remove the forward pre-hooks (safe to call twice)."""
        self._hooks.remove()

    def before_backward(self) -> None:
        for state in self.groups.values():
            if state.steps:
                state.mark_cleared()

    def before_step(self, optimizer: Any) -> None:
        self.steps += 1
        state = self.groups.get(id(_unwrap(optimizer)))
        if state is not None:
            state.step()

    def result(self) -> GradResult:
        """Read the flags (one transfer) and name the parameters."""
        self.close()
        states = [s for s in self.groups.values() if s.steps]
        if not states:
            return GradResult([], [])
        device = states[0].device
        host = stats.vector_to_host(torch.cat([s.flags().to(device) for s in states]))
        no_grad, carried, never_ran, offset = [], [], [], 0
        for state in states:
            n = len(state.params)
            got, bad = host[offset : offset + n], host[offset + n : offset + 2 * n]
            offset += 2 * n
            for p, g, c, seen in zip(state.params, got, bad, state.had_grad):
                name = self.names.get(id(p), f"<unnamed {tuple(p.shape)}>")
                if g == 0 and p.requires_grad:  # frozen since the fit started (BaseFinetuning)
                    if not seen and self._owner.get(id(p)) not in self._ran:
                        never_ran.append((name, p.numel()))
                    else:
                        no_grad.append((name, p.numel(), seen))
                if c != 0:
                    carried.append(name)
        return GradResult(no_grad, carried, never_ran)


def _unwrap(optimizer: Any) -> Any:
    """The torch optimizer inside a LightningOptimizer (duck-typed)."""
    return getattr(optimizer, "_optimizer", optimizer)


class _OptState:
    def __init__(self, params: list[Tensor]) -> None:
        self.params = params
        self.device = params[0].device
        n = len(params)
        self.got = torch.zeros(n, dtype=torch.bool, device=self.device)
        self.carried = torch.zeros(n, dtype=torch.bool, device=self.device)
        self.cleared = torch.zeros(n, dtype=torch.bool, device=self.device)
        self.had_grad = [False] * n
        self.steps = 0

    def _grad_norms(self) -> tuple[list[int], Tensor]:
        idx = [i for i, p in enumerate(self.params) if p.grad is not None]
        grads = [self.params[i].grad for i in idx]
        return idx, stats.norms(grads, device=self.device) if grads else torch.zeros(0, device=self.device)

    def mark_cleared(self) -> None:
        idx, norms = self._grad_norms()
        clear = torch.ones(len(self.params), dtype=torch.bool, device=self.device)  # None: cleared
        if idx:
            clear[torch.tensor(idx, device=self.device)] = norms == 0
        self.cleared |= clear

    def step(self) -> None:
        idx, norms = self._grad_norms()
        has = torch.zeros(len(self.params), dtype=torch.bool, device=self.device)
        nonzero = torch.zeros(len(self.params), dtype=torch.bool, device=self.device)
        if idx:
            where = torch.tensor(idx, device=self.device)
            has[where] = True
            nonzero[where] = norms != 0  # NaN counts as a gradient
            for i in idx:
                self.had_grad[i] = True
        if self.steps:
            self.carried |= has & ~self.cleared
        self.got |= nonzero
        self.cleared.zero_()
        self.steps += 1

    def flags(self) -> Tensor:
        return torch.cat([self.got.float(), self.carried.float()])
