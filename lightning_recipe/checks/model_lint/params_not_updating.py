"""``params-not-updating``: a trainable parameter in no optimizer, or with no gradient.

Two measurements: optimizer coverage (a ``requires_grad`` parameter in no optimizer's param
groups, read at the first batch or from ``configure_optimizers()`` on a copy) and gradient flow
(a parameter that got no gradient, ``None`` or all zeros, in any of the first steps: read by
:class:`~lightning_recipe.checks.model_lint.grad_watch.GradWatch` during the fit, or in
``preflight`` from a few Adam steps on a copy).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from lightning_recipe._probe import ProbeSkip, StepFn, preserved_rng, run_step
from lightning_recipe.checks.model_lint._common import Lint, name_list, opt_params
from lightning_recipe.checks.model_lint.grad_watch import GradWatch
from lightning_recipe.findings import Severity


class ParamsOnly:
    """Stands in for an optimizer of a copy: its parameters, mapped to the real module."""

    def __init__(self, params: list[nn.Parameter]) -> None:
        self.param_groups = [{"params": params}]


def find_optimizers(obj: Any) -> list[Any]:
    """Every optimizer in a ``configure_optimizers()`` return value (any of its layouts)."""
    if obj is None:
        return []
    if hasattr(obj, "param_groups") and hasattr(obj, "step"):
        return [obj]
    if isinstance(obj, Mapping):
        return find_optimizers(obj.get("optimizer"))
    if isinstance(obj, (list, tuple)):
        found: list[Any] = []
        for item in obj:
            for o in find_optimizers(item):
                if all(o is not f for f in found):
                    found.append(o)
        return found
    return []


def on_module(optimizers: list[Any], clone: nn.Module, module: nn.Module) -> list[ParamsOnly]:
    """The optimizers of a copy, with the copy's parameters mapped back to ``module``'s by name."""
    names = {id(p): n for n, p in clone.named_parameters()}
    real = dict(module.named_parameters())
    return [ParamsOnly([real[names[id(p)]] for p in opt_params(o) if id(p) in names]) for o in optimizers]


def gradients_unreadable(trainer: Any | None, module: nn.Module, optimizers: list[Any]) -> str | None:
    """Why the optimizers' tensors cannot be matched with the module's parameters, if so: a
    sharding strategy (FSDP, DeepSpeed) steps flattened or partitioned copies, whose gradients
    are not the parameters' gradients."""
    strategy = type(getattr(trainer, "strategy", None)).__name__
    if any(word in strategy for word in ("FSDP", "DeepSpeed", "ModelParallel")):
        return f"the {strategy} shards parameters and gradients"
    own = {id(p) for p in module.parameters()}
    if any(id(p) not in own for o in optimizers for p in opt_params(o)):
        return "the optimizers hold tensors that are not the module's parameters"
    return None


def optimizer_coverage(
    module: nn.Module, optimizers: list[Any]
) -> tuple[int, list[tuple[str, nn.Parameter]]]:
    """How many parameters train, and the trainable ones in no optimizer's param groups."""
    in_opt = {id(p) for o in optimizers for p in opt_params(o)}
    missing = [(n, p) for n, p in module.named_parameters() if p.requires_grad and id(p) not in in_opt]
    trainable = sum(1 for p in module.parameters() if p.requires_grad)
    return trainable, missing


def not_in_optimizer(trainable: int, missing: list[tuple[str, nn.Parameter]]) -> Lint:
    values = sum(p.numel() for _, p in missing)
    return Lint(
        "params-not-updating",
        Severity.WARNING,
        f"{len(missing)} of {trainable} trainable parameters ({values:,} values) are in no "
        f"optimizer's param groups, so they never train: {name_list([n for n, _ in missing])}; pass "
        "them to the optimizer (e.g. self.parameters()), or set requires_grad=False if they are "
        "meant to stay fixed.",
        {
            "kind": "not-in-optimizer",
            "count": len(missing),
            "values": values,
            "names": [n for n, _ in missing],
        },
        key="params-not-updating:optimizer",
    )


def watch_gradient_flow(model: nn.Module, batch: Any, steps: int, step_fn: StepFn | None) -> GradWatch:
    """``steps`` Adam steps on ``model`` (a copy in training mode) under the same watch as in
    training, so a parameter that gets no gradient is found before the job is queued, while
    zero-initialised gates (ReZero, LoRA) still pass as they do over the first steps of a fit."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-3)
    watch = GradWatch(model, [opt])
    with preserved_rng():
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            loss = run_step(model, batch, step_fn).loss  # what training back-propagates
            if loss is None or not loss.requires_grad:
                raise ProbeSkip("the step's loss does not depend on any trainable parameter")
            watch.before_backward()
            loss.backward()
            watch.before_step(opt)
            opt.step()
    return watch


def no_gradient(no_grad: list[tuple[str, int, bool]], steps: int) -> Lint | None:
    """The finding for the parameters that got no gradient in the first ``steps`` steps."""
    if not no_grad:
        return None
    names = [n for n, _, _ in no_grad]
    values = sum(v for _, v, _ in no_grad)
    never = sum(1 for _, _, seen in no_grad if not seen)
    return Lint(
        "params-not-updating",
        Severity.WARNING,
        f"{len(names)} trainable parameter(s) ({values:,} values) got no gradient in the first "
        f"{steps} optimizer steps ({never} always None: not used by the loss; "
        f"{len(names) - never} all zeros: used, but the gradient is blocked): {name_list(names)}; "
        "look for .detach(), torch.no_grad(), a layer left out of forward, or a "
        "multiplication by zero.",
        {
            "kind": "no-gradient",
            "count": len(names),
            "values": values,
            "names": names,
            "steps": steps,
            "always_none": never,
        },
        key="params-not-updating:gradient",
    )


def never_ran(unused: list[tuple[str, int]], steps: int) -> Lint | None:
    """The info for trainable parameters whose module never ran a forward in the first ``steps``
    steps: nothing the optimizer or the backward did wrong (the model computes what its forward
    says), so an info, not a warning: a branch unused by design (an option turned off in a
    library model) needs nothing, a layer forgotten in ``forward`` needs calling."""
    if not unused:
        return None
    names = [n for n, _ in unused]
    values = sum(v for _, v in unused)
    return Lint(
        "params-not-updating",
        Severity.INFO,
        f"{len(names)} trainable parameter(s) ({values:,} values) belong to modules that never ran a "
        f"forward in the first {steps} optimizer steps, so they never train: {name_list(names)}. "
        "Unused by design (an optional branch, an option turned off) they only cost memory; if they "
        "should be part of the model, call them in forward.",
        {"kind": "never-ran", "count": len(names), "values": values, "names": names, "steps": steps},
        key="params-not-updating:never-ran",
    )
