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
    updates shrink the weights instead of fitting the data (and a gradient check mostly checks the
    penalty). On the first training batch, on a copy of the model (every RNG restored), the check
    runs your ``training_step`` once, splits the loss it returns into

    * the *data loss*: the ``torch.nn.functional`` loss calls (``nn.*Loss`` modules call them
      too) that reach the returned loss, with the weight each has in it (read by autograd, so
      ``0.5 * ce + 0.5 * mse`` or a masked mean of a ``reduction="none"`` loss count fully), and
    * the *penalty*: the rest (``loss - data``), e.g. ``lam * sum(w ** 2)`` added by hand,

    and takes the gradient of each with respect to the parameters. Only penalties that depend on
    the parameters alone are judged: the step is run a second time with the input zeroed, and a
    rest that changes with the input (a VAE's KL term, an activation penalty, a focal loss
    reweighting ``reduction="none"`` losses) is an auxiliary loss, not a regulariser, and is left
    alone. Weight decay set in the optimizer (``weight_decay=...``) is not part of the loss and is
    never seen here.

    Finding ``regularization-dominates`` (warning): the penalty's gradient norm is more than
    ``max_grad_ratio`` times the data gradient's. Figures: ``penalty_fraction`` (penalty / total
    loss), ``grad_ratio`` (norm of the penalty's gradient / norm of the data gradient).

    Measured (first batch of 64, 3 seeds each; an MLP 64-128-10 and a small CNN on digits, a
    64-1024-1024-10 MLP on digits, an MLP regression on blobs), hand L2 ``lam * sum(w ** 2)`` over
    the weights: ``lam`` 1e-4 gives grad ratios 0.0004-0.0046 (penalty 0.05-3% of the loss), 5e-4
    0.002-0.023 (0.3-13%), 5e-3 (10x the usual) 0.02-0.23, 5e-2 0.21-0.94 (21-94%); the issue's
    broken case, 0.1 on the MLP (penalty 2/3 of the loss at init), 1.39-1.43, the CNN 1.75-1.87,
    the wide MLP 4.4-4.6. Hence ``max_grad_ratio=0.5``: 20x the largest ratio of a usual weight
    decay, and the penalty then pulls at least half as hard as the data.

    Cost: at fit start, one deep copy of the model, two training steps on the first batch and
    three backward passes; nothing afterwards.

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
        # every loss call that reaches the loss: torch.nn.functional losses, loss modules and
        # metric objects used as losses, distribution log-likelihoods (by the log_prob tensor
        # that is in the graph); a whole step read as the loss says nothing about a penalty
        outs = [c.output for c in result.calls]
        outs += [
            c.extra.get("log_prob", c.output) for c in result.module_calls if getattr(c, "kind", "") != "step"
        ]
        outs = _outermost([o for o in outs if o.requires_grad])
        if not outs:
            raise ProbeSkip(
                "no loss call (torch.nn.functional loss, loss module, metric or distribution "
                "log-likelihood) reaching the loss was seen in training_step, so the data loss cannot "
                "be told apart from a penalty"
            )
        weights = torch.autograd.grad(loss, outs, retain_graph=True, allow_unused=True)
        parts = [(w.detach() * o).sum() for w, o in zip(weights, outs) if w is not None]
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
