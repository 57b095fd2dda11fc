"""ModelLintCheck: the recipe's list of common mistakes, measured on the model and its first steps."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from lightning_recipe._probe import ProbeSkip, StepFn, batch_or_peek, copy_module, is_manual_optimization
from lightning_recipe.batch import BatchLayoutError, Getter, detach_clone
from lightning_recipe.callback import RecipeCallback, guarded
from lightning_recipe.checks.loss_at_init import LossAtInitCheck
from lightning_recipe.checks.model_lint._common import Lint
from lightning_recipe.checks.model_lint.bias_before_norm import bias_before_norm
from lightning_recipe.checks.model_lint.forward_probe import ForwardProbe
from lightning_recipe.checks.model_lint.grad_not_zeroed import carried_over
from lightning_recipe.checks.model_lint.grad_watch import GradWatch
from lightning_recipe.checks.model_lint.output_no_bias import output_no_bias, softmax_before_loss
from lightning_recipe.checks.model_lint.params_not_updating import (
    find_optimizers,
    gradients_unreadable,
    never_ran,
    no_gradient,
    not_in_optimizer,
    on_module,
    optimizer_coverage,
    watch_gradient_flow,
)
from lightning_recipe.checks.model_lint.train_eval_mode import (
    eval_in_training,
    max_relative_difference,
    random_validation,
    rerun_validation,
    train_in_validation,
)
from lightning_recipe.findings import RecipeError, Severity

#: samples of the first batch used for the one forward pass of the structural lints
LINT_SAMPLES = 8


class ModelLintCheck(RecipeCallback):
    """Catch the "mistakes people make" from Karpathy's recipe, by measuring them on the real model.

    The recipe lists them: not toggling train/eval mode, forgetting ``zero_grad()`` before
    ``backward()``, a softmax output fed to a loss that expects logits, ``bias=True`` on a
    Linear/Conv that feeds a BatchNorm, no bias on the output layer. This callback checks each one,
    plus a parameter that never trains: optimizer coverage and the data flow on the first batch
    (forward hooks on a copy), gradients during the first ``steps`` optimizer steps (read in
    ``on_before_optimizer_step``, kept on the device, read once), module modes during the first
    training batches and every validation run, and the first validation batch run twice on a copy
    with two seeds (which catches ``F.dropout(x, p, training=True)``). :meth:`static_check` runs the
    structural part without a trainer (``preflight``).

    Reports ``params-not-updating`` (warning: in no optimizer, or no gradient in any of the first
    ``steps`` steps), ``train-eval-mode`` (warning: dropout/BatchNorm training during validation or
    left in eval mode during training, a deliberately frozen module excepted), ``grad-not-zeroed``
    (warning: gradients carried over between steps, gradient accumulation excepted),
    ``softmax-before-loss`` (error, when no LossAtInitCheck is on the trainer), ``bias-before-norm``
    and ``output-no-bias`` (info).

    Thresholds: see docs/thresholds.md#model-lint.

    Args:
        steps: optimizer steps watched for missing and carried-over gradients (>= 2).
        get_input, get_target: batch layout (see :class:`~lightning_recipe.BatchAdapter`); used
            only to take a few samples and, under manual optimisation, to call ``forward``.
        step_fn: ``callable(model, batch) -> loss`` replacing ``training_step`` for the one
            forward pass (needed under manual optimisation to see the loss).
        on_error: ``"warn"`` or ``"raise"``.

    Example::

        trainer = L.Trainer(callbacks=[ModelLintCheck()])
        trainer.fit(model, datamodule)
        # "[params-not-updating] 4 of 6 trainable parameters (1,600 values) are in no
        #  optimizer's param groups, so they never train: net.0.weight, net.0.bias, ..."
    """

    codes = (
        "params-not-updating",
        "train-eval-mode",
        "grad-not-zeroed",
        "softmax-before-loss",
        "bias-before-norm",
        "output-no-bias",
    )
    what = "run the structural lints"

    def __init__(
        self,
        steps: int = 10,
        *,
        get_input: Getter | None = None,
        get_target: Getter | None = None,
        step_fn: StepFn | None = None,
        on_error: str = "warn",
    ) -> None:
        super().__init__(on_error=on_error)
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
            raise ValueError(f"`steps` must be an int >= 2, got {steps!r}")
        self.steps = steps
        self.read_batches_with(get_input, get_target, step_fn)
        self._reported: set[str] = set()
        self._static_done = False
        self._val_probe_done = False
        self._grads: GradWatch | None = None
        self._train_batches = 0

    # ------------------------------------------------------------------ lifecycle
    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        super().on_fit_start(trainer, pl_module)
        self._train_batches = 0
        if self._grads is not None:
            self._grads.close()
        self._grads = None
        why = gradients_unreadable(trainer, pl_module, trainer.optimizers)
        if why:
            self._note(f"gradient checks skipped: {why}")
        elif self.active:
            self._grads = GradWatch(pl_module, trainer.optimizers)

    def teardown_diagnostics(self) -> None:
        if self._grads is not None:
            self._grads.close()
        self._grads = None

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if not self._static_done:  # the same first batch on every rank
            self._static_done = True
            with self.rank_consistent_errors(trainer):
                self.run_safely(trainer, "on_train_batch_start", self._first_batch, trainer, pl_module, batch)

    def _first_batch(self, trainer: Any, pl_module: Any, batch: Any) -> None:
        try:  # ``training_step(self, dataloader_iter)``: Lightning hands callbacks no batch
            batch = batch_or_peek(trainer, pl_module, batch)
        except ProbeSkip as why:
            self.skip(trainer, str(why))
            return
        self.static_check(trainer, pl_module, batch, list(trainer.optimizers))

    @guarded
    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._train_batches += 1
        if self._train_batches <= self.steps or batch_idx == 0:
            self._check_eval_in_training(trainer, pl_module)

    @guarded
    def on_before_backward(self, trainer: Any, pl_module: Any, loss: Tensor) -> None:
        if self._grads is not None:
            self._grads.before_backward()

    @guarded
    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        watch = self._grads
        if watch is None:
            return
        watch.before_step(optimizer)
        if watch.steps >= self.steps:
            self._finish_grads(trainer)

    @guarded
    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self._grads is not None and self._grads.steps >= 2:
            self._finish_grads(trainer)
        if self._grads is not None:
            self._grads.close()
        self._grads = None

    @guarded
    def on_validation_batch_start(
        self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if self._val_probe_done or dataloader_idx != 0:
            return
        self._val_probe_done = True
        with torch.inference_mode(False), torch.no_grad():
            batch = detach_clone(batch)  # ordinary tensors, not inference tensors
            self._probe(
                trainer, "rerun validation", self._check_random_validation, pl_module, batch, batch_idx
            )

    @guarded
    def on_validation_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if batch_idx == 0:
            self._check_train_in_validation(trainer, pl_module)

    # ------------------------------------------------------------------ static part
    def static_check(
        self, trainer: Any | None, module: nn.Module, batch: Any, optimizers: list[Any] | None = None
    ) -> None:
        """The lints that need no training: optimizer coverage, bias-before-norm,
        output-no-bias, softmax-before-loss; without a trainer (``preflight``) also the eval-mode
        checks on ``batch``.

        Args:
            trainer: the trainer, or ``None``.
            module: the (Lightning)Module; it is not changed (the forward pass runs on a copy).
            batch: a training batch.
            optimizers: the optimizers; ``None`` calls ``configure_optimizers()`` on a copy.
        """
        if optimizers is None:
            optimizers = self._optimizers_of_copy(trainer, module)
        if optimizers is not None:
            self._check_coverage(trainer, module, optimizers)
        # under manual optimisation without step_fn the forward call is a guess: failing is no news
        guess = self.step_fn is None and is_manual_optimization(module)
        self._probe(trainer, "run the structural lints", self._forward_lints, module, batch, quiet=guess)
        if trainer is None:
            if not guess:
                self._probe(None, "probe gradient flow", self._gradient_flow, module, batch)
            self._check_eval_in_training(None, module)
            if _user_defined(module, "validation_step"):
                with torch.no_grad():
                    self._probe(None, "rerun validation", self._check_random_validation, module, batch, 0)

    def _probe(
        self, trainer: Any | None, what: str, fn: Callable[..., None], *args: Any, quiet: bool = False
    ) -> None:
        """Run a probe on a copy; a batch, model or step it cannot handle is a skip (an info
        finding, or only a note with ``quiet``), not a crash."""
        try:
            fn(trainer, *args)
        except RecipeError:
            raise
        except Exception as exc:
            reason = (
                str(exc) if isinstance(exc, (ProbeSkip, BatchLayoutError)) else f"{type(exc).__name__}: {exc}"
            )
            if quiet:
                self._note(f"could not {what}: {reason}")
                return
            self._report_once(
                trainer,
                "check-skipped",
                Severity.INFO,
                f"ModelLintCheck could not {what} on a copy of the model: {reason.rstrip('.')}.",
                {"reason": reason, "what": what},
                key=f"check-skipped:{what}",
            )

    # ------------------------------------------------------------------ params-not-updating
    def _gradient_flow(self, trainer: Any | None, module: nn.Module, batch: Any) -> None:
        """Without a fit (``preflight``): ``steps`` Adam steps on a copy with the same watch as in
        training (see :func:`.params_not_updating.watch_gradient_flow`)."""
        model = copy_module(module, trainer)
        model.train()
        if not any(p.requires_grad for p in model.parameters()):
            return
        # whether a parameter gets a gradient does not need the whole batch
        self._grads = watch_gradient_flow(model, self._small(batch), self.steps, self.step_fn)
        self._finish_grads(trainer)

    def _optimizers_of_copy(self, trainer: Any | None, module: nn.Module) -> list[Any] | None:
        configure = getattr(module, "configure_optimizers", None)
        if configure is None:
            return None
        try:
            clone = copy_module(module, trainer)
            found = find_optimizers(clone.configure_optimizers())
        except Exception as exc:  # e.g. it reads self.trainer, which preflight has not
            self._note(f"configure_optimizers() could not run on a copy ({type(exc).__name__}: {exc})")
            return None
        return on_module(found, clone, module)

    def _check_coverage(self, trainer: Any | None, module: nn.Module, optimizers: list[Any]) -> None:
        why = gradients_unreadable(trainer, module, optimizers)
        if why:
            self._note(f"optimizer coverage not checked: {why}")
            return
        trainable, missing = optimizer_coverage(module, optimizers)
        self.figures["trainable_params"] = trainable
        self.figures["params_in_no_optimizer"] = len(missing)
        if missing and optimizers:
            self._report_lint(trainer, not_in_optimizer(trainable, missing))

    # ------------------------------------------------------------------ bias-before-norm, output-no-bias
    def _forward_lints(self, trainer: Any | None, module: nn.Module, batch: Any) -> None:
        probe = ForwardProbe.run(module, trainer, self._small(batch), self._forward_fn(module))
        for lint in bias_before_norm(probe):
            self._report_lint(trainer, lint)
        self._report_lint(trainer, output_no_bias(probe))
        self.figures["output_layer"] = probe.output_layer
        if probe.probabilities is not None and not _has_loss_at_init(trainer):
            self._report_lint(trainer, softmax_before_loss(probe))

    def _small(self, batch: Any) -> Any:
        try:
            n = self.adapter.batch_size(batch)
        except BatchLayoutError:
            return batch
        return self.adapter.slice(batch, LINT_SAMPLES) if n > LINT_SAMPLES else batch

    def _forward_fn(self, module: nn.Module) -> StepFn | None:
        if self.step_fn is not None or not is_manual_optimization(module):
            return self.step_fn
        adapter = self.adapter
        return lambda model, batch: model(adapter.input(batch))  # no loss: training_step would step

    # ------------------------------------------------------------------ train / eval mode
    def _check_eval_in_training(self, trainer: Any | None, module: nn.Module) -> None:
        self._report_lint(trainer, eval_in_training(module))

    def _check_train_in_validation(self, trainer: Any | None, module: nn.Module) -> None:
        self._report_lint(trainer, train_in_validation(module))

    def _check_random_validation(
        self, trainer: Any | None, module: nn.Module, batch: Any, batch_idx: int
    ) -> None:
        clone = copy_module(module, trainer)
        if trainer is None:
            clone.eval()
        first, second = rerun_validation(clone, self._small(batch), batch_idx)
        if not first.tensors:
            self._note("validation randomness not checked: validation_step produced no tensor to compare")
            return
        diff = max_relative_difference(first.tensors, second.tensors)
        self.figures["validation_rerun_difference"] = diff
        self._report_lint(trainer, random_validation(first, second, diff))

    # ------------------------------------------------------------------ gradients
    def _finish_grads(self, trainer: Any) -> None:
        watch, self._grads = self._grads, None
        if watch is None:
            return
        result = watch.result()
        self.figures["grad_steps_watched"] = watch.steps
        self._report_lint(trainer, no_gradient(result.no_grad, watch.steps))
        self._report_lint(trainer, never_ran(result.never_ran, watch.steps))
        self._report_lint(trainer, carried_over(result.carried, watch.steps))

    # ------------------------------------------------------------------ helpers
    def _report_lint(self, trainer: Any | None, lint: Lint | None) -> None:
        if lint is not None:
            self._report_once(trainer, lint.code, lint.severity, lint.message, lint.evidence, lint.key)

    def _report_once(
        self,
        trainer: Any | None,
        code: str,
        severity: Severity,
        message: str,
        evidence: dict[str, Any],
        key: str | None = None,
    ) -> None:
        key = key or code
        if key in self._reported:
            return
        self._reported.add(key)
        self.report(trainer, code, severity, message, evidence)

    def _note(self, text: str) -> None:
        self.figures.setdefault("notes", []).append(text)

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "reported": sorted(self._reported),
            "static_done": self._static_done,
            "val_probe_done": self._val_probe_done,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._reported = set(state_dict.get("reported", []))
        self._static_done = bool(state_dict.get("static_done", False))
        self._val_probe_done = bool(state_dict.get("val_probe_done", False))


def _has_loss_at_init(trainer: Any | None) -> bool:
    """LossAtInitCheck reports ``softmax-before-loss`` itself when it is on the trainer."""
    return trainer is not None and any(
        isinstance(cb, LossAtInitCheck) for cb in getattr(trainer, "callbacks", None) or []
    )


def _user_defined(module: Any, method: str) -> bool:
    """True when ``method`` comes from the user's class, not from Lightning's base class."""
    for klass in type(module).__mro__:
        if method in vars(klass):
            return not klass.__module__.startswith(("lightning.", "pytorch_lightning."))
    return False
