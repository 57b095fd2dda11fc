"""ActivationMonitor: per-layer activation histograms, dead ReLU units, saturated tanh/sigmoid units.

Also home of the helpers the other monitors share: :func:`list_layers` (what the monitors call
a "layer"), :class:`ForwardOrder` (the order in which layers run) and :func:`first_tensor`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_recipe import stats, tensorboard
from lightning_recipe._probe import HookSet
from lightning_recipe._validate import check_int
from lightning_recipe.callback import guarded
from lightning_recipe.findings import Severity
from lightning_recipe.monitors.base import TrendMonitor

# ---------------------------------------------------------------------------- layers
#: activations whose units can die (exactly zero for every input)
RELU_TYPES: tuple[type[nn.Module], ...] = (nn.ReLU, nn.ReLU6)
#: activation modules that only get histograms and mean/std (no dead/saturated rule applies)
OTHER_ACTIVATION_TYPES: tuple[type[nn.Module], ...] = (
    nn.LeakyReLU,
    nn.PReLU,
    nn.RReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Softplus,
    nn.Softsign,
    nn.Hardswish,
    nn.Hardshrink,
    nn.Softshrink,
    nn.Tanhshrink,
    nn.LogSigmoid,
    nn.Threshold,
    nn.GLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.Hardtanh,
    nn.Hardsigmoid,
)
ACTIVATION_TYPES: tuple[type[nn.Module], ...] = RELU_TYPES + OTHER_ACTIVATION_TYPES
#: values per histogram: 64 bins need no more, and on a CPU a histogram of 65,536 values costs
#: about 0.35 ms of small kernels, a real share of a logging step of a small model
HISTOGRAM_SAMPLES = 8192
#: TensorBoard re-bins every histogram to 30 buckets for display; writing one with 32 buckets
#: costs 79 us on a CPU against 126 us with 64
HISTOGRAM_BINS = 32
_CHANNELS_FIRST = (
    nn.modules.conv._ConvNd,
    nn.modules.batchnorm._BatchNorm,
    nn.GroupNorm,
    nn.modules.instancenorm._InstanceNorm,
)
_CHANNELS_LAST = (nn.Linear, nn.LayerNorm, nn.Embedding, nn.RNNBase, nn.MultiheadAttention)


@dataclass(frozen=True)
class Layer:
    """One "layer" as the monitors see it.

    Attributes:
        name: the qualified module name (``"net.0"``), used in TensorBoard tags.
        module: the module.
        kind: ``"relu"`` (ReLU/ReLU6: dead units), ``"tanh"`` (Tanh, Hardtanh(-1, 1)) and
            ``"sigmoid"`` (Sigmoid, Hardsigmoid) (saturated units), ``"activation"`` (any other
            activation module), ``"params"`` (a module that owns parameters).
    """

    name: str
    module: nn.Module
    kind: str


def activation_kind(module: nn.Module) -> str | None:
    """``"relu"``, ``"tanh"``, ``"sigmoid"``, ``"activation"`` for activation modules, else ``None``."""
    if isinstance(module, RELU_TYPES):  # ReLU6 is a Hardtanh: test it first
        return "relu"
    if isinstance(module, nn.Tanh):
        return "tanh"
    if isinstance(module, nn.Hardtanh):
        return "tanh" if (module.min_val, module.max_val) == (-1.0, 1.0) else "activation"
    if isinstance(module, (nn.Sigmoid, nn.Hardsigmoid)):
        return "sigmoid"
    if isinstance(module, OTHER_ACTIVATION_TYPES):
        return "activation"
    return None


def owns_parameters(module: nn.Module) -> bool:
    """True if ``module`` has parameters of its own (not only through children)."""
    return next(module.parameters(recurse=False), None) is not None


def list_layers(model: nn.Module, *, activations: bool = True) -> list[Layer]:
    """The "layers" of ``model`` in registration order: every submodule that owns parameters
    (Linear, Conv, norms, RNNs, embeddings, ``nn.MultiheadAttention`` -- which owns its input
    projection and so is not a leaf) plus, with ``activations``, every activation module
    (:data:`ACTIVATION_TYPES`). The root module itself is left out (its output is the model's
    output, and parameters it owns directly, e.g. a positional embedding, have no place in a
    depth order).

    Example::

        for layer in list_layers(model):
            print(layer.name, layer.kind)
    """
    out: list[Layer] = []
    for name, m in model.named_modules():
        if m is model:
            continue
        kind = activation_kind(m)
        if kind is not None and activations:
            out.append(Layer(name, m, kind))
        elif owns_parameters(m):
            out.append(Layer(name, m, "params"))
    return out


def first_tensor(output: Any) -> Tensor | None:
    """The tensor in a module output: itself, or the first tensor of a tuple/list (RNNs return
    ``(output, h_n)``, attention ``(output, weights)``)."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)):
        for item in output:
            if isinstance(item, Tensor):
                return item
    return None


