"""PaddingCheck: does a sequence loss average over the padding?"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_recipe._probe import (
    CLASS_LOSSES,
    ProbeSkip,
    StepFn,
    copy_module,
    is_manual_optimization,
    preserved_rng,
    run_step,
)
from lightning_recipe.batch import BatchLayoutError, Getter
from lightning_recipe.checks._sequence import dominant_value, edge_runs, loss_rows, row_runs, target_views
from lightning_recipe.checks.base import FirstBatchCheck
from lightning_recipe.findings import Severity


class PaddingCheck(FirstBatchCheck):
    """Is the sequence loss averaged over padding positions?

    Batches of sequences of different lengths are padded to the longest; unless the loss is told
    to skip the padding (``ignore_index``, labels padded with -100, a mask over the per-token
    losses), it averages over it too. Predicting "padding after padding" is trivial, so the logged
    loss falls far below what the real tokens allow, the real tokens' gradient is diluted, and
    perplexities mean nothing. Nothing raises. On the first training batch, on a copy in eval mode,
    the check runs your ``training_step`` (or ``step_fn``), reads the class loss call
    (``cross_entropy`` / ``nll_loss`` with per-position targets), finds the padding (the most
    frequent target value in runs to the end of each sequence, where the input runs out too) and
    reads which targets the loss counts from the gradient of the loss with respect to the scores.

    Reports ``loss-includes-padding`` (warning) when padding makes up at least ``min_share`` of the
    positions the loss counts, with the loss as logged and over the real tokens only.

    Thresholds: see docs/thresholds.md#padding.

    Args:
        min_share: smallest share of the counted targets that are padding to report (0..1).
        get_input, get_target, step_fn, on_error: see :class:`FirstBatchCheck`.

    Example::

        trainer = L.Trainer(callbacks=[PaddingCheck()])
        trainer.fit(model, datamodule)
        # [loss-includes-padding] 74% of the targets cross_entropy averages over are padding ...
    """

    codes = ("loss-includes-padding",)

    what = "look for padding in the loss"

    def __init__(
        self,
        min_share: float = 0.05,
        *,
        get_input: Getter | None = None,
        get_target: Getter | None = None,
        step_fn: StepFn | None = None,
        on_error: str = "warn",
    ) -> None:
        super().__init__(get_input=get_input, get_target=get_target, step_fn=step_fn, on_error=on_error)
        if isinstance(min_share, bool) or not isinstance(min_share, (int, float)) or not 0 < min_share < 1:
            raise ValueError(f"`min_share` must be a number in (0, 1), got {min_share!r}")
        self.min_share = float(min_share)

    def check(self, trainer: Any | None, module: nn.Module, batch: Any) -> None:
        """Measure the share of padding in the loss on ``batch`` (also with ``trainer=None``)."""
        start = time.perf_counter()
        if self.step_fn is None and is_manual_optimization(module):
            raise ProbeSkip(
                "the module uses manual optimisation, so its training_step steps the optimizers; "
                "pass step_fn=lambda model, batch: loss"
            )
        n = self.adapter.batch_size(batch)
        with preserved_rng():
            model = copy_module(module, trainer)
            model.eval()
            with torch.enable_grad():
                result = run_step(model, batch, self.step_fn)
            measured = self._measure(result, batch, n)
        self.figures["seconds"] = round(time.perf_counter() - start, 4)
        if measured is not None:
            self._judge(trainer, measured)

    def _measure(self, result: Any, batch: Any, n: int) -> dict[str, Any] | None:
        call = result.main_call
        if call is None or call.name not in CLASS_LOSSES or not isinstance(call.target, Tensor):
            self.figures["padding"] = "no class loss with integer targets"
            return None
        rows = loss_rows(call)
        views = [v for v in target_views(call, n) if v.values.shape[1] > 1]
        if rows is None or not views:
            self.figures["padding"] = "the targets are not per-position"
            return None
        loss = result.loss if result.loss is not None and result.loss.requires_grad else call.output
        if not call.input.requires_grad or not loss.requires_grad:
            raise ProbeSkip(f"the loss does not depend on the scores passed to {call.name}")
        total = loss if loss.dim() == 0 else loss.sum()
        (grad,) = torch.autograd.grad(total, call.input, allow_unused=True)
        if grad is None:
            raise ProbeSkip(f"the step's loss does not depend on the scores passed to {call.name}")
        counted = grad.detach().movedim(1, -1).reshape(-1, rows.shape[1]).abs().sum(-1) > 0
        runs_in = self._input_runs(batch, n)
        best: dict[str, Any] | None = None
        for view in views:
            pad, _ = dominant_value(view.values, view.valid)
            if pad is None:
                continue
            trailing, leading = edge_runs(view.values, pad)
            side = "end" if int(trailing.sum()) >= int(leading.sum()) else "start"
            run = trailing if side == "end" else leading
            t_len = view.values.shape[1]
            pos = torch.arange(t_len, device=run.device)
            is_pad = pos >= (t_len - run).unsqueeze(1) if side == "end" else pos < run.unsqueeze(1)
            is_pad &= view.valid
            in_loss = counted[view.rows]
            share = float((is_pad & in_loss).sum()) / max(int(in_loss.sum()), 1)
            # padding sits only past the end: a token that also occurs inside sequences is data
            occurrences = int(((view.values == pad) & view.valid).sum())
            at_edge = int(is_pad.sum()) / max(occurrences, 1)
            confirmed = self._confirmed(run, runs_in, side)
            m = {
                "share": share,
                "pad": int(pad),
                "side": side,
                "padded_rows": int((run > 0).sum()),
                "pad_positions": int(is_pad.sum()),
                "at_edge": at_edge,
                "counted_positions": int(in_loss.sum()),
                "confirmed_by_input": confirmed,
                "order": view.order,
                "is_pad": is_pad,
                "view": view,
            }
            if at_edge < 0.9:
                share = m["share"] = 0.0
            if best is None or share > best["share"]:
                best = m
        if best is None:
            return None
        view = best.pop("view")
        is_pad = best.pop("is_pad")
        real = view.valid & ~is_pad
        best["loss"] = float(call.output.detach().float().mean())
        best["real_token_loss"] = _loss_over(call.name, rows, view, real)
        self.figures.update({k: v for k, v in best.items() if k != "confirmed_by_input"})
        return best

    def _input_runs(self, batch: Any, n: int) -> dict[str, Tensor] | None:
        """Per row, how many positions at the end / start of the input repeat the last / first one."""
        try:
            x = self.adapter.input(batch)
        except BatchLayoutError:
            return None
        if x.dim() < 2 or x.shape[0] != n or x.shape[1] < 2:
            return None
        x = x.detach()
        return {"end": row_runs(x), "start": row_runs(x.flip(1))}

    @staticmethod
    def _confirmed(run: Tensor, runs_in: dict[str, Tensor] | None, side: str) -> bool | None:
        """The input runs out in the same rows, by the same length within 2 (None: no input to ask)."""
        if runs_in is None:
            return None
        padded = run >= 2
        if int(padded.sum()) == 0:
            return False
        agree = (runs_in[side][padded].to(run.device) - run[padded]).abs() <= 2
        return float(agree.float().mean()) >= 0.8

    def _judge(self, trainer: Any | None, m: dict[str, Any]) -> None:
        share = m["share"]
        confirmed = m["confirmed_by_input"]
        enough = share >= self.min_share if confirmed else (confirmed is None and share >= 0.5)
        if not enough or m["padded_rows"] < 2:
            return
        real = m["real_token_loss"]
        vs_real = f", over the real tokens only {real:.4g}" if real is not None else ""
        self.report(
            trainer,
            "loss-includes-padding",
            Severity.WARNING,
            f"{share:.0%} of the targets the loss averages over are padding (value {m['pad']} at the "
            f"{m['side']} of {m['padded_rows']} sequences, {m['pad_positions']} positions): the loss "
            f"counts them (loss {m['loss']:.4g}{vs_real} at init), so once the model learns that padding "
            "follows padding the logged loss falls far below what the real tokens allow and their "
            f"gradient is diluted; pass ignore_index={m['pad']} to the loss (or pad the labels with "
            "-100), or mask the per-token loss and divide by the number of real tokens.",
            {k: v for k, v in m.items()},
        )


def _loss_over(name: str, rows: Tensor, view: Any, keep: Tensor) -> float | None:
    """The call's loss over the kept positions only (mean), or None."""
    idx = view.rows[keep]
    if idx.numel() == 0:
        return None
    scores = rows.detach()[idx].float()
    target = view.values[keep].long()
    fn = F.nll_loss if name == "nll_loss" else F.cross_entropy
    try:
        return float(fn(scores, target))
    except Exception:
        return None
