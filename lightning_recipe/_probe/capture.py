"""Seeing what reaches the loss: the torch.nn.functional losses a step calls, with their inputs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from lightning_recipe._losses import ModuleLossCall, ModuleLossRecorder

LOSS_FUNCTIONS: dict[Callable[..., Any], str] = {
    F.cross_entropy: "cross_entropy",
    F.nll_loss: "nll_loss",
    F.binary_cross_entropy: "binary_cross_entropy",
    F.binary_cross_entropy_with_logits: "binary_cross_entropy_with_logits",
    F.mse_loss: "mse_loss",
    F.l1_loss: "l1_loss",
    F.smooth_l1_loss: "smooth_l1_loss",
    F.huber_loss: "huber_loss",
    F.kl_div: "kl_div",
    F.multi_margin_loss: "multi_margin_loss",
    F.multilabel_margin_loss: "multilabel_margin_loss",
    F.multilabel_soft_margin_loss: "multilabel_soft_margin_loss",
    F.soft_margin_loss: "soft_margin_loss",
    F.poisson_nll_loss: "poisson_nll_loss",
    F.gaussian_nll_loss: "gaussian_nll_loss",
    F.hinge_embedding_loss: "hinge_embedding_loss",
    F.cosine_embedding_loss: "cosine_embedding_loss",
    F.margin_ranking_loss: "margin_ranking_loss",
    F.triplet_margin_loss: "triplet_margin_loss",
    F.ctc_loss: "ctc_loss",
}


_LOSS_BY_NAME = {name: fn for fn, name in LOSS_FUNCTIONS.items()}


#: losses over class scores with integer (or probability) targets
CLASS_LOSSES = ("cross_entropy", "nll_loss", "multi_margin_loss")


#: losses where "predict the target mean" is the natural baseline
REGRESSION_LOSSES = ("mse_loss", "l1_loss", "smooth_l1_loss", "huber_loss")


@dataclass
class LossCall:
    """One call to a loss function seen during a probed step."""

    name: str
    input: Tensor
    target: Any
    kwargs: dict[str, Any]
    output: Tensor
    args: tuple = ()
    #: "sigmoid" / "softmax" when the input is (a view of) the output of that function
    squashed_by: str | None = None

    @property
    def function(self) -> Callable[..., Any]:
        """The ``torch.nn.functional`` loss that was called."""
        return _LOSS_BY_NAME[self.name]

    def recompute(self, new_input: Tensor) -> Tensor:
        """The same loss call (target, weights, reduction...) on another input."""
        args = (new_input, *self.args[1:])
        kwargs = {k: v for k, v in self.kwargs.items() if k != "input"}
        return self.function(*args, **kwargs)


_SQUASHERS: dict[Callable[..., Any], str] = {
    torch.sigmoid: "sigmoid",
    torch.Tensor.sigmoid: "sigmoid",
    F.sigmoid: "sigmoid",
    torch.softmax: "softmax",
    torch.Tensor.softmax: "softmax",
    F.softmax: "softmax",
}


def _storage_ptr(t: Tensor) -> int:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return -1


class LossCapture(TorchFunctionMode):
    """Records calls to ``torch.nn.functional`` losses (only the outermost one of each), and
    whether a loss input is the output of a sigmoid / softmax (by tensor storage; the outputs
    are kept alive while capturing so a freed address cannot be mistaken for one)."""

    def __init__(self, model: nn.Module | None = None) -> None:
        super().__init__()
        self.calls: list[LossCall] = []
        self._squashed: dict[int, tuple[str, Tensor]] = {}
        #: loss-like calls of ``model``'s loss modules and distribution log-likelihoods (``_losses``)
        self.modules = ModuleLossRecorder(model)

    def __enter__(self) -> LossCapture:
        self.modules.__enter__()
        try:
            return super().__enter__()
        except BaseException:
            self.modules.__exit__(None, None, None)
            raise

    def result(self, loss: Tensor | None) -> StepResult:
        """The :class:`StepResult` of a step that returned ``loss``: its functional loss calls
        and the module / distribution loss calls that may have made ``loss``."""
        module_calls = [*self.modules.calls, *self.modules.distribution_calls(loss)]
        return StepResult(loss=loss, calls=self.calls, module_calls=module_calls)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        squash = _SQUASHERS.get(func)
        if squash is not None and isinstance(out, Tensor):
            self._squashed[_storage_ptr(out)] = (squash, out)
            return out
        name = LOSS_FUNCTIONS.get(func)
        if name is not None and args and isinstance(args[0], Tensor) and isinstance(out, Tensor):
            target = args[1] if len(args) > 1 else kwargs.get("target")
            hit = self._squashed.get(_storage_ptr(args[0]))
            self.calls.append(
                LossCall(name, args[0], target, dict(kwargs), out, tuple(args), hit[0] if hit else None)
            )
        return out

    def __exit__(self, *exc: Any) -> Any:
        self._squashed.clear()
        try:
            return super().__exit__(*exc)
        finally:
            self.modules.__exit__(*exc)


@dataclass
class StepResult:
    """The loss a probed step returned and the loss-function calls it made."""

    loss: Tensor | None
    calls: list[LossCall] = field(default_factory=list)
    #: losses computed by modules without trainable parameters (custom losses, torchmetrics
    #: metrics used as losses) and negative log-likelihoods of distributions (``_losses``)
    module_calls: list[ModuleLossCall] = field(default_factory=list)

    @property
    def main_call(self) -> LossCall | ModuleLossCall | None:
        """The data loss: the functional loss call whose value equals the step's loss if there
        is one (no regulariser added), else a module loss call whose value equals it, else the
        first scalar functional loss call, else a module loss call on the loss's graph (under
        ``no_grad``: the first module loss call), else (a step that returned no loss) its only
        module loss call."""
        scalar = [c for c in self.calls if c.output.dim() == 0]
        lv = None
        if self.loss is not None and self.loss.numel() == 1:
            lv = float(self.loss.detach().reshape(()))
            for c in scalar:
                cv = float(c.output.detach())
                if abs(cv - lv) <= 1e-6 * max(1.0, abs(lv)):
                    return c
        if lv is not None:
            for m in self.module_calls:
                mv = float(m.output.detach().reshape(()))
                if abs(mv - lv) <= 1e-6 * max(1.0, abs(lv)):
                    return m
        if scalar:
            return scalar[0]
        if self.calls:
            return self.calls[0]
        if self.loss is not None and self.loss.requires_grad:
            return next((m for m in self.module_calls if m.output.requires_grad), None)
        if self.loss is None and len(self.module_calls) == 1:
            # a step that returns no loss (a validation_step that only logs) and made exactly
            # one module / distribution loss call: that call is its loss
            return self.module_calls[0]
        if self.loss is not None and not self.loss.requires_grad and self.module_calls:
            # a probe under no_grad, where the graph cannot say which call made the loss (a
            # likelihood term plus a KL term): the first module / distribution loss call, as a
            # step with gradients would read it
            return self.module_calls[0]
        return None

    @property
    def data_loss(self) -> Tensor | None:
        """The data loss (regularisers left out when we can tell them apart)."""
        call = self.main_call
        if call is not None:
            out = call.output
            return out if out.dim() == 0 else out.mean()
        return self.loss
