"""``train-eval-mode``: dropout / BatchNorm in the wrong mode, and random validation outputs.

Three measurements: mode-sensitive modules in training mode during validation (module flags),
mode-sensitive modules in eval mode during training while the part of the model they sit in
still trains, and the first validation batch run twice on a copy with two RNG seeds (outputs that
differ show a dropout in training mode that no flag shows, e.g. ``F.dropout(x, p, training=True)``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from lightning_recipe._probe import HookSet, LossCapture, call_validation_step, preserved_rng, seed_rngs
from lightning_recipe.checks.model_lint._common import Lint, name_list
from lightning_recipe.findings import Severity

#: relative difference between two runs of the same validation batch that counts as "different"
#: (dropout changes outputs by tens of percent; non-deterministic GPU kernels by ~1e-6)
RANDOM_OUTPUT_RTOL = 1e-3

NORMS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)
_DROPOUT_FNS: dict[Callable[..., Any], int] = {  # function -> position of its `training` argument
    F.dropout: 2,
    F.dropout1d: 2,
    F.dropout2d: 2,
    F.dropout3d: 2,
    F.alpha_dropout: 2,
    F.feature_alpha_dropout: 2,
    torch.dropout: 2,
    torch.alpha_dropout: 2,
    torch.feature_dropout: 2,
    torch.feature_alpha_dropout: 2,
}


# ---------------------------------------------------------------------------- module flags
def mode_matters(m: nn.Module) -> bool:
    """Modules whose behaviour depends on train/eval mode (the ones we know of)."""
    if isinstance(m, nn.modules.dropout._DropoutNd):
        return m.p > 0
    if isinstance(m, NORMS):
        return bool(m.track_running_stats)
    if isinstance(m, nn.MultiheadAttention):
        return m.dropout > 0
    if isinstance(m, nn.RNNBase):
        return m.dropout > 0 and m.num_layers > 1
    return False


def _eval_in_training(module: nn.Module) -> list[str]:
    """Mode-sensitive modules in eval mode whose outermost eval-mode ancestor still trains."""
    parent: dict[nn.Module, nn.Module] = {}
    for m in module.modules():
        for child in m.children():
            parent.setdefault(child, m)
    names = {id(m): n for n, m in module.named_modules()}
    found = []
    for m in module.modules():
        if m.training or not mode_matters(m):
            continue
        root = m
        while root in parent and not parent[root].training:
            root = parent[root]
        if root is m:
            continue  # put in eval on its own, on purpose (frozen BN statistics)
        if any(p.requires_grad for p in root.parameters()):
            found.append(names[id(m)] or "(root)")
    return found


def eval_in_training(module: nn.Module) -> Lint | None:
    """Read during training: dropout / BatchNorm in eval mode inside a part that trains."""
    found = _eval_in_training(module)
    if not found:
        return None
    return Lint(
        "train-eval-mode",
        Severity.WARNING,
        f"{len(found)} dropout/BatchNorm module(s) are in eval mode during training although the "
        f"part of the model they sit in still trains: {name_list(found)}; something called "
        ".eval() (look in training_step and the hooks) and training now runs without dropout and "
        "with frozen BatchNorm statistics.",
        {"kind": "eval-in-training", "modules": found},
        key="train-eval-mode:eval-in-training",
    )


def train_in_validation(module: nn.Module) -> Lint | None:
    """Read during validation: dropout / BatchNorm in training mode."""
    found = [n or "(root)" for n, m in module.named_modules() if m.training and mode_matters(m)]
    if not found:
        return None
    return Lint(
        "train-eval-mode",
        Severity.WARNING,
        f"{len(found)} dropout/BatchNorm module(s) are in training mode during validation: "
        f"{name_list(found)}; validation metrics are noisy and BatchNorm statistics change on "
        "validation data; do not call .train() in validation_step or its hooks.",
        {"kind": "train-in-validation", "modules": found},
        key="train-eval-mode:train-in-validation",
    )


# ---------------------------------------------------------------------------- validation reruns
@dataclass
class ValidationRun:
    tensors: list[Tensor]
    dropout_calls: int
    #: dropout-like modules (also attention / RNN dropout, which no function call shows) in
    #: training mode after the step
    dropout_modules: list[str]


class _DropoutSpy(TorchFunctionMode):
    """Counts dropout calls that are active (training=True and p > 0)."""

    def __init__(self) -> None:
        super().__init__()
        self.active = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        pos = _DROPOUT_FNS.get(func)
        if pos is not None:
            p = args[1] if len(args) > 1 else kwargs.get("p", 0.5)
            training = args[pos] if len(args) > pos else kwargs.get("training", kwargs.get("train", True))
            if training and float(p) > 0:
                self.active += 1
        elif func is F.scaled_dot_product_attention:
            p = args[4] if len(args) > 4 else kwargs.get("dropout_p", 0.0)
            if float(p) > 0:
                self.active += 1
        return func(*args, **kwargs)


def rerun_validation(model: nn.Module, batch: Any, batch_idx: int) -> tuple[ValidationRun, ValidationRun]:
    """``validation_step`` of ``model`` (a copy) run twice on ``batch``, with seeds 1 and 2."""
    with preserved_rng():
        return _run_validation(model, batch, batch_idx, seed=1), _run_validation(
            model, batch, batch_idx, seed=2
        )


def _run_validation(model: nn.Module, batch: Any, batch_idx: int, seed: int) -> ValidationRun:
    outputs: list[Any] = []
    with HookSet() as hooks:
        hooks.forward(model, lambda m, a, out: outputs.append(out))
        seed_rngs(seed)
        with _DropoutSpy() as spy, LossCapture() as capture:
            returned = call_validation_step(model, batch, batch_idx)
    tensors = _float_tensors(outputs) + [c.input.detach() for c in capture.calls] + _float_tensors(returned)
    modules = [
        n or "(root)"
        for n, m in model.named_modules()
        if m.training and mode_matters(m) and not isinstance(m, NORMS)
    ]
    return ValidationRun(tensors, spy.active, modules)


def _float_tensors(obj: Any) -> list[Tensor]:
    if isinstance(obj, Tensor):
        return [obj.detach()] if obj.is_floating_point() else []
    if isinstance(obj, Mapping):
        return [t for v in obj.values() for t in _float_tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _float_tensors(v)]
    return []


def max_relative_difference(a: list[Tensor], b: list[Tensor]) -> float:
    """The largest absolute difference of two runs' tensors, relative to the first's largest value."""
    worst = 0.0
    for x, y in zip(a, b):
        if x.shape != y.shape or x.numel() == 0:
            continue
        x, y = x.float(), y.float()
        scale = float(x.abs().max())
        diff = float((x - y).abs().max())
        if diff != diff:  # NaN
            continue
        worst = max(worst, diff / scale if scale > 0 else (float("inf") if diff > 0 else 0.0))
    return worst


def random_validation(first: ValidationRun, second: ValidationRun, diff: float) -> Lint | None:
    """The finding for two validation runs that differ by ``diff`` (relative), if over the limit:
    a warning when a dropout ran in training mode, an info finding when none did (a model that
    samples on purpose, such as a VAE)."""
    if diff <= RANDOM_OUTPUT_RTOL:
        return None
    dropouts = first.dropout_calls + second.dropout_calls
    modules = sorted(set(first.dropout_modules) | set(second.dropout_modules))
    evidence = {
        "kind": "random-validation",
        "relative_difference": diff,
        "dropout_calls": dropouts,
        "dropout_modules": modules,
    }
    if dropouts or modules:
        return Lint(
            "train-eval-mode",
            Severity.WARNING,
            f"The same validation batch run twice through validation_step gives outputs that "
            f"differ by {diff:.3g} (relative) because dropout runs in training mode during "
            f"validation ({dropouts} dropout call(s) with training=True"
            + (f"; modules in training mode: {name_list(modules)}" if modules else "")
            + "); pass training=self.training to F.dropout, and do not call .train() in "
            "validation_step.",
            evidence,
            key="train-eval-mode:random-validation",
        )
    return Lint(
        "train-eval-mode",
        Severity.INFO,
        f"The same validation batch run twice through validation_step gives outputs that "
        f"differ by {diff:.3g} (relative) although no dropout ran: fine for a model that "
        "samples on purpose (a VAE); otherwise look for torch.rand*/randn* in forward.",
        evidence,
        key="train-eval-mode:random-validation",
    )
