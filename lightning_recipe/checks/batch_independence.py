"""BatchIndependenceCheck: does one sample's output depend on another sample's input?"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_recipe._probe import (
    HookSet,
    ProbeSkip,
    StepFn,
    StepResult,
    UserStepError,
    copy_module,
    is_manual_optimization,
    preserved_rng,
    run_step,
)
from lightning_recipe.batch import Getter
from lightning_recipe.checks.base import FirstBatchCheck
from lightning_recipe.findings import Severity

#: embedding layers whose output stands in for integer inputs (token ids)
_EMBEDDINGS = (nn.Embedding, nn.EmbeddingBag)
#: how many leaking (from, to) pairs go into the evidence
_MAX_PAIRS = 12


class BatchIndependenceCheck(FirstBatchCheck):
    """Chart the dependencies between the samples of a batch with backprop (Karpathy's recipe).

    A ``view`` where a ``permute`` was meant, batch-first data fed to a time-first RNN, or a
    normalisation over the batch in ``forward`` (``x - x.mean(0)``) silently mixes the samples of a
    batch: training still "works", but every prediction depends on the rest of the batch. On the
    first training batch, on a copy of the model in eval mode (the real model, its gradients and
    every RNG are left alone), the check back-propagates a fixed random weighting of sample ``i``'s
    output to the input (to the first embedding's output for token ids) and measures the gradient
    that reaches every other sample. A model without a per-sample output (only flattened
    ``(batch * time, ...)`` or ``(batch, batch)`` tensors) is skipped (``check-skipped``).

    Reports ``batch-mixing`` (error; a warning when a BatchNorm with ``track_running_stats=False``
    mixes the batch by design) when a leak exceeds ``tolerance``.

    Thresholds: see docs/thresholds.md#batch-independence.

    Args:
        num_probes: how many samples (spread over the batch) to back-propagate from (>= 1).
        max_batch: cut the batch to at most this many samples (>= 2); the full batch is used when
            the step fails on the smaller one.
        tolerance: largest leak (fraction of the strongest input gradient) still counted as
            float noise, in (0, 1).
        get_input, get_target, step_fn, on_error: see :class:`FirstBatchCheck`.

    Example::

        trainer = L.Trainer(callbacks=[BatchIndependenceCheck()])
        trainer.fit(model, datamodule)
        # [batch-mixing] The outputs of samples 0, 3, 6 (the forward output (7, 10), model in
        # eval mode) depend on other samples: ... 3->4: 1, 6->1: 1 ...; look for a view/reshape ...
    """

    codes = ("batch-mixing",)

    what = "chart the dependencies between the samples of a batch"

    def __init__(
        self,
        num_probes: int = 3,
        max_batch: int = 7,
        tolerance: float = 1e-4,
        *,
        get_input: Getter | None = None,
        get_target: Getter | None = None,
        step_fn: StepFn | None = None,
        on_error: str = "warn",
    ) -> None:
        super().__init__(get_input=get_input, get_target=get_target, step_fn=step_fn, on_error=on_error)
        if isinstance(num_probes, bool) or not isinstance(num_probes, int) or num_probes < 1:
            raise ValueError(f"`num_probes` must be a positive int, got {num_probes!r}")
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 2:
            raise ValueError(f"`max_batch` must be an int >= 2, got {max_batch!r}")
        if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0 < tolerance < 1:
            raise ValueError(f"`tolerance` must be a number in (0, 1), got {tolerance!r}")
        self.num_probes = num_probes
        self.max_batch = max_batch
        self.tolerance = float(tolerance)

    # ------------------------------------------------------------------ one-shot API
    def check(self, trainer: Any | None, module: nn.Module, batch: Any) -> None:
        """Chart the sample dependencies on ``batch`` and report leaks (also with ``trainer=None``)."""
        start = time.perf_counter()
        if self.step_fn is None and is_manual_optimization(module):
            raise ProbeSkip(
                "the module uses manual optimisation, so its training_step steps the optimizers; "
                "pass step_fn=lambda model, batch: loss to chart the dependencies"
            )
        x = self.adapter.input(batch)
        if x.dim() == 0:
            raise ProbeSkip("the batch input is a 0-d tensor, it has no batch dimension")
        n = self.adapter.batch_size(batch)  # graphs, for a batch of concatenated graphs
        if n < 2:
            raise ProbeSkip(f"the first batch has {n} sample; at least 2 are needed to see mixing")
        if not (x.is_floating_point() or _is_integer(x)):
            raise ProbeSkip(
                f"the input has dtype {x.dtype}, which can neither take a gradient nor be embedded"
            )
        with preserved_rng():
            chart = self._chart(trainer, module, batch, x)
        chart.seconds = time.perf_counter() - start
        self._judge(trainer, module, chart)

    # ------------------------------------------------------------------ measuring
    def _chart(self, trainer: Any | None, module: nn.Module, batch: Any, x: Tensor) -> _Chart:
        n = self.adapter.batch_size(batch)
        k = _probe_batch_size(n, self.max_batch, tuple(x.shape[1:]))
        sizes = [k] if k == n else [k, n]
        for attempt, size in enumerate(sizes):
            model = copy_module(module, trainer)
            model.eval()
            for p in model.parameters():
                p.requires_grad_(False)
            sub = self.adapter.slice(batch, size) if size < n else batch
            try:
                return self._chart_on(model, sub, size)
            except ProbeSkip as why:
                if isinstance(why, UserStepError) and attempt + 1 < len(sizes):
                    continue  # the model may need the full batch (a hard-coded batch size)
                raise
            except Exception as exc:
                if attempt + 1 < len(sizes):
                    continue  # the model may need the full batch (a hard-coded batch size)
                raise ProbeSkip(
                    f"training_step failed on the model copy in eval mode ({type(exc).__name__}: {exc})"
                ) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def _chart_on(self, model: nn.Module, batch: Any, k: int) -> _Chart:
        x = self.adapter.input(batch)
        layout = self.adapter.graph(batch, x)
        groups = layout.assignment if layout is not None else None
        if groups is not None and not x.is_floating_point():
            raise ProbeSkip(
                f"the batch concatenates {k} graphs and their node input is {x.dtype}, not float, so "
                "there is no per-graph input to take a gradient at"
            )
        if x.is_floating_point():
            leaf = x.detach().clone().requires_grad_(True)
            batch = self.adapter.with_input(batch, leaf)
            at = "the input"
            embed = None
        else:
            leaf = None
            embed = _EmbeddingLeaf(x, k)
            at = ""
        outputs = _OutputProbe(k, nodes=int(groups.shape[0]) if groups is not None else None)
        attach = embed.attached(model) if embed is not None else _nothing()
        with attach, outputs.attached(model), torch.enable_grad():
            result = run_step(model, batch, self.step_fn)
        if embed is not None:
            if embed.leaf is None:
                raise ProbeSkip(
                    f"the input is integer ({x.dtype}, token ids?) and no nn.Embedding was called on it "
                    f"with {k} samples in its first dimension, so there is no float tensor to take a "
                    "gradient at"
                )
            leaf, at = embed.leaf, f"the output of embedding '{embed.name}'"
        out, source = outputs.choose(result, k)
        if out is None:
            raise ProbeSkip(
                f"no output with the batch size ({k}) in its first dimension depends on the input (the "
                "forward output, the loss input and the submodule outputs were looked at; flattened "
                "batch*time outputs are not used); if the guessed input is not what the model reads "
                "(a batch such as (sample_weight, x, y)), pass get_input=lambda batch: ..."
            )
        assert leaf is not None
        if groups is not None:
            at += f" (nodes of {k} graphs, by the assignment vector)"
        return _Chart(k, at, f"{source} {tuple(out.shape)}", *self._probe(out, leaf, k, groups))

    def _probe(
        self, out: Tensor, leaf: Tensor, k: int, groups: Tensor | None = None
    ) -> tuple[list[int], list[list[float]], list[int]]:
        gen = torch.Generator().manual_seed(0)
        weights = torch.randn(tuple(out.shape[1:]), generator=gen, dtype=torch.float64)
        weights = weights.to(device=out.device, dtype=out.dtype)
        probes = _spread(k, self.num_probes)
        rows: list[list[float]] = []
        used: list[int] = []
        dead: list[int] = []
        for n_done, i in enumerate(probes):
            last = n_done == len(probes) - 1
            if groups is not None and out.shape[0] != k:  # node-level output: graph i's nodes
                picked = (out * weights)[groups.to(out.device) == i].sum()
            else:
                picked = (out[i] * weights).sum()
            (grad,) = torch.autograd.grad(picked, leaf, retain_graph=not last, allow_unused=True)
            if grad is None:
                dead.append(i)
                continue
            if groups is None:
                mags = grad.detach().reshape(k, -1).abs().amax(dim=1).double()
            else:  # rows are nodes: the largest gradient over each graph's nodes
                per_row = grad.detach().reshape(grad.shape[0], -1).abs().amax(dim=1).double()
                mags = torch.zeros(k, dtype=per_row.dtype, device=per_row.device)
                mags = mags.scatter_reduce(0, groups.to(per_row.device), per_row, "amax")
            top = float(mags.max())
            if top == 0.0 or not torch.isfinite(mags).all():
                dead.append(i)
                continue
            rows.append((mags / top).cpu().tolist())
            used.append(i)
        return used, rows, dead

    # ------------------------------------------------------------------ judging
    def _judge(self, trainer: Any | None, module: nn.Module, chart: _Chart) -> None:
        pairs = [
            (i, j, r)
            for i, row in zip(chart.probes, chart.rows)
            for j, r in enumerate(row)
            if j != i and r > self.tolerance
        ]
        worst = max(
            (r for row, i in zip(chart.rows, chart.probes) for j, r in enumerate(row) if j != i), default=0.0
        )
        self.figures.update(
            {
                "batch_size": chart.batch_size,
                "probes": chart.probes,
                "gradient_at": chart.at,
                "output": chart.output,
                "max_leak": worst,
                "seconds": chart.seconds,
            }
        )
        if not chart.probes:
            self.skip(
                trainer,
                f"the per-sample output ({chart.output}) has no gradient on {chart.at} for samples "
                f"{chart.dead}, so there is no dependency to chart",
            )
            return
        if not pairs:
            return
        pairs.sort(key=lambda p: -p[2])
        batch_stats = _batch_stat_norms(module)
        shown = ", ".join(f"{i}->{j}: {r:.2g}" for i, j, r in pairs[:4])
        froms = sorted({i for i, _, _ in pairs})
        reached = sorted({j for _, j, _ in pairs})
        evidence = {
            "pairs": [{"from": i, "to": j, "leak": r} for i, j, r in pairs[:_MAX_PAIRS]],
            "max_leak": pairs[0][2],
            "leaking_probes": froms,
            "samples_reached": reached,
            "batch_size": chart.batch_size,
            "gradient_at": chart.at,
            "output": chart.output,
            "tolerance": self.tolerance,
        }
        msg = (
            f"The output{'s' if len(froms) > 1 else ''} of sample{'s' if len(froms) > 1 else ''} "
            f"{', '.join(map(str, froms))} ({chart.output}, model in eval mode) depend"
            f"{'' if len(froms) > 1 else 's'} on other samples: back-propagated to {chart.at}, "
            f"{len(reached)} of the {chart.batch_size} samples get a gradient from another sample's "
            f"output (leak i->j as a fraction of the strongest input gradient: {shown}; healthy "
            "models give 0): "
        )
        if batch_stats:
            evidence["batch_statistics_layers"] = batch_stats
            self.report(
                trainer,
                "batch-mixing",
                Severity.WARNING,
                msg + f"{', '.join(batch_stats[:3])} normalise{'s' if len(batch_stats) == 1 else ''} with "
                "batch statistics in eval mode (track_running_stats=False), so every prediction depends on "
                "the rest of its batch; fine if intended, otherwise use running statistics or GroupNorm.",
                evidence,
            )
            return
        self.report(
            trainer,
            "batch-mixing",
            Severity.ERROR,
            msg + "samples are mixed across the batch; look for a view/reshape that should be a "
            "permute/transpose, an RNN/attention layer fed batch-first data while it expects time-first, "
            "or a mean/normalisation over dim 0 in forward.",
            evidence,
        )


# ---------------------------------------------------------------------------- helpers
@dataclass
class _Chart:
    batch_size: int
    at: str
    output: str
    probes: list[int]
    rows: list[list[float]]
    dead: list[int]
    seconds: float = 0.0


@contextmanager
def _nothing() -> Iterator[None]:
    yield


def _is_integer(x: Tensor) -> bool:
    return not x.is_floating_point() and not x.is_complex() and x.dtype is not torch.bool


def _probe_batch_size(n: int, max_batch: int, other_dims: tuple[int, ...]) -> int:
    """At most ``max_batch`` samples, avoiding a size equal to another input dimension."""
    k = min(n, max_batch)
    while k > 2 and k in other_dims:
        k -= 1
    return k


def _spread(k: int, m: int) -> list[int]:
    """``m`` sample indices spread evenly over ``range(k)`` (first and last included)."""
    if m >= k:
        return list(range(k))
    if m == 1:
        return [0]
    return sorted({round(j * (k - 1) / (m - 1)) for j in range(m)})


def _first_tensor(value: Any, ok: Any) -> Tensor | None:
    if isinstance(value, Tensor):
        return value if ok(value) else None
    if isinstance(value, Mapping):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        for v in value:
            hit = _first_tensor(v, ok)
            if hit is not None:
                return hit
    return None


def _shares_storage(a: Tensor, b: Tensor) -> bool:
    try:
        return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return False


def _batch_stat_norms(module: nn.Module) -> list[str]:
    """Names of BatchNorm layers that normalise with batch statistics in eval mode."""
    from torch.nn.modules.batchnorm import _BatchNorm

    return [
        name or type(m).__name__
        for name, m in module.named_modules()
        if isinstance(m, _BatchNorm) and not m.track_running_stats
    ]


class _OutputProbe:
    """Keeps the candidates for "the output of sample i": the model's forward output and the
    output of the last submodule that ran, both with ``k`` rows and depending on the input
    (see :meth:`qualifies`)."""

    def __init__(self, k: int, nodes: int | None = None) -> None:
        self.k = k
        #: for a graph batch, the number of nodes: a node-level output (one row per node) counts
        self.nodes = nodes
        self.top: Tensor | None = None
        self.last: Tensor | None = None

    def qualifies(self, t: Tensor) -> bool:
        """``k`` rows, depends on the input, and no other dimension of size ``k``: a
        (batch, batch) tensor is a sample-by-sample matrix (in-batch similarities of a
        contrastive model), where every row depends on every sample by design."""
        rows = (self.k,) if self.nodes is None else (self.k, self.nodes)
        return (
            t.dim() >= 1
            and t.shape[0] in rows
            and self.k not in t.shape[1:]
            and t.requires_grad
            and (t.is_floating_point() or t.is_complex())
        )

    @contextmanager
    def attached(self, model: nn.Module) -> Iterator[None]:
        def on_top(mod: nn.Module, args: Any, out: Any) -> None:
            if self.top is None:
                self.top = _first_tensor(out, self.qualifies)

        def on_sub(mod: nn.Module, args: Any, out: Any) -> None:
            hit = _first_tensor(out, self.qualifies)
            if hit is not None:
                self.last = hit

        with HookSet() as hooks:
            hooks.forward(model, on_top)
            for m in model.modules():
                if m is not model:
                    hooks.forward(m, on_sub)
            yield

    def choose(self, result: StepResult, k: int) -> tuple[Tensor | None, str]:
        if self.top is not None:
            return self.top, "the forward output"
        call = result.main_call
        if call is not None and self.qualifies(call.input):
            return call.input, f"the input of {call.name}"
        if self.last is not None:
            return self.last, "the last submodule output"
        return None, ""


class _EmbeddingLeaf:
    """Replaces the output of the first embedding called on the token ids with a leaf tensor
    that requires a gradient (integer inputs cannot take one)."""

    def __init__(self, tokens: Tensor, k: int) -> None:
        self.tokens = tokens
        self.k = k
        self.leaf: Tensor | None = None
        self.name = ""

    @contextmanager
    def attached(self, model: nn.Module) -> Iterator[None]:
        with HookSet() as hooks:
            for name, m in model.named_modules():
                if isinstance(m, _EMBEDDINGS):
                    hooks.forward(m, self._hook(name or type(m).__name__))
            yield

    def _hook(self, name: str) -> Any:
        def hook(mod: nn.Module, args: Any, out: Any) -> Any:
            if self.leaf is not None or not args or not isinstance(args[0], Tensor):
                return None
            ids = args[0]
            if not isinstance(out, Tensor) or out.dim() == 0 or out.shape[0] != self.k:
                return None
            if ids.dim() == 0 or ids.shape[0] != self.k:
                return None
            if not (ids.shape == self.tokens.shape or _shares_storage(ids, self.tokens)):
                return None
            self.leaf = out.detach().clone().requires_grad_(True)
            self.name = name
            return self.leaf

        return hook
