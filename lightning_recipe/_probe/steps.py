"""Running the user's own steps (every signature Lightning accepts) and reading their loss."""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lightning_recipe import _context, _losses
from lightning_recipe._probe.base import ProbeSkip, StepFn, UserStepError
from lightning_recipe._probe.capture import LossCapture, StepResult
from lightning_recipe._probe.state import preserved_rng

#: the step hooks a probe can call, as Lightning calls them
STEP_HOOKS = ("training_step", "validation_step", "test_step", "predict_step")


def call_step(module: nn.Module, hook: str, batch: Any, batch_idx: int = 0, dataloader_idx: int = 0) -> Any:
    """``module.<hook>(...)`` with every signature Lightning accepts.

    * ``step(batch)``, ``step(batch, batch_idx)``, ``step(batch, batch_idx, dataloader_idx)``
      (``dataloader_idx`` passed only when the step asks for it without a default);
    * ``step(dataloader_iter)``: the step gets an iterator yielding ``(batch, batch_idx,
      dataloader_idx)`` once, as Lightning's ``dataloader_iter`` does for one batch.

    Raises :class:`ProbeSkip` when the module has no such step, and :class:`UserStepError` (a
    :class:`ProbeSkip`) when the step itself raises.
    """
    if hook not in STEP_HOOKS:
        raise ValueError(f"`hook` must be one of {STEP_HOOKS}, got {hook!r}")
    step = getattr(module, hook, None)
    if step is None:
        raise ProbeSkip(f"the module has no {hook}; pass step_fn=(model, batch) -> loss")
    return user_call(hook, _call_step, step, batch, batch_idx, dataloader_idx)


def user_call(name: str, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``, where ``fn`` is the user's code (a step, ``step_fn``): an exception it
    raises becomes :class:`UserStepError` naming ``name`` (a :class:`ProbeSkip` passes as it is)."""
    try:
        return fn(*args)
    except ProbeSkip:
        raise
    except Exception as exc:
        if _raised_by_us(exc):
            raise  # one of our hooks on the copy failed inside the step: an internal error
        raise UserStepError(name, exc) from exc


_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep  # not torchmetrics, torch_geometric
#: our frames that only hand a call on (the loss capture's torch-function mode): an error raised
#: below them is the call's own
_PASS_THROUGH = frozenset({"__torch_function__", "__torch_dispatch__"})


def _raised_by_us(exc: BaseException) -> bool:
    """True when the deepest frame of ``exc``'s traceback outside torch is this package's (a
    hook of ours that the step ran into), not the user's code."""
    tb = exc.__traceback__
    deepest = None
    while tb is not None:
        code = tb.tb_frame.f_code
        filename = os.path.abspath(code.co_filename)
        if not filename.startswith(_TORCH_DIR) and code.co_name not in _PASS_THROUGH:
            deepest = filename
        tb = tb.tb_next
    return (
        deepest is not None
        and deepest.startswith(_PACKAGE_DIR + os.sep)
        and not deepest.endswith(os.path.join("_probe", "steps.py"))
    )


def _call_step(step: Callable[..., Any], batch: Any, batch_idx: int, dataloader_idx: int) -> Any:
    try:
        params = inspect.signature(step).parameters
    except (TypeError, ValueError):
        return step(batch, batch_idx)
    if "dataloader_iter" in params:
        return step(iter([(batch, batch_idx, dataloader_idx)]))
    positional = [
        p
        for p in params.values()
        if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]
    var_positional = any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params.values())
    kwargs: dict[str, Any] = {}
    dl = params.get("dataloader_idx")
    if dl is not None and dl.default is inspect.Parameter.empty:
        kwargs["dataloader_idx"] = dataloader_idx
    if len(positional) >= 2 or var_positional:
        return step(batch, batch_idx, **kwargs)
    return step(batch, **kwargs)