class ForwardOrder:
    """Records the order in which modules are first called during one forward pass.

    Forward pre-hooks (registered with ``track_hook`` so model copies drop them) append a
    module the first time it runs; :meth:`detach` removes them. Registration order is not call
    order in general (a model may define ``self.head`` before ``self.backbone``), so monitors
    that need "the first layer" or "depth" ask the model itself, on a logging step only.

    Example::

        order = ForwardOrder()
        order.attach(modules)
        model(x)
        order.detach()
        order.index  # {id(module): call position}
    """

    def __init__(self) -> None:
        self.index: dict[int, int] = {}
        self._hooks = HookSet()

    def attach(self, modules: list[nn.Module]) -> None:
        self.detach()
        self.index = {}
        for m in modules:
            self._hooks.forward(m, self._hook(m), pre=True)

    def _hook(self, module: nn.Module) -> Callable[..., None]:
        key = id(module)
        index = self.index

        def hook(mod: nn.Module, args: Any) -> None:
            if key not in index:
                index[key] = len(index)

        return hook

    def detach(self) -> None:
        self._hooks.remove()

    @property
    def attached(self) -> bool:
        return bool(self._hooks)

    def sort_key(self, model: nn.Module) -> Callable[[str], tuple[int, int]]:
        """A key for module names: the call position of the module (or of its nearest called
        ancestor, for submodules that are used through their parent's functional code such as
        ``MultiheadAttention.out_proj``), then registration order. Uncalled modules go last."""
        names = {name: i for i, (name, _) in enumerate(model.named_modules())}
        modules = dict(model.named_modules())
        big = len(names) + 1

        def key(name: str) -> tuple[int, int]:
            parts = name.split(".") if name else []
            for cut in range(len(parts), 0, -1):
                m = modules.get(".".join(parts[:cut]))
                if m is not None and id(m) in self.index:
                    return self.index[id(m)], names.get(name, big)
            return big, names.get(name, big)

        return key


