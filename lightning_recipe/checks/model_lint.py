"""ModelLintCheck: the recipe's list of common mistakes, measured on the model and its first steps."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from lightning_recipe import stats
from lightning_recipe._probe import (
    LossCapture,
    ProbeSkip,
    StepFn,
    _storage_ptr,
    call_validation_step,
    copy_module,
    is_manual_optimization,
    looks_like_probabilities,
    preserved_rng,
    run_step,
    seed_rngs,
    track_hook,
    untrack_hook,
)
from lightning_recipe.batch import BatchAdapter, BatchLayoutError, Getter, detach_clone
from lightning_recipe.callback import RecipeCallback, guarded
from lightning_recipe.findings import RecipeError, Severity

#: how many names a message lists before "and N more"
MAX_NAMES = 6
#: samples of the first batch used for the one forward pass of the structural lints
LINT_SAMPLES = 8
#: relative difference between two runs of the same validation batch that counts as "different"
#: (dropout changes outputs by tens of percent; non-deterministic GPU kernels by ~1e-6)
RANDOM_OUTPUT_RTOL = 1e-3

_LAYERS_WITH_BIAS = (nn.Linear, nn.modules.conv._ConvNd, nn.Bilinear)
_NORMS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)
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


class ModelLintCheck(RecipeCallback):
    """Catch the "mistakes people make" from Karpathy's recipe, by measuring them.

    The recipe lists them: not toggling train/eval mode, forgetting ``zero_grad()`` before
    ``backward()``, a softmax output fed to a loss that expects logits, ``bias=True`` on a
    Linear/Conv that feeds a BatchNorm, no bias on the output layer. This callback checks each
    one on the real model, plus a parameter that never trains:

    * ``params-not-updating`` (warning): a trainable parameter (``requires_grad``) that is in no
      optimizer's param groups (read at the first batch from ``trainer.optimizers``), or that
      got no gradient (``None`` or all zeros) in any of the first ``steps`` optimizer steps (read
      in ``on_before_optimizer_step``, where gradients are unscaled and already reduced; several
      steps so that a branch used only now and then, or a layer behind a zero-initialised gate,
      is not flagged). The gradient flags are kept on the device and read once.
    * ``bias-before-norm`` (info): a Linear/Conv with ``bias=True`` whose output tensor *is* the
      input of a BatchNorm, found by tensor identity with forward hooks during one forward pass of
      a copy (not by module order, which says nothing about the data flow).
    * ``output-no-bias`` (info): the layer whose output is the loss input has no bias.
    * ``softmax-before-loss`` (error): the loss input is already probabilities (the detector
      LossAtInitCheck uses); reported here only when no LossAtInitCheck is on the trainer.
    * ``train-eval-mode`` (warning): (a) dropout / BatchNorm (or attention / RNN dropout) in
      training mode during validation, read from the module flags at the end of the first
      validation batch of every validation run; (b) the first validation batch run twice through
      the user's ``validation_step`` on a copy with two RNG seeds: outputs that differ while a
      dropout ran in training mode (this catches ``F.dropout(x, p, training=True)``, which no
      flag shows); outputs that differ with no dropout at all are an info finding (sampling
      models such as VAEs do that on purpose); (c) dropout / BatchNorm left in eval mode during
      training, read at the end of the first ``steps`` training batches and of the first batch of
      every epoch. A module in eval mode is flagged only when the outermost module that was put
      in eval mode with it still has trainable parameters: a frozen backbone in eval mode
      (``requires_grad=False``) is healthy, and a BatchNorm put in eval mode on its own while its
      parent trains ("freeze the BN statistics", mmdetection's ``norm_eval``) is deliberate.
    * ``grad-not-zeroed`` (warning): a parameter whose gradient was never seen cleared (``None``
      or zero at a ``backward``) between two steps of its optimizer during the first ``steps``
      optimizer steps, i.e. the step used gradients carried over from the step before.
      Gradient accumulation (several backward calls, then step, then ``zero_grad``) is healthy:
      the first backward after the step sees cleared gradients. It is checked in automatic
      optimisation too (an ``optimizer_zero_grad`` override that does nothing). The flags stay
      on the device; one read at the end.

    Measured: a healthy model's two validation reruns differ by exactly 0 on CPU (MLP, CNN with
    BatchNorm and dropout, GRU, transformer, digits CNN), with dropout left on by 0.42-0.86
    (largest difference relative to the largest output); the limit, 1e-3, leaves room for
    non-deterministic GPU kernels (~1e-6). Ten optimizer steps let a zero-initialised gate
    (ReZero's alpha, LoRA's B: their branch gets a zero gradient on the first step only) and an
    auxiliary head used every third step pass. Cost: one copy, one forward pass of 8 samples
    and two validation steps of 8 samples, once (0.08 s for a 4-layer, 512-wide MLP on CPU);
    gradient norms (one grouped ``_foreach_norm`` per hook) during the first ``steps`` steps;
    nothing after that (0.02 ms per step, within noise of a 15 ms step).

    The structural part (:meth:`static_check`: optimizer coverage, bias-before-norm,
    output-no-bias, softmax-before-loss, and in ``preflight`` the eval-mode checks on the given
    batch) also runs without a trainer. Under DDP everything is rank-local and needs no
    collective: gradients are read after the all-reduce, so every rank sees the same ones; the
    forward-pass lints describe each rank's own batch.

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
        if step_fn is not None and not callable(step_fn):
            raise TypeError(
                f"`step_fn` must be a callable (model, batch) -> loss, got {type(step_fn).__name__}"
            )
        self.steps = steps
        self.adapter = BatchAdapter(get_input, get_target)
        self.step_fn = step_fn
        self._reported: set[str] = set()
        self._static_done = False
        self._val_probe_done = False
        self._grads: _GradWatch | None = None
        self._train_batches = 0

    # ------------------------------------------------------------------ lifecycle
    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        super().on_fit_start(trainer, pl_module)
        self._train_batches = 0
        self._grads = None
        why = _gradients_unreadable(trainer, pl_module, trainer.optimizers)
        if why:
            self._note(f"gradient checks skipped: {why}")
        elif self.active:
            self._grads = _GradWatch(pl_module, trainer.optimizers)

    def teardown_diagnostics(self) -> None:
        self._grads = None

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if not self._static_done:  # the same first batch on every rank
            self._static_done = True
            with self.rank_consistent_errors(trainer):
                self.run_safely(
                    trainer,
                    "on_train_batch_start",
                    self.static_check,
                    trainer,
                    pl_module,
                    batch,
                    list(trainer.optimizers),
                )

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

    def _gradient_flow(self, trainer: Any | None, module: nn.Module, batch: Any) -> None:
        """Without a fit (``preflight``): ``steps`` Adam steps on a copy with the same watch as in
        training, so a parameter that gets no gradient is found before the job is queued, while
        zero-initialised gates (ReZero, LoRA) still pass as they do over the first steps of a fit."""
        model = copy_module(module, trainer)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            return
        batch = self._small(batch)  # whether a parameter gets a gradient does not need the whole batch
        opt = torch.optim.Adam(params, lr=1e-3)
        watch = _GradWatch(model, [opt])
        with preserved_rng():
            for _ in range(self.steps):
                opt.zero_grad(set_to_none=True)
                loss = run_step(model, batch, self.step_fn).loss  # what training back-propagates
                if loss is None or not loss.requires_grad:
                    raise ProbeSkip("the step's loss does not depend on any trainable parameter")
                watch.before_backward()
                loss.backward()
                watch.before_step(opt)
                opt.step()
        self._grads = watch
        self._finish_grads(trainer)

    def _optimizers_of_copy(self, trainer: Any | None, module: nn.Module) -> list[Any] | None:
        configure = getattr(module, "configure_optimizers", None)
        if configure is None:
            return None
        try:
            clone = copy_module(module, trainer)
            found = _find_optimizers(clone.configure_optimizers())
        except Exception as exc:  # e.g. it reads self.trainer, which preflight has not
            self._note(f"configure_optimizers() could not run on a copy ({type(exc).__name__}: {exc})")
            return None
        # map the copy's parameters back to the module's, by name
        names = {id(p): n for n, p in clone.named_parameters()}
        real = dict(module.named_parameters())
        return [_ParamsOnly([real[names[id(p)]] for p in _opt_params(o) if id(p) in names]) for o in found]

    def _check_coverage(self, trainer: Any | None, module: nn.Module, optimizers: list[Any]) -> None:
        why = _gradients_unreadable(trainer, module, optimizers)
        if why:
            self._note(f"optimizer coverage not checked: {why}")
            return
        in_opt = {id(p) for o in optimizers for p in _opt_params(o)}
        missing = [(n, p) for n, p in module.named_parameters() if p.requires_grad and id(p) not in in_opt]
        trainable = sum(1 for p in module.parameters() if p.requires_grad)
        self.figures["trainable_params"] = trainable
        self.figures["params_in_no_optimizer"] = len(missing)
        if not missing or not optimizers:
            return
        values = sum(p.numel() for _, p in missing)
        self._report_once(
            trainer,
            "params-not-updating",
            Severity.WARNING,
            f"{len(missing)} of {trainable} trainable parameters ({values:,} values) are in no "
            f"optimizer's param groups, so they never train: {_names([n for n, _ in missing])}; pass "
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

    def _forward_lints(self, trainer: Any | None, module: nn.Module, batch: Any) -> None:
        probe = _ForwardProbe.run(module, trainer, self._small(batch), self._forward_fn(module))
        for conv, norm in probe.bias_before_norm:
            self._report_once(
                trainer,
                "bias-before-norm",
                Severity.INFO,
                f"{conv} has bias=True and its output goes straight into the BatchNorm {norm}, which "
                "subtracts the mean and cancels the bias: use bias=False there (fewer parameters, "
                "same model).",
                {"layer": conv, "norm": norm},
                key=f"bias-before-norm:{conv}",
            )
        if probe.output_layer is not None and probe.output_layer_has_bias is False:
            self._report_once(
                trainer,
                "output-no-bias",
                Severity.INFO,
                f"The output layer {probe.output_layer} has no bias, so it cannot start at the "
                f'target mean or the class priors ("init well"); use bias=True unless the weights '
                "are tied on purpose.",
                {"layer": probe.output_layer, "loss_fn": probe.loss_fn},
            )
        self.figures["output_layer"] = probe.output_layer
        if probe.probabilities is not None and not _has_loss_at_init(trainer):
            p = probe.probabilities
            self._report_once(
                trainer,
                "softmax-before-loss",
                Severity.ERROR,
                f"The input of {probe.loss_fn} is already probabilities (values in "
                f"[{p['min']:.3g}, {p['max']:.3g}]"
                + (
                    f", rows summing to {p['row_sum_min']:.4f}..{p['row_sum_max']:.4f}"
                    if "row_sum_min" in p
                    else ""
                )
                + f") but {probe.loss_fn} expects "
                + ("log-probabilities" if probe.loss_fn == "nll_loss" else "raw logits")
                + "; remove the softmax/sigmoid at the end of the model (the loss applies it itself).",
                {**p, "loss_fn": probe.loss_fn},
            )

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
        found = _eval_in_training(module)
        if not found:
            return
        self._report_once(
            trainer,
            "train-eval-mode",
            Severity.WARNING,
            f"{len(found)} dropout/BatchNorm module(s) are in eval mode during training although the "
            f"part of the model they sit in still trains: {_names(found)}; something called "
            ".eval() (look in training_step and the hooks) and training now runs without dropout and "
            "with frozen BatchNorm statistics.",
            {"kind": "eval-in-training", "modules": found},
            key="train-eval-mode:eval-in-training",
        )

    def _check_train_in_validation(self, trainer: Any | None, module: nn.Module) -> None:
        found = [n or "(root)" for n, m in module.named_modules() if m.training and _mode_matters(m)]
        if not found:
            return
        self._report_once(
            trainer,
            "train-eval-mode",
            Severity.WARNING,
            f"{len(found)} dropout/BatchNorm module(s) are in training mode during validation: "
            f"{_names(found)}; validation metrics are noisy and BatchNorm statistics change on "
            "validation data; do not call .train() in validation_step or its hooks.",
            {"kind": "train-in-validation", "modules": found},
            key="train-eval-mode:train-in-validation",
        )

    def _check_random_validation(
        self, trainer: Any | None, module: nn.Module, batch: Any, batch_idx: int
    ) -> None:
        clone = copy_module(module, trainer)
        if trainer is None:
            clone.eval()
        batch = self._small(batch)
        with preserved_rng():
            first = _run_validation(clone, batch, batch_idx, seed=1)
            second = _run_validation(clone, batch, batch_idx, seed=2)
        if not first.tensors:
            self._note("validation randomness not checked: validation_step produced no tensor to compare")
            return
        diff = _max_relative_difference(first.tensors, second.tensors)
        self.figures["validation_rerun_difference"] = diff
        if diff <= RANDOM_OUTPUT_RTOL:
            return
        dropouts = first.dropout_calls + second.dropout_calls
        modules = sorted(set(first.dropout_modules) | set(second.dropout_modules))
        evidence = {
            "kind": "random-validation",
            "relative_difference": diff,
            "dropout_calls": dropouts,
            "dropout_modules": modules,
        }
        if dropouts or modules:
            self._report_once(
                trainer,
                "train-eval-mode",
                Severity.WARNING,
                f"The same validation batch run twice through validation_step gives outputs that "
                f"differ by {diff:.3g} (relative) because dropout runs in training mode during "
                f"validation ({dropouts} dropout call(s) with training=True"
                + (f"; modules in training mode: {_names(modules)}" if modules else "")
                + "); pass training=self.training to F.dropout, and do not call .train() in "
                "validation_step.",
                evidence,
                key="train-eval-mode:random-validation",
            )
        else:
            self._report_once(
                trainer,
                "train-eval-mode",
                Severity.INFO,
                f"The same validation batch run twice through validation_step gives outputs that "
                f"differ by {diff:.3g} (relative) although no dropout ran: fine for a model that "
                "samples on purpose (a VAE); otherwise look for torch.rand*/randn* in forward.",
                evidence,
                key="train-eval-mode:random-validation",
            )

    # ------------------------------------------------------------------ gradients
    def _finish_grads(self, trainer: Any) -> None:
        watch, self._grads = self._grads, None
        if watch is None:
            return
        result = watch.result()
        self.figures["grad_steps_watched"] = watch.steps
        if result.no_grad:
            names = [n for n, _, _ in result.no_grad]
            values = sum(v for _, v, _ in result.no_grad)
            never = sum(1 for _, _, seen in result.no_grad if not seen)
            self._report_once(
                trainer,
                "params-not-updating",
                Severity.WARNING,
                f"{len(names)} trainable parameter(s) ({values:,} values) got no gradient in the first "
                f"{watch.steps} optimizer steps ({never} always None: not used by the loss; "
                f"{len(names) - never} all zeros: used, but the gradient is blocked): {_names(names)}; "
                "look for .detach(), torch.no_grad(), a layer left out of forward, or a "
                "multiplication by zero.",
                {
                    "kind": "no-gradient",
                    "count": len(names),
                    "values": values,
                    "names": names,
                    "steps": watch.steps,
                    "always_none": never,
                },
                key="params-not-updating:gradient",
            )
        if result.carried:
            self._report_once(
                trainer,
                "grad-not-zeroed",
                Severity.WARNING,
                f"{len(result.carried)} parameter(s) were stepped with gradients carried over from the "
                f"previous optimizer step (never cleared between two steps in the first {watch.steps}): "
                f"{_names(result.carried)}; call optimizer.zero_grad() after each optimizer.step() "
                "(gradient accumulation: zero after the step, not never).",
                {"count": len(result.carried), "names": result.carried, "steps": watch.steps},
            )

    # ------------------------------------------------------------------ helpers
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


# ---------------------------------------------------------------------------- forward probe
@dataclass
class _ForwardProbe:
    """What one forward pass of a copy shows: bias before BatchNorm, the output layer, the loss."""

    bias_before_norm: list[tuple[str, str]] = field(default_factory=list)
    output_layer: str | None = None
    output_layer_has_bias: bool | None = None
    loss_fn: str | None = None
    probabilities: dict[str, float] | None = None

    @classmethod
    def run(cls, module: nn.Module, trainer: Any | None, batch: Any, step_fn: StepFn | None) -> _ForwardProbe:
        clone = copy_module(module, trainer)
        names = {m: n for n, m in clone.named_modules()}
        produced: dict[int, tuple[str, nn.Module, Tensor]] = {}  # id(output) -> producer
        by_storage: dict[int, tuple[str, nn.Module]] = {}
        probe = cls()

        def after(m: nn.Module, args: Any, out: Any) -> None:
            if isinstance(out, Tensor):
                produced.setdefault(id(out), (names[m], m, out))
                if any(True for _ in m.parameters(recurse=False)):
                    by_storage.setdefault(_storage_ptr(out), (names[m], m))

        def before(m: nn.Module, args: Any) -> None:
            x = args[0] if args else None
            hit = produced.get(id(x)) if isinstance(x, Tensor) else None
            if hit is not None and hit[2] is x:
                name, src = hit[0], hit[1]
                # a frozen (pretrained) layer is not the user's to change
                if isinstance(src, _LAYERS_WITH_BIAS) and src.bias is not None and src.bias.requires_grad:
                    pair = (name, names[m])
                    if pair not in probe.bias_before_norm:
                        probe.bias_before_norm.append(pair)

        handles = []
        try:
            for m in clone.modules():
                handles.append(track_hook(m.register_forward_hook(after)))
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    handles.append(track_hook(m.register_forward_pre_hook(before)))
            with preserved_rng(), torch.no_grad():
                result = run_step(clone, batch, step_fn)
            call = result.main_call
            if call is not None:
                probe.loss_fn = call.name
                probe.probabilities = looks_like_probabilities(call)
                owner = by_storage.get(_storage_ptr(call.input))
                if owner is not None:
                    probe.output_layer = owner[0] or "(root)"
                    if isinstance(owner[1], _LAYERS_WITH_BIAS):
                        probe.output_layer_has_bias = owner[1].bias is not None
        finally:
            for h in handles:
                untrack_hook(h)
            produced.clear()
            by_storage.clear()
        return probe


class _ParamsOnly:
    """Stands in for an optimizer of a copy: its parameters, mapped to the real module."""

    def __init__(self, params: list[nn.Parameter]) -> None:
        self.param_groups = [{"params": params}]


def _find_optimizers(obj: Any) -> list[Any]:
    """Every optimizer in a ``configure_optimizers()`` return value (any of its layouts)."""
    if obj is None:
        return []
    if hasattr(obj, "param_groups") and hasattr(obj, "step"):
        return [obj]
    if isinstance(obj, Mapping):
        return _find_optimizers(obj.get("optimizer"))
    if isinstance(obj, (list, tuple)):
        found: list[Any] = []
        for item in obj:
            for o in _find_optimizers(item):
                if all(o is not f for f in found):
                    found.append(o)
        return found
    return []


def _opt_params(optimizer: Any) -> Iterator[Tensor]:
    for group in getattr(optimizer, "param_groups", []):
        yield from group["params"]


def _gradients_unreadable(trainer: Any | None, module: nn.Module, optimizers: list[Any]) -> str | None:
    """Why the optimizers' tensors cannot be matched with the module's parameters, if so: a
    sharding strategy (FSDP, DeepSpeed) steps flattened or partitioned copies, whose gradients
    are not the parameters' gradients."""
    strategy = type(getattr(trainer, "strategy", None)).__name__
    if any(word in strategy for word in ("FSDP", "DeepSpeed", "ModelParallel")):
        return f"the {strategy} shards parameters and gradients"
    own = {id(p) for p in module.parameters()}
    if any(id(p) not in own for o in optimizers for p in _opt_params(o)):
        return "the optimizers hold tensors that are not the module's parameters"
    return None


def _has_loss_at_init(trainer: Any | None) -> bool:
    if trainer is None:
        return False
    from lightning_recipe.checks.loss_at_init import LossAtInitCheck

    return any(isinstance(cb, LossAtInitCheck) for cb in getattr(trainer, "callbacks", None) or [])


def _user_defined(module: Any, method: str) -> bool:
    """True when ``method`` comes from the user's class, not from Lightning's base class."""
    for klass in type(module).__mro__:
        if method in vars(klass):
            return not klass.__module__.startswith(("lightning.", "pytorch_lightning."))
    return False


def _names(names: list[str]) -> str:
    shown = ", ".join(names[:MAX_NAMES])
    return shown + (f" and {len(names) - MAX_NAMES} more" if len(names) > MAX_NAMES else "")


# ---------------------------------------------------------------------------- modes
def _mode_matters(m: nn.Module) -> bool:
    """Modules whose behaviour depends on train/eval mode (the ones we know of)."""
    if isinstance(m, nn.modules.dropout._DropoutNd):
        return m.p > 0
    if isinstance(m, _NORMS):
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
    names = {m: n for n, m in module.named_modules()}
    found = []
    for m in module.modules():
        if m.training or not _mode_matters(m):
            continue
        root = m
        while root in parent and not parent[root].training:
            root = parent[root]
        if root is m:
            continue  # put in eval on its own, on purpose (frozen BN statistics)
        if any(p.requires_grad for p in root.parameters()):
            found.append(names[m] or "(root)")
    return found


# ---------------------------------------------------------------------------- validation reruns
@dataclass
class _ValidationRun:
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


def _run_validation(model: nn.Module, batch: Any, batch_idx: int, seed: int) -> _ValidationRun:
    outputs: list[Any] = []
    handle = model.register_forward_hook(lambda m, a, out: outputs.append(out))
    try:
        seed_rngs(seed)
        with _DropoutSpy() as spy, LossCapture() as capture:
            returned = call_validation_step(model, batch, batch_idx)
    finally:
        handle.remove()
    tensors = _float_tensors(outputs) + [c.input.detach() for c in capture.calls] + _float_tensors(returned)
    modules = [
        n or "(root)"
        for n, m in model.named_modules()
        if m.training and _mode_matters(m) and not isinstance(m, _NORMS)
    ]
    return _ValidationRun(tensors, spy.active, modules)


def _float_tensors(obj: Any) -> list[Tensor]:
    if isinstance(obj, Tensor):
        return [obj.detach()] if obj.is_floating_point() else []
    if isinstance(obj, Mapping):
        return [t for v in obj.values() for t in _float_tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _float_tensors(v)]
    return []


def _max_relative_difference(a: list[Tensor], b: list[Tensor]) -> float:
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


# ---------------------------------------------------------------------------- gradient watch
@dataclass
class _GradResult:
    no_grad: list[tuple[str, int, bool]]  # (name, numel, ever had a grad tensor)
    carried: list[str]


class _GradWatch:
    """Per optimizer: which trainable parameters ever got a non-zero gradient at a step, and
    which were stepped without their gradient being cleared since the previous step. The flags
    live on the device; :meth:`result` reads them in one transfer."""

    def __init__(self, module: nn.Module, optimizers: list[Any]) -> None:
        self.names = {id(p): n for n, p in module.named_parameters()}
        self.groups: dict[int, _OptState] = {}
        for opt in optimizers:
            params = [p for p in _opt_params(opt) if p.requires_grad]
            if params:
                self.groups[id(_unwrap(opt))] = _OptState(params)
        self.steps = 0

    def before_backward(self) -> None:
        for state in self.groups.values():
            if state.steps:
                state.mark_cleared()

    def before_step(self, optimizer: Any) -> None:
        self.steps += 1
        state = self.groups.get(id(_unwrap(optimizer)))
        if state is not None:
            state.step()

    def result(self) -> _GradResult:
        """Read the flags (one transfer) and name the parameters."""
        states = [s for s in self.groups.values() if s.steps]
        if not states:
            return _GradResult([], [])
        device = states[0].device
        host = stats.vector_to_host(torch.cat([s.flags().to(device) for s in states]))
        no_grad, carried, offset = [], [], 0
        for state in states:
            n = len(state.params)
            got, bad = host[offset : offset + n], host[offset + n : offset + 2 * n]
            offset += 2 * n
            for p, g, c, seen in zip(state.params, got, bad, state.had_grad):
                name = self.names.get(id(p), f"<unnamed {tuple(p.shape)}>")
                if g == 0 and p.requires_grad:  # frozen since the fit started (BaseFinetuning)
                    no_grad.append((name, p.numel(), seen))
                if c != 0:
                    carried.append(name)
        return _GradResult(no_grad, carried)


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