def takes_dataloader_iter(module: nn.Module, hook: str = "training_step") -> bool:
    """True when ``module.<hook>`` takes ``dataloader_iter`` (Lightning then hands callbacks no
    batch: ``on_train_batch_start`` gets ``None``)."""
    step = getattr(module, hook, None)
    try:
        return step is not None and "dataloader_iter" in inspect.signature(step).parameters
    except (TypeError, ValueError):
        return False


def peek_train_batch(trainer: Any) -> Any:
    """The first batch of the training data, on the device, read without disturbing the run:
    for steps that take ``dataloader_iter``, where the callbacks get no batch. The first batch of
    :func:`iter_train_batches`, with the RNG restored afterwards (so the run's own shuffling is
    unchanged). Raises :class:`ProbeSkip` when there is none."""
    try:
        with preserved_rng():
            return next(iter_train_batches(trainer))
    except ProbeSkip:
        raise
    except Exception as exc:
        raise ProbeSkip(
            "training_step takes dataloader_iter and reading a first batch failed "
            f"({type(exc).__name__}: {exc})"
        ) from exc


def iter_train_batches(trainer: Any) -> Iterator[Any]:
    """The training batches from a fresh iterator over ``trainer.train_dataloader``, each moved
    by the strategy's own transfer (for steps that take ``dataloader_iter``). The caller restores
    the RNG around the loop (:func:`preserved_rng`). Raises :class:`ProbeSkip` when there is no
    training data to read."""
    loader = getattr(trainer, "train_dataloader", None)
    if loader is None:
        raise ProbeSkip("training_step takes dataloader_iter and the training data could not be read")
    combined = type(loader).__name__ == "CombinedLoader"
    for batch in loader:
        if combined and isinstance(batch, tuple) and len(batch) == 3:
            batch = batch[0]  # CombinedLoader yields (batch, batch_idx, dataloader_idx)
        try:
            batch = trainer.strategy.batch_to_device(batch, dataloader_idx=0)
        except Exception:
            pass  # kept where the loader put it
        yield batch


def batch_or_peek(trainer: Any, module: nn.Module, batch: Any) -> Any:
    """The batch a training-batch hook got, or for ``training_step(self, dataloader_iter)``
    (where Lightning hands callbacks ``None``) the first training batch, read once per fit and
    shared by every callback (:func:`peek_train_batch`). Raises :class:`ProbeSkip` if unreadable."""
    if batch is not None or trainer is None or not takes_dataloader_iter(module):
        return batch
    state = _context.trainer_state(trainer)
    if state.peeked_batch is None:
        state.peeked_batch = peek_train_batch(trainer)
    return state.peeked_batch


def call_training_step(module: nn.Module, batch: Any, batch_idx: int = 0) -> Any:
    """``module.training_step`` as Lightning would call it (see :func:`call_step`)."""
    return call_step(module, "training_step", batch, batch_idx)


def find_loss(output: Any) -> Tensor | None:
    """The loss in what a step returned, or ``None``: a tensor, a mapping with a tensor under
    ``"loss"``, or an object with a tensor ``.loss`` attribute (Hugging Face style outputs).
    A ``None`` return (the step skipped the batch) or anything else gives ``None``."""
    if output is None:
        return None
    if isinstance(output, Tensor):
        return output
    loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
    return loss if isinstance(loss, Tensor) else None


def extract_loss(output: Any) -> Tensor | None:
    """The loss in a ``training_step`` return value (:func:`find_loss`); ``None`` for ``None``.
    Raises :class:`ProbeSkip` for a return value that holds no loss tensor."""
    if output is None:
        return None
    loss = find_loss(output)
    if loss is not None:
        return loss
    if isinstance(output, Mapping):
        raise ProbeSkip("training_step returned a dict without a tensor under 'loss'")
    raise ProbeSkip(f"training_step returned a {type(output).__name__}, not a loss tensor")