# ---------------------------------------------------------------------------- the monitor
class ActivationMonitor(TrendMonitor):
    """Per-layer activation histograms and statistics; dead ReLU and saturated tanh/sigmoid units.

    cs231n: "plot activation/gradient histograms for all layers of the network"; a bad init can
    slow or stop learning, and tanh units should span [-1, 1] rather than sit at 0 or saturate at
    ±1. On each logging step the monitor hooks every layer (:func:`list_layers`: modules that own
    parameters, plus activation modules) for that one batch and logs ``recipe/activations/<layer>``
    (histogram) and ``recipe/activation_stats/<layer>/mean``, ``/std``, ``/dead_fraction`` (ReLU:
    units -- channels of conv outputs, the last dimension otherwise -- zero for the whole batch) and
    ``/saturated_fraction`` (tanh/sigmoid: units beyond ``|tanh| > 0.99`` or sigmoid outside
    [0.01, 0.99] on more than half of their values). Between logging steps it does nothing.
    Functional activations (``F.relu`` in ``forward``) cannot be hooked and are not seen.

    Reports ``dead-units`` and ``saturated-units`` (warnings, once each) when a layer's fraction is
    above its threshold on ``patience`` consecutive logging steps, never on one noisy batch.

    Thresholds: see docs/thresholds.md#activations.

    Args:
        every_n_steps: logging interval in optimizer steps (``None``: the trainer's
            ``log_every_n_steps``).
        dead_threshold: fraction of dead units in a ReLU layer above which it counts (0..1).
        saturated_threshold: likewise for saturated tanh/sigmoid units (0..1).
        patience: consecutive logging steps the condition must hold (>= 1).
        histograms: log the histograms (``False``: scalars and findings only).
        max_calls: calls of one module per forward pass that are measured, logged as
            ``<layer>/call1``, ``<layer>/call2``... (>= 1).
        min_positions: values per unit (batch x spatial / time) needed to judge dead units.
        on_error: ``"warn"`` or ``"raise"`` (no finding of this monitor is an error).

    Example::

        trainer = L.Trainer(callbacks=[ActivationMonitor(every_n_steps=100)],
                            logger=TensorBoardLogger("runs"))
        trainer.fit(model, datamodule)  # warns "[dead-units] 97% of the units of net.1 ..."
    """

    codes = ("dead-units", "saturated-units")

    #: place of this callback's charts in the Recipe section (lower first)
    chart_rank = 40

    needs_full_copy = False  # never runs the model on a copy

    def __init__(
        self,
        every_n_steps: int | None = None,
        dead_threshold: float = 0.9,
        saturated_threshold: float = 0.5,
        patience: int = 3,
        *,
        histograms: bool = True,
        max_calls: int = 4,
        min_positions: int = 8,
        on_error: str = "warn",
    ) -> None:
        super().__init__(every_n_steps, on_error=on_error)
        self.dead_threshold = _fraction("dead_threshold", dead_threshold)
        self.saturated_threshold = _fraction("saturated_threshold", saturated_threshold)
        self.patience = check_int("patience", patience)
        self.max_calls = check_int("max_calls", max_calls)
        self.min_positions = check_int("min_positions", min_positions)
        if not isinstance(histograms, bool):
            raise TypeError(f"`histograms` must be a bool, got {type(histograms).__name__}")
        self.histograms = histograms
        self._hooks = HookSet()
        self._hist = tensorboard.HistogramBatch(HISTOGRAM_BINS, HISTOGRAM_SAMPLES)
        self._values: dict[str, Tensor] = {}
        self._sites: dict[str, tuple[str, str]] = {}  # tag name -> (kind, measure)
        self._calls: dict[str, int] = {}
        self._layout: str | None = None
        self._hook_error: BaseException | None = None
        self._step = 0  # the global step of the batch being measured

    # ------------------------------------------------------------------ hooks
    @guarded
    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if not self.due(trainer):
            return
        self.mark_logged(trainer)
        self._step = trainer.global_step
        self._attach(pl_module)

    @guarded
    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._hooks:
            return
        self._detach()
        if self._hook_error is not None:
            err, self._hook_error = self._hook_error, None
            raise err
        self._finish(trainer)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self.teardown_diagnostics()

    def teardown_diagnostics(self) -> None:
        self._detach()
        self._values = {}
        self._hist = tensorboard.HistogramBatch(HISTOGRAM_BINS, HISTOGRAM_SAMPLES)

    # ------------------------------------------------------------------ attaching
    def _attach(self, model: nn.Module) -> None:
        self._detach()
        self._values, self._sites, self._calls = {}, {}, {}
        self._layout = None
        self._hist = tensorboard.HistogramBatch(HISTOGRAM_BINS, HISTOGRAM_SAMPLES)
        for layer in list_layers(model):
            self._hooks.forward(layer.module, self._make_hook(layer.name, layer.kind))

    def _detach(self) -> None:
        self._hooks.remove()

    def _make_hook(self, name: str, kind: str) -> Callable[..., None]:
        # a closure, not a bound method or partial: deep copies of the model (checks run on
        # copies) then share the function instead of copying this callback
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if self._hook_error is not None:
                return
            try:
                self._measure(name, kind, module, output)
            except Exception as exc:  # never break the user's forward pass
                self._hook_error = exc

        return _not_compiled(hook)

    # ------------------------------------------------------------------ measuring (device only)
    def _measure(self, name: str, kind: str, module: nn.Module, output: Any) -> None:
        if isinstance(module, _CHANNELS_FIRST):
            self._layout = "first"
        elif isinstance(module, _CHANNELS_LAST):
            self._layout = "last"
        y = first_tensor(output)
        if y is None or not y.is_floating_point() or y.numel() == 0:
            return
        count = self._calls.get(name, 0)
        self._calls[name] = count + 1
        if count >= self.max_calls:
            return
        site = name if count == 0 else f"{name}/call{count}"
        y = y.detach()
        # mean/std from the histogram's evenly strided subsample (<= HISTOGRAM_SAMPLES values):
        # a full-tensor var_mean per layer was most of a logging step's cost (1.7 ms per
        # 64x32x16x16 activation on one CPU thread)
        if self.histograms:
            sample = self._hist.add(f"recipe/activations/{site}", [y])
        else:
            sample = tensorboard.subsample([y], HISTOGRAM_SAMPLES)
        var, mean = torch.var_mean(sample, correction=0)
        yf = y if y.dtype == torch.float32 else y.float()
        prefix = f"recipe/activation_stats/{site}"
        self._values[f"{prefix}/mean"] = mean
        self._values[f"{prefix}/std"] = var.sqrt()
        if kind not in ("relu", "tanh", "sigmoid") or y.dim() < 2:
            return
        udim = self._unit_dim(y)
        dims = tuple(d for d in range(y.dim()) if d != udim % y.dim())
        positions = y.numel() // y.shape[udim]
        if kind == "relu":
            if positions < self.min_positions:
                return
            dead = y.amax(dim=dims) == 0  # ReLU outputs are >= 0
            self._values[f"{prefix}/dead_fraction"] = dead.float().mean()
            self._sites[site] = ("relu", f"{prefix}/dead_fraction")
        else:
            sat = yf.abs() > 0.99 if kind == "tanh" else (yf < 0.01) | (yf > 0.99)
            per_unit = sat.float().mean(dim=dims)
            self._values[f"{prefix}/saturated_fraction"] = (per_unit > 0.5).float().mean()
            self._sites[site] = (kind, f"{prefix}/saturated_fraction")

    def _unit_dim(self, y: Tensor) -> int:
        """Dimension that indexes units: channels after convs/BatchNorm, the last dimension
        after Linear/LayerNorm/RNNs; unknown layouts: channels for 4-D/5-D, last for 3-D."""
        if y.dim() == 2:
            return 1
        if self._layout == "first":
            return 1
        if self._layout == "last":
            return y.dim() - 1
        return 1 if y.dim() >= 4 else y.dim() - 1

    # ------------------------------------------------------------------ one sync, then judge
    def _finish(self, trainer: Any) -> None:
        values, self._values = self._values, {}
        host = stats.to_host(values)  # the one device-to-host transfer of the scalars
        writer = tensorboard.get_writer(trainer)
        self._hist.flush(writer, self._step)
        tensorboard.log_scalars(trainer, host, step=self._step)
        self.figures["logging_steps"] = int(self.figures.get("logging_steps", 0)) + 1
        self.figures["layers_seen"] = len({k.rsplit("/", 1)[0] for k in host})
        self._judge(trainer, host)

    def _judge(self, trainer: Any, host: dict[str, float]) -> None:
        step = self._step
        flagged: dict[str, dict[str, dict[str, Any]]] = {"relu": {}, "saturated": {}}
        worst: dict[str, tuple[str, float]] = {}
        for site, (kind, tag) in self._sites.items():
            value = host.get(tag)
            if value is None:
                continue
            group = "relu" if kind == "relu" else "saturated"
            if group not in worst or value > worst[group][1]:
                worst[group] = (site, value)
            limit = self.dead_threshold if group == "relu" else self.saturated_threshold
            key = f"{group}:{site}"
            history = self._history.setdefault(key, [])
            history.append((step, value))
            del history[: -self.patience]
            if self.streaks.update(key, value > limit) >= self.patience:
                flagged[group][site] = {"kind": kind, "history": list(history)}
        if "relu" in worst:
            self.figures["max_dead_fraction"] = {"layer": worst["relu"][0], "value": worst["relu"][1]}
        if "saturated" in worst:
            self.figures["max_saturated_fraction"] = {
                "layer": worst["saturated"][0],
                "value": worst["saturated"][1],
            }
        if flagged["relu"] and not self.has_reported("dead-units"):
            self._report_dead(trainer, flagged["relu"])
        if flagged["saturated"] and not self.has_reported("saturated-units"):
            self._report_saturated(trainer, flagged["saturated"])

    def _report_dead(self, trainer: Any, sites: dict[str, dict[str, Any]]) -> None:
        worst_site, info = max(sites.items(), key=lambda kv: kv[1]["history"][-1][1])
        hist = info["history"]
        others = len(sites) - 1
        self.report(
            trainer,
            "dead-units",
            Severity.WARNING,
            f"{hist[-1][1]:.0%} of the units of ReLU layer {worst_site!r} were zero for the whole batch "
            f"on {len(hist)} logging steps in a row (steps {hist[0][0]}..{hist[-1][0]}: "
            f"{_pcts(hist)}; limit {self.dead_threshold:.0%})"
            + (f", and {others} more layer(s) likewise" if others else "")
            + ": those units pass no gradient and never recover; lower the learning rate, check "
            "the init and the biases, or use LeakyReLU.",
            _evidence(sites, self.dead_threshold, self.patience),
            step=self._step,
        )

    def _report_saturated(self, trainer: Any, sites: dict[str, dict[str, Any]]) -> None:
        worst_site, info = max(sites.items(), key=lambda kv: kv[1]["history"][-1][1])
        hist = info["history"]
        rule = "|tanh| > 0.99" if info["kind"] == "tanh" else "sigmoid < 0.01 or > 0.99"
        others = len(sites) - 1
        self.report(
            trainer,
            "saturated-units",
            Severity.WARNING,
            f"{hist[-1][1]:.0%} of the units of {info['kind']} layer {worst_site!r} were saturated "
            f"({rule}) on most of the batch on {len(hist)} logging steps in a row (steps "
            f"{hist[0][0]}..{hist[-1][0]}: {_pcts(hist)}; limit {self.saturated_threshold:.0%})"
            + (f", and {others} more layer(s) likewise" if others else "")
            + ": saturated units pass almost no gradient; scale down the init (Xavier/Kaiming), "
            "normalise the inputs, or add normalisation layers.",
            _evidence(sites, self.saturated_threshold, self.patience),
            step=self._step,
        )

    # ------------------------------------------------------------------ charts and resume
    def tensorboard_charts(self) -> dict[str, dict[str, tuple[str, list[str]]]]:
        return {
            "Recipe": {
                "Dead ReLU units (fraction per layer)": (
                    "Multiline",
                    [r"recipe/activation_stats/.*/dead_fraction"],
                ),
                "Saturated tanh/sigmoid units (fraction per layer)": (
                    "Multiline",
                    [r"recipe/activation_stats/.*/saturated_fraction"],
                ),
            }
        }


# ---------------------------------------------------------------------------- helpers
def _not_compiled(fn: Callable[..., None]) -> Callable[..., None]:
    """``fn`` run eagerly when it is called from inside a ``torch.compile``d module."""
    disable = getattr(getattr(torch, "compiler", None), "disable", None)
    return disable(fn) if disable is not None else fn


def _pcts(history: list[tuple[int, float]]) -> str:
    return ", ".join(f"{v:.0%}" for _, v in history)


def _evidence(sites: dict[str, dict[str, Any]], threshold: float, patience: int) -> dict[str, Any]:
    return {
        "layers": {site: info["history"][-1][1] for site, info in sites.items()},
        "history": {site: info["history"] for site, info in sites.items()},
        "threshold": threshold,
        "patience": patience,
    }


def _fraction(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise ValueError(f"`{name}` must be a number strictly between 0 and 1, got {value!r}")
    return float(value)


def iter_param_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(name, module)`` for every submodule that owns parameters (the root included, as
    ``""``), in registration order."""
    for name, m in model.named_modules():
        if owns_parameters(m):
            yield name, m
