"""RegularizationCheck: does a penalty added to the loss by hand overwhelm the data loss at init?"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from lightning_recipe import stats
from lightning_recipe._probe import (
    ProbeSkip,
    StepFn,
    UserStepError,
    copy_module,
    is_manual_optimization,
    preserved_rng,
    run_step,
    seed_rngs,
)
from lightning_recipe._validate import check_number
from lightning_recipe.batch import BatchLayoutError, Getter
from lightning_recipe.checks.base import FirstBatchCheck
from lightning_recipe.findings import Severity

_SEED = 1234


class RegularizationCheck(FirstBatchCheck):
    """Compare a penalty added to the loss by hand with the data loss, on the first batch.

    cs231n: "the loss is data loss + regularization loss ... don't let the regularization
    overwhelm the data": when the penalty's gradient is larger than the data gradient, the first
    updates shrink the weights instead of fitting the data. On the first training batch, on a copy
    of the model, the check splits the loss your ``training_step`` returns into the *data loss*
    (the ``torch.nn.functional`` loss calls that reach it, weighted as autograd says) and the
    *penalty* (the rest, e.g. ``lam * sum(w ** 2)``), and compares their gradients with respect to
    the parameters. A rest that changes when the input is zeroed (a VAE's KL term, an activation
    penalty) is an auxiliary loss and is left alone; the optimizer's ``weight_decay`` is never seen.

    Reports ``regularization-dominates`` (warning) when the penalty's gradient norm is more than
    ``max_grad_ratio`` times the data gradient's (figures ``grad_ratio``, ``penalty_fraction``).

    Thresholds: see docs/thresholds.md#regularization.

    Args:
        max_grad_ratio: norm(penalty gradient) / norm(data gradient) above which the finding fires.
        get_input: ``callable(batch) -> Tensor`` for batch layouts the guess cannot read.
        get_target: ``callable(batch) -> Tensor | None`` likewise.
        step_fn: ``callable(model, batch) -> loss`` replacing ``training_step`` (needed under
            manual optimisation).
        on_error: ``"warn"`` or ``"raise"``.

    Example::

        trainer = L.Trainer(callbacks=[RegularizationCheck()])
        trainer.fit(model, datamodule)  # warns "[regularization-dominates] ..." for lam far too large
    """

    codes = ("regularization-dominates",)

    what = "compare the penalty in the loss with the data loss"

    def __init__(
        self,
        max_grad_ratio: float = 0.5,
        *,
        get_input: Getter | None = None,
        get_target: Getter | None = None,
        step_fn: StepFn | None = None,
        on_error: str = "warn",
    ) -> None:
        super().__init__(get_input=get_input, get_target=get_target, step_fn=step_fn, on_error=on_error)
        self.max_grad_ratio = check_number("max_grad_ratio", max_grad_ratio, 0, None, low_open=True)

    # ------------------------------------------------------------------ work
    def check(self, trainer: Any | None, module: nn.Module, batch: Any) -> None:
        if self.step_fn is None and is_manual_optimization(module):
            raise ProbeSkip(
                "the module uses manual optimisation, so its training_step steps the optimizers; "
                "pass step_fn=lambda model, batch: loss"
            )
        model = copy_module(module, trainer)
        try:
            with preserved_rng(), torch.enable_grad():
                measured = self._measure(model, batch)
        finally:
            del model
        if measured is None:
            self.figures.update({"penalty_fraction": 0.0, "grad_ratio": 0.0})
            return
        self._judge(trainer, measured)

    def _split(self, model: nn.Module, batch: Any) -> tuple[Tensor, Tensor, Tensor]:
        """(total loss, data loss, penalty) of one training step, as graphs on the copy."""
        seed_rngs(_SEED)
        result = run_step(model, batch, self.step_fn)
        loss = result.loss
        if loss is None:
            raise ProbeSkip("training_step returned None on the first batch")
        if loss.numel() != 1 or not loss.requires_grad:
            raise ProbeSkip("the training step's loss is not a scalar with a gradient")
        loss = loss.reshape(())
        explained = _explains(result.main_call, loss)
        calls = [c for c in [*result.calls, *result.module_calls] if c.output.requires_grad]
        # a distribution loss by the log_prob tensor that is in the graph; a loss module that
        # calls a functional loss (or a log_prob) inside counts once, as the outermost
        outs = _outermost([getattr(c, "extra", {}).get("log_prob", c.output) for c in calls])
        if not outs and explained:
            return loss, loss, loss - loss  # the loss is its loss call's value: nothing added to it
        if not outs:
            raise ProbeSkip(
                "no loss call (torch.nn.functional loss, loss module, metric or distribution "
                "log-likelihood) reaching the loss was seen in training_step, so the data loss cannot "
                "be told apart from a penalty"
            )
        weights = torch.autograd.grad(loss, outs, retain_graph=True, allow_unused=True)
        parts = [(w.detach() * o).sum() for w, o in zip(weights, outs) if w is not None]
        if not parts and explained:
            return loss, loss, loss - loss
        if not parts:
            raise ProbeSkip("no loss call seen in training_step reaches the loss it returns")
        data = torch.stack([p.float() for p in parts]).sum().to(loss.dtype)
        return loss, data, loss - data

    def _measure(self, model: nn.Module, batch: Any) -> dict[str, float] | None:
        loss, data, penalty = self._split(model, batch)
        params = [p for p in model.parameters() if p.requires_grad]
        g_total = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        g_data = torch.autograd.grad(data, params, allow_unused=True)
        pairs = [(t, d) for t, d in zip(g_total, g_data) if t is not None or d is not None]
        data_grads = [d if d is not None else torch.zeros_like(t) for t, d in pairs]
        pen_grads = [
            (t if t is not None else torch.zeros_like(d)) - (d if d is not None else torch.zeros_like(t))
            for t, d in pairs
        ]
        values = {
            "loss": loss.detach(),
            "data_loss": data.detach(),
            "penalty": penalty.detach(),
            "data_grad_norm": stats.norms(data_grads).norm() if data_grads else torch.zeros(()),
            "penalty_grad_norm": stats.norms(pen_grads).norm() if pen_grads else torch.zeros(()),
        }
        host = stats.to_host(values)  # the one host transfer of the check
        scale = abs(host["loss"]) + abs(host["data_loss"])
        # float32 rounding of loss - data: a rest this small is no penalty at all
        if abs(host["penalty"]) <= 1e-5 * max(scale, 1e-8) or not all(map(math.isfinite, host.values())):
            self.figures.update({k: host[k] for k in ("loss", "data_loss")})
            return None
        host["grad_ratio"] = host["penalty_grad_norm"] / max(host["data_grad_norm"], 1e-12)
        host["penalty_fraction"] = host["penalty"] / host["loss"] if host["loss"] else math.inf
        if host["grad_ratio"] > self.max_grad_ratio:
            host["depends_on_input"] = float(self._depends_on_input(model, batch, host["penalty"]))
        return host

    def _depends_on_input(self, model: nn.Module, batch: Any, penalty: float) -> bool:
        """True when the rest of the loss changes when the input is zeroed (an auxiliary loss)."""
        try:
            zeroed = self.adapter.zero_inputs(batch)
            _, _, other = self._split(model, zeroed)
        except UserStepError as why:
            raise ProbeSkip(
                f"the model could not run on zeroed inputs ({why}), so the penalty could not be told "
                "apart from an auxiliary loss; pass get_input=lambda batch: ..."
            ) from why
        except (ProbeSkip, BatchLayoutError) as why:
            raise ProbeSkip(f"the penalty could not be told apart from an auxiliary loss ({why})") from why
        except Exception as exc:
            raise ProbeSkip(
                f"the model could not run on zeroed inputs ({type(exc).__name__}: {exc}), so the penalty "
                "could not be told apart from an auxiliary loss; pass get_input=lambda batch: ..."
            ) from exc
        value = float(other.detach())
        return abs(value - penalty) > 1e-4 * max(abs(penalty), abs(value), 1e-6)

    def _judge(self, trainer: Any | None, m: dict[str, float]) -> None:
        keys = ("loss", "data_loss", "penalty", "penalty_fraction", "data_grad_norm", "penalty_grad_norm")
        self.figures.update({k: m[k] for k in keys})
        self.figures["grad_ratio"] = m["grad_ratio"]
        if m.get("depends_on_input"):
            self.figures["note"] = (
                "the rest of the loss beyond its loss calls depends on the input: an auxiliary loss, "
                "not a regulariser; not judged"
            )
            return
        if m["grad_ratio"] <= self.max_grad_ratio:
            return
        self.report(
            trainer,
            "regularization-dominates",
            Severity.WARNING,
            f"A penalty added to the loss by hand dominates the data loss at init: it is "
            f"{m['penalty']:.4g} of the loss {m['loss']:.4g} ({m['penalty_fraction']:.0%}) and its gradient "
            f"is {m['grad_ratio']:.2g}x the data gradient (norms {m['penalty_grad_norm']:.3g} vs "
            f"{m['data_grad_norm']:.3g}; flagged above {self.max_grad_ratio:g}x, weight decay at usual "
            "strengths: under 0.03x); the first updates shrink the weights more than they fit the data: "
            "lower the penalty's coefficient (L2 of 1e-4..5e-4 * sum(w^2) is typical), or use the "
            "optimizer's weight_decay.",
            {k: m[k] for k in (*keys, "grad_ratio")} | {"max_grad_ratio": self.max_grad_ratio},
        )


def _explains(call: Any, loss: Tensor) -> bool:
    """True when the value of ``call`` (the step's data-loss call) is the step's loss itself."""
    if call is None or not isinstance(call.output, Tensor) or call.output.numel() != 1:
        return False
    a, b = float(call.output.detach().reshape(())), float(loss.detach())
    return abs(a - b) <= 1e-6 * max(1.0, abs(b))


def _outermost(outs: list[Tensor]) -> list[Tensor]:
    """``outs`` without the ones computed inside another (a loss module that calls a functional
    loss or a ``log_prob``: counting both would count the data loss twice)."""
    if len(outs) < 2:
        return outs
    inner: set[Any] = set()
    for o in outs:
        todo = [fn for fn, _ in o.grad_fn.next_functions] if o.grad_fn is not None else []
        seen: set[Any] = set()
        while todo:
            fn = todo.pop()
            if fn is None or fn in seen:
                continue
            seen.add(fn)
            todo.extend(f for f, _ in fn.next_functions)
        inner |= seen
    kept, ids = [], set()
    for o in outs:
        if o.grad_fn not in inner and id(o) not in ids:
            kept.append(o)
            ids.add(id(o))
    return kept