def run_step(module: nn.Module, batch: Any, step_fn: StepFn | None = None, batch_idx: int = 0) -> StepResult:
    """Run one step (the user's ``training_step`` or ``step_fn``) and capture its loss calls.

    When no loss call explains the loss (a plain Python loss function), the step itself becomes
    the loss call (``_losses.step_call``): the model's forward output is the prediction, and
    ``recompute`` reruns the step with it replaced (never on a model whose loss call was seen)."""

    def step() -> Any:
        if step_fn is not None:
            return user_call("step_fn", step_fn, module, batch)
        return call_training_step(module, batch, batch_idx)

    with LossCapture(module) as capture:
        out = step()
    result = capture.result(extract_loss(out))
    name = "step_fn" if step_fn is not None else "training_step"
    result.module_calls += _losses.unexplained_step(
        capture.modules, result, module, batch, name, find_loss, step
    )
    return result


def call_validation_step(module: nn.Module, batch: Any, batch_idx: int = 0) -> Any:
    """``module.validation_step`` as Lightning would call it (see :func:`call_step`)."""
    return call_step(module, "validation_step", batch, batch_idx)


def capture_step(
    module: nn.Module, hook: str, batch: Any, batch_idx: int = 0, step_fn: StepFn | None = None
) -> StepResult:
    """Run ``step_fn(module, batch)`` when given, else ``module.<hook>`` (:func:`call_step`), under
    a :class:`LossCapture`: the loss calls it made and the loss it returned (:func:`find_loss`).

    Unlike :func:`run_step` it accepts any return value: a ``validation_step`` that returns
    nothing, or only metrics, gives ``loss=None`` and its loss calls still count.
    """

    def step() -> Any:
        if step_fn is not None:
            return user_call("step_fn", step_fn, module, batch)
        return call_step(module, hook, batch, batch_idx)

    with LossCapture(module) as capture:
        out = step()
    result = capture.result(find_loss(out))
    name = "step_fn" if step_fn is not None else hook
    result.module_calls += _losses.unexplained_step(
        capture.modules, result, module, batch, name, find_loss, step
    )
    return result


def has_own_validation_step(module: nn.Module) -> bool:
    own = getattr(type(module), "validation_step", None)
    if own is None:
        return False
    try:
        from lightning.pytorch import LightningModule
    except ImportError:  # pragma: no cover - lightning is a dependency
        return True
    return own is not getattr(LightningModule, "validation_step", None)


class EvalStep:
    """Runs the user's step on a validation batch to read its loss: ``step_fn`` when given, else
    the module's own ``validation_step`` when it makes a loss call (it computes what the user
    calls the validation loss, without the augmentation, mixup or masking a ``training_step``
    may add), else ``training_step``. The choice is made on the first batch and kept, so real
    and zeroed inputs always go through the same step.
    """

    def __init__(self, step_fn: StepFn | None = None) -> None:
        self.step_fn = step_fn
        self.mode: str | None = "step_fn" if step_fn is not None else None

    @property
    def name(self) -> str:
        return self.mode or "training_step"

    def __call__(self, module: nn.Module, batch: Any) -> StepResult:
        if self.mode is None:
            try:
                result = self._validation(module, batch)
            except Exception:
                result = None
            self.mode = "validation_step" if result is not None else "training_step"
            if result is not None:
                return result
        if self.mode == "validation_step":
            result = self._validation(module, batch)
            if result is None:
                raise ProbeSkip("validation_step made no loss call on this batch")
            return result
        if self.step_fn is None and is_manual_optimization(module):
            raise ProbeSkip(
                "the module uses manual optimisation, so its training_step steps the optimizers, and "
                "its validation_step makes no loss call; pass step_fn=lambda model, batch: loss"
            )
        return run_step(module, batch, self.step_fn)

    @staticmethod
    def _validation(module: nn.Module, batch: Any) -> StepResult | None:
        if not has_own_validation_step(module):
            return None
        with LossCapture(module) as capture:
            out = call_validation_step(module, batch)
        if capture.calls:
            return capture.result(extract_loss(out))
        result = capture.result(find_loss(out))
        return result if result.module_calls and result.main_call is not None else None


def is_manual_optimization(module: nn.Module) -> bool:
    """True for a LightningModule with ``automatic_optimization = False``."""
    return getattr(module, "automatic_optimization", True) is False
