"""FirstLayerFilterMonitor: look at the first layer's filters, and say when they are still noise."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lightning_recipe import _sharded, stats, tensorboard
from lightning_recipe._probe import HookSet
from lightning_recipe._validate import check_int
from lightning_recipe.batch import BatchLayoutError, Getter
from lightning_recipe.callback import RecipeCallback, guarded
from lightning_recipe.findings import Severity
from lightning_recipe.monitors.activations import first_tensor
from lightning_recipe.monitors.base import validate_interval

_CANDIDATES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


class FirstLayerFilterMonitor(RecipeCallback):
    """Visualise the first layer's weights each logging epoch and measure how noisy they are.

    cs231n: noisy first-layer features can mean an unconverged network, a badly set learning rate
    or too little weight regularisation; smooth, clean and diverse filters mean training goes well.
    The layer is the first ``Conv1d``/``Conv2d`` that runs in the forward pass, else the first
    ``Linear`` that reads the raw input as an image (shape from ``image_shape`` or a (B, C, H, W) /
    (B, H, W) input); a model with neither gets one ``check-skipped`` info finding. Every
    ``every_n_epochs`` epochs it logs ``recipe/first_layer_filters`` (an image grid, each filter
    normalised to its own range) and ``recipe/first_layer_filters/smoothness`` and
    ``.../smoothness_at_init``: the squared difference of neighbouring weights over the weights'
    variance, 2 for white noise (every standard init), well below 1 for smooth filters.

    Reports ``noisy-filters`` (info, at the end of training) when the smoothness is still above
    ``noisy_ratio`` times its value at init. Kernels smaller than ``min_kernel_size`` and a frozen
    first layer are shown but not judged.

    Thresholds: see docs/thresholds.md#first-layer-filters.

    Args:
        every_n_epochs: log every this many training epochs (>= 1).
        image_shape: ``(C, H, W)`` of the input image when the first layer is a ``Linear`` over
            flattened images.
        min_kernel_size: smallest spatial kernel size that is judged (>= 2; default 5).
        noisy_ratio: smoothness at the end / at init above which the filters count as "still as
            noisy as at init" (0 < x <= 1).
        max_filters: filters shown in the image (>= 1).
        get_input: ``callable(batch) -> Tensor`` when the batch layout cannot be guessed (only
            used to infer the image shape).
        on_error: ``"warn"`` or ``"raise"``.

    Example::

        trainer = L.Trainer(callbacks=[FirstLayerFilterMonitor(image_shape=(1, 28, 28))])
        trainer.fit(mlp_on_mnist, datamodule)
    """

    codes = ("noisy-filters",)
    what = "look at the first-layer filters"

    #: place of this callback's charts in the Recipe section (lower first)
    chart_rank = 70

    needs_full_copy = False  # never runs the model on a copy

    def __init__(
        self,
        every_n_epochs: int = 1,
        image_shape: tuple[int, int, int] | None = None,
        min_kernel_size: int = 5,
        noisy_ratio: float = 0.9,
        max_filters: int = 64,
        *,
        get_input: Getter | None = None,
        on_error: str = "warn",
    ) -> None:
        super().__init__(on_error=on_error)
        if every_n_epochs is None:
            raise ValueError("`every_n_epochs` must be a positive int, got None")
        self.every_n_epochs = validate_interval("every_n_epochs", every_n_epochs)
        if image_shape is not None:
            if (
                not isinstance(image_shape, (tuple, list))
                or len(image_shape) != 3
                or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in image_shape)
            ):
                raise ValueError(f"`image_shape` must be (C, H, W) positive ints, got {image_shape!r}")
            image_shape = tuple(image_shape)
        self.image_shape = image_shape
        self.min_kernel_size = check_int("min_kernel_size", min_kernel_size)
        if self.min_kernel_size < 2:
            raise ValueError(f"`min_kernel_size` must be >= 2, got {min_kernel_size!r}")
        if (
            isinstance(noisy_ratio, bool)
            or not isinstance(noisy_ratio, (int, float))
            or not 0 < noisy_ratio <= 1
        ):
            raise ValueError(f"`noisy_ratio` must be a number in (0, 1], got {noisy_ratio!r}")
        self.noisy_ratio = float(noisy_ratio)
        self.max_filters = check_int("max_filters", max_filters)
        self.read_batches_with(get_input)
        self._hooks = HookSet()
        self._searched = False
        self._fresh = False
        self._input_numel: int | None = None
        self._input_shape: tuple[int, ...] | None = None
        self._conv: tuple[str, nn.Module] | None = None
        self._linear: tuple[str, nn.Module, int] | None = None
        self._layer: tuple[str, nn.Module, tuple[int, int, int] | None] | None = None
        self._init_pending: Tensor | None = None
        self._init_layer: str | None = None
        self.smoothness_at_init: float | None = None
        self.smoothness: float | None = None

    # ------------------------------------------------------------------ finding the layer
    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        super().on_fit_start(trainer, pl_module)
        self._detach()
        self._searched = False
        self._conv = self._linear = self._layer = None
        self._init_pending = None

    @guarded
    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self._searched:
            return
        self._searched = True
        self._fresh = trainer.global_step == 0
        try:
            x = self.adapter.input(batch)
            self._input_shape = tuple(x.shape)
            self._input_numel = x[0].numel() if x.dim() >= 1 and len(x) > 0 else None
        except BatchLayoutError:
            self._input_shape = self._input_numel = None
        for m in pl_module.modules():
            if isinstance(m, _CANDIDATES):
                self._hooks.forward(m, self._make_hook(pl_module), pre=True)

    def _make_hook(self, model: nn.Module) -> Any:
        names = {id(m): n for n, m in model.named_modules()}

        def hook(module: nn.Module, args: Any) -> None:
            if self._conv is not None:
                return
            try:
                self._seen(names.get(id(module), type(module).__name__), module, args)
            except Exception:  # never break the forward pass; the layer stays unknown
                self._conv = ("", module)
                self._detach()

        return hook

    def _seen(self, name: str, module: nn.Module, args: Any) -> None:
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            self._conv = (name, module)
            self._detach()
            if not isinstance(module, nn.Conv3d):
                self._note_init(name, module, None)
        elif self._linear is None:
            x = first_tensor(args)
            numel = x[0].numel() if x is not None and x.dim() >= 1 and len(x) > 0 else -1
            self._linear = (name, module, numel)
            shape = self._linear_image_shape()
            if shape is not None:
                self._note_init(name, module, shape)

    def _note_init(self, name: str, module: nn.Module, shape: tuple[int, int, int] | None) -> None:
        # called inside the first forward pass, before any optimizer step: the weights are the init
        if self._fresh:
            # inside the forward: FSDP has gathered the whole weight (a DTensor here would be a
            # shard; it is then left to the end-of-epoch reading)
            if not _sharded.is_dtensor(module.weight):
                self._init_pending = smoothness(_maps(module.weight, shape, None))
            self._init_layer = name

    def _linear_image_shape(self) -> tuple[int, int, int] | None:
        """The (C, H, W) that the first Linear reads, or None if it does not read an image."""
        if self._linear is None:
            return None
        _, module, numel = self._linear
        if self._input_numel is not None and numel != self._input_numel:
            return None  # it does not read the raw input
        shape = self.image_shape
        if shape is None and self._input_shape is not None:
            s = self._input_shape
            if len(s) == 4 and min(s[2], s[3]) >= 2:
                shape = (s[1], s[2], s[3])
            elif len(s) == 3 and min(s[1], s[2]) >= 2:
                shape = (1, s[1], s[2])
        if shape is None or shape[0] * shape[1] * shape[2] != module.in_features:
            return None
        return shape

    @guarded
    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._hooks and self._layer is not None:
            return
        self._detach()
        if self._layer is None and self._searched:
            self._decide(trainer)

    def _decide(self, trainer: Any) -> None:
        if self._conv is not None and self._conv[0] and not isinstance(self._conv[1], nn.Conv3d):
            self._layer = (self._conv[0], self._conv[1], None)
        elif self._conv is None and self._linear is not None and self._linear_image_shape() is not None:
            self._layer = (self._linear[0], self._linear[1], self._linear_image_shape())
        else:
            self._layer = ("", nn.Identity(), None)  # decided: nothing to show
            self._skip(trainer)
            return
        name, module, shape = self._layer
        kernel = _kernel(module, shape)
        frozen = not module.weight.requires_grad
        self.figures.update(
            {
                "layer": name,
                "type": _sharded.plain_type(module).__name__,
                "kernel": list(kernel),
                "judged": min(kernel) >= self.min_kernel_size and not frozen,
            }
        )
        if frozen:
            # pretrained and frozen: "as noisy as at init" would only say that it did not change
            self.figures["note"] = (
                "the first layer is frozen (requires_grad=False): the filters are shown, their "
                "smoothness is not judged"
            )
        elif not self.figures["judged"]:
            self.figures["note"] = (
                f"kernel {'x'.join(map(str, kernel))} is smaller than {self.min_kernel_size} in some "
                "dimension: the filters are shown, their smoothness is not judged"
            )

    def _skip(self, trainer: Any) -> None:
        if self._conv is not None and isinstance(self._conv[1], nn.Conv3d):
            reason = f"the first convolution ({self._conv[0]!r}) is a Conv3d, which is not shown"
        elif self._conv is not None:
            reason = "the first layer could not be read"
        elif self._linear is not None:
            reason = (
                f"there is no Conv1d/Conv2d and the first Linear ({self._linear[0]!r}) does not read an "
                "image-shaped input; pass image_shape=(C, H, W) if the input is a flattened image"
            )
        else:
            reason = (
                "there is no Conv1d/Conv2d and no torch.nn.Linear ran on the first training batch, so "
                "there is no image-shaped first layer to show"
            )
        self.skip(trainer, reason, once=True)

    def _detach(self) -> None:
        self._hooks.remove()

    def teardown_diagnostics(self) -> None:
        self._detach()
        self._init_pending = None

    # ------------------------------------------------------------------ logging epochs
    @guarded
    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if self._layer is None or not self._layer[0]:
            return
        if (trainer.current_epoch + 1) % self.every_n_epochs != 0:
            return
        self._log(trainer)

    def _log(self, trainer: Any) -> None:
        _, module, shape = self._layer
        weight = _sharded.full(module.weight.detach())  # sharded: every rank gathers it here
        values = {"smoothness": smoothness(_maps(weight, shape, None))}
        self._take_init(values)
        host = stats.to_host(values)  # one transfer
        self._store(host)
        images = _images(weight, shape, self.max_filters)
        grid = tensorboard.upscale(tensorboard.make_grid(images))
        tensorboard.add_image(trainer, "recipe/first_layer_filters", grid)
        if self.figures.get("judged"):
            scalars = {"recipe/first_layer_filters/smoothness": host["smoothness"]}
            if self.smoothness_at_init is not None:
                scalars["recipe/first_layer_filters/smoothness_at_init"] = self.smoothness_at_init
            tensorboard.log_scalars(trainer, scalars)

    def _take_init(self, values: dict[str, Tensor]) -> None:
        pending, self._init_pending = self._init_pending, None
        if pending is not None and self._layer is not None and self._init_layer == self._layer[0]:
            values["at_init"] = pending

    def _store(self, host: dict[str, float]) -> None:
        if "at_init" in host:
            self.smoothness_at_init = host["at_init"]
            if self.figures.get("judged"):
                self.figures["smoothness_at_init"] = host["at_init"]
        self.smoothness = host["smoothness"]
        if self.figures.get("judged"):
            self.figures["smoothness"] = host["smoothness"]

    # ------------------------------------------------------------------ the verdict
    @guarded
    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._detach()
        if self._layer is None or not self._layer[0] or not self.figures.get("judged"):
            return
        name, module, shape = self._layer
        weight = _sharded.full(module.weight.detach())  # sharded: every rank gathers it here
        values = {"smoothness": smoothness(_maps(weight, shape, None))}
        self._take_init(values)
        self._store(stats.to_host(values))
        init = self.smoothness_at_init if self._init_layer == name else None
        now = self.smoothness
        if init is None or now is None or not init > 0 or now != now:
            self.figures["note"] = "smoothness at init unknown (resumed run): not judged"
            return
        ratio = now / init
        self.figures["ratio_to_init"] = ratio
        if ratio < self.noisy_ratio:
            return
        kernel = "x".join(map(str, _kernel(module, shape)))
        self.report(
            trainer,
            "noisy-filters",
            Severity.INFO,
            f"The first-layer filters ({name!r}, {kernel}) are still as noisy as at init: smoothness "
            f"{now:.3g} vs {init:.3g} at init ({ratio:.2f}x; white noise scores 2, smooth filters well "
            f"below 1; limit {self.noisy_ratio:g}x); the net may be unconverged, the learning rate "
            "far off or the regularisation too weak: train longer, tune the learning rate, add "
            "weight decay, and look at recipe/first_layer_filters.",
            {
                "smoothness": now,
                "smoothness_at_init": init,
                "ratio": ratio,
                "layer": name,
                "limit": self.noisy_ratio,
            },
        )

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "smoothness_at_init": self.smoothness_at_init,
            "init_layer": self._init_layer,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        # a checkpoint written after on_train_end (ModelCheckpoint's save_last) holds that fit's
        # verdict; the resumed fit judges again at its own end
        self._findings = [f for f in self._findings if f.code != "noisy-filters"]
        init = state_dict.get("smoothness_at_init")
        self.smoothness_at_init = None if init is None else float(init)
        self._init_layer = state_dict.get("init_layer")

    def tensorboard_charts(self) -> dict[str, dict[str, tuple[str, list[str]]]]:
        return {
            "Recipe": {
                "First-layer filter smoothness (2 = white noise)": (
                    "Multiline",
                    [r"recipe/first_layer_filters/smoothness.*"],
                )
            }
        }


# ---------------------------------------------------------------------------- filters as images
def _kernel(module: nn.Module, shape: tuple[int, int, int] | None) -> tuple[int, ...]:
    if shape is not None:
        return (shape[1], shape[2])
    return tuple(module.weight.shape[2:])


def _maps(weight: Tensor, shape: tuple[int, int, int] | None, channels: int | None) -> Tensor:
    """The filters as (N, C, h, w): Conv2d as is, Conv1d as 1-pixel-high rows, Linear rows
    reshaped to ``shape``. ``channels=1`` keeps the first input channel only."""
    w = weight.detach().float()
    if shape is not None:
        w = w.reshape(w.shape[0], *shape)
    elif w.dim() == 3:
        w = w.unsqueeze(2)
    if channels is not None:
        w = w[:, :channels]
    return w


def _images(weight: Tensor, shape: tuple[int, int, int] | None, max_filters: int) -> Tensor:
    w = _maps(weight[:max_filters], shape, None)
    return w if w.shape[1] in (1, 3) else w[:, :1]


def smoothness(maps: Tensor) -> Tensor:
    """Median over filters (and input channels) of mean squared neighbour difference / variance.

    ``maps`` is (N, C, h, w). White noise scores 2 (``E[(a-b)^2] = 2 var``), smooth filters
    score near 0. Constant maps (zero variance) are left out; the result is NaN if none is left.
    Computed on the device; returns a 0-d tensor.
    """
    m = maps.reshape(-1, maps.shape[-2], maps.shape[-1]).float()
    sq = m.new_zeros(m.shape[0])
    pairs = 0
    if m.shape[-1] > 1:
        sq = sq + (m[:, :, 1:] - m[:, :, :-1]).square().sum((1, 2))
        pairs += m.shape[-2] * (m.shape[-1] - 1)
    if m.shape[-2] > 1:
        sq = sq + (m[:, 1:, :] - m[:, :-1, :]).square().sum((1, 2))
        pairs += (m.shape[-2] - 1) * m.shape[-1]
    flat = m.reshape(m.shape[0], -1)
    if pairs == 0 or flat.shape[1] < 2:
        return m.new_full((), float("nan"))
    var = flat.var(dim=1)
    scores = (sq / pairs) / var
    live = var > 1e-12 * flat.abs().amax(dim=1).square().clamp_min(1e-30)
    scores = torch.where(live, scores, torch.full_like(scores, float("nan")))
    return scores.nanmedian()
