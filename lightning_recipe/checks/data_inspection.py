"""DataInspectionCheck: look at the batch just before it enters the net."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lightning_recipe import tensorboard
from lightning_recipe._probe import HookSet, ProbeSkip, copy_module, preserved_rng, run_step
from lightning_recipe.batch import Getter
from lightning_recipe.checks.base import FirstBatchCheck
from lightning_recipe.findings import Severity

MAX_IMAGES = 32
#: largest RMS at the first parametrised layer of an input the model transformed itself
#: (``log1p`` of counts up to ~e^10; raw 0..255 pixels have ~100): see docs/thresholds.md
TRANSFORMED_MAX_RMS = 10.0
MAX_CHANNEL_SCALARS = 16
#: integer targets up to this value are counted as class indices (a language model's vocabulary
#: fits); a larger one (an id, a hash, a timestamp) would need a counter for every value below it
MAX_LABEL = 1 << 20


class DataInspectionCheck(FirstBatchCheck):
    """Visualise and measure the first training batch exactly as it enters the net.

    Karpathy: "visualize just before the net ... decode that raw tensor of data and labels into
    visualizations". This check takes the first training batch *after* the transfer to the
    device (what ``training_step`` receives) and logs it as an image grid
    (``recipe/batch_before_net``) when it looks like images ((N, C, H, W) with C in 1/3,
    channels-last, or (N, H, W); pass ``image_shape`` for flattened images), per-feature /
    per-channel mean, std, min and max (``recipe/data/...`` scalars for up to 16 channels,
    histograms of the per-feature statistics otherwise) and the label histogram
    (``recipe/labels``). Integer inputs (token ids, ``uint8`` images normalised inside the model)
    are only visualised, not judged.

    Reports ``bad-input`` (error) for NaN/Inf values or an input that is entirely constant, and
    ``input-not-normalized`` (warning) when the input's root mean square exceeds ``max_rms``
    (normalised data has an RMS of at most 1) or one feature's scale exceeds the median feature's
    by more than ``max_scale_ratio``.

    Thresholds: see docs/thresholds.md#data-inspection.

    Args:
        max_rms: largest input RMS still counted as normalised (default 3.0).
        max_scale_ratio: largest ratio of one feature's RMS to the median feature RMS (default
            100) before "wildly different feature scales" is reported.
        image_shape: ``(C, H, W)`` to show flattened inputs as images.
        get_input, get_target, on_error: see :class:`FirstBatchCheck`.

    Example::

        trainer = L.Trainer(callbacks=[DataInspectionCheck(image_shape=(1, 28, 28))])
    """

    codes = ("bad-input", "input-not-normalized")

    needs_full_copy = False  # never runs the model on a copy

    what = "inspect the first batch"

    def __init__(
        self,
        max_rms: float = 3.0,
        max_scale_ratio: float = 100.0,
        image_shape: tuple[int, int, int] | None = None,
        *,
        get_input: Getter | None = None,
        get_target: Getter | None = None,
        on_error: str = "warn",
    ) -> None:
        super().__init__(get_input=get_input, get_target=get_target, on_error=on_error)
        for name, value, low in (("max_rms", max_rms, 0.0), ("max_scale_ratio", max_scale_ratio, 1.0)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > low:
                raise ValueError(f"`{name}` must be a number > {low}, got {value!r}")
        if image_shape is not None:
            if (
                not isinstance(image_shape, (tuple, list))
                or len(image_shape) != 3
                or not all(isinstance(v, int) and v > 0 for v in image_shape)
                or image_shape[0] not in (1, 3)
            ):
                raise ValueError(f"`image_shape` must be (C, H, W) with C in (1, 3), got {image_shape!r}")
            image_shape = tuple(image_shape)
        self.max_rms = float(max_rms)
        self.max_scale_ratio = float(max_scale_ratio)
        self.image_shape = image_shape

    def check(self, trainer: Any | None, module: nn.Module, batch: Any) -> None:
        x = self.adapter.input(batch)
        y = self.adapter.target(batch)
        self.figures.update({"input_shape": list(x.shape), "input_dtype": str(x.dtype).replace("torch.", "")})
        self._log_images(trainer, x)
        self._log_labels(trainer, y)
        if not (x.is_floating_point() or x.is_complex()):
            self.figures["note"] = "integer input (token ids or raw image bytes): visualised, not judged"
            return
        self._pending: list[tuple[str, Severity, str, dict[str, Any]]] = []
        self._judge(trainer, x.detach())
        if self._pending:
            self._confirm_in_model(trainer, module, batch)

    def _confirm_in_model(self, trainer: Any | None, module: nn.Module, batch: Any) -> None:
        """Judge the input's scale where it enters the first parametrised layer: a model that
        normalises its input itself (``log1p`` of counts, a BatchNorm / LayerNorm first) is fine."""
        pending, self._pending = self._pending, []
        seen = _first_layer_input(module, batch, self.step_fn, trainer)
        if seen is not None:
            name, layer, t = seen
            self.figures["first_layer"] = name
            if isinstance(layer, _NORMS):
                self.figures["normalised_inside_model"] = f"{name} ({type(layer).__name__}) comes first"
                return
            raw = self.adapter.input(batch)
            unchanged = t is not None and t.shape == raw.shape and bool(torch.equal(t, raw.to(t.dtype)))
            if t is not None and not unchanged and t.is_floating_point() and t.numel() > 1:
                tf = torch.nan_to_num(t.detach().float())
                rms = float(tf.pow(2).mean().sqrt())
                feats = _features(tf).pow(2).mean(0).sqrt()
                live = feats[feats > 0]
                ratio = float(live.max() / live.median()) if live.numel() >= 3 and live.median() > 0 else 1.0
                self.figures["first_layer_input_rms"] = rms
                if rms <= max(self.max_rms, TRANSFORMED_MAX_RMS) and ratio <= self.max_scale_ratio:
                    self.figures["normalised_inside_model"] = (
                        f"{name} receives an RMS of {rms:.3g} (feature scale ratio {ratio:.3g})"
                    )
                    return
        for code, severity, message, evidence in pending:
            self.report(trainer, code, severity, message, evidence)

    # ------------------------------------------------------------------ measuring
    def _judge(self, trainer: Any | None, x: Tensor) -> None:
        xf = x.float()
        finite = torch.isfinite(xf)
        n_bad = int((~finite).sum())
        total = xf.numel()
        if n_bad:
            self.report(
                trainer,
                "bad-input",
                Severity.ERROR,
                f"{n_bad} of {total} input values ({n_bad / total:.1%}) in the first batch are NaN/Inf "
                "as they enter the net; check missing values, divisions and augmentations.",
                {"non_finite": n_bad, "total": total},
            )
            xf = torch.where(finite, xf, torch.zeros_like(xf))
        feats = _features(xf)  # (N_samples, F)
        mean, std = feats.mean(0), feats.std(0, unbiased=False)
        rms = feats.pow(2).mean(0).sqrt()
        stats = torch.stack([mean, std, feats.amin(0), feats.amax(0), rms]).cpu()
        overall_rms = float(xf.pow(2).mean().sqrt())
        overall_std = float(xf.std(unbiased=False)) if total > 1 else 0.0
        self.figures.update(
            {
                "mean": float(xf.mean()),
                "std": overall_std,
                "min": float(xf.min()),
                "max": float(xf.max()),
                "rms": overall_rms,
                "features": int(stats.shape[1]),
            }
        )
        self._log_stats(trainer, stats)
        if overall_std == 0.0 and total > 1:
            self.report(
                trainer,
                "bad-input",
                Severity.ERROR,
                f"Every input value in the first batch is {float(xf.reshape(-1)[0]):.4g}: the input is "
                "constant, so the model cannot learn from it; check the data pipeline.",
                {"value": float(xf.reshape(-1)[0]), "total": total},
            )
            return
        if overall_rms > self.max_rms:
            self._pending.append(
                (
                    "input-not-normalized",
                    Severity.WARNING,
                    f"The inputs are far outside [-1, 1]: values {self.figures['min']:.4g}.."
                    f"{self.figures['max']:.4g}, root mean square {overall_rms:.3g} "
                    f"(limit {self.max_rms:g}); "
                    "standardise them (subtract the mean, divide by the std) or scale them to [0, 1].",
                    {
                        "rms": overall_rms,
                        "min": self.figures["min"],
                        "max": self.figures["max"],
                        "limit": self.max_rms,
                    },
                )
            )
        self._judge_scales(trainer, stats[4])

    def _judge_scales(self, trainer: Any | None, rms: Tensor) -> None:
        live = rms[rms > 0]
        if live.numel() < 3:
            return
        median = float(live.median())
        top = float(live.max())
        ratio = top / median if median > 0 else float("inf")
        self.figures["feature_scale_ratio"] = ratio
        if ratio > self.max_scale_ratio:
            worst = int(torch.argmax(rms))
            self._pending.append(
                (
                    "input-not-normalized",
                    Severity.WARNING,
                    f"Feature {worst} has an RMS of {top:.4g}, {ratio:.0f}x the median feature's "
                    f"{median:.4g} "
                    f"(limit {self.max_scale_ratio:g}x): wildly different feature scales; standardise each "
                    "feature.",
                    {"feature": worst, "feature_rms": top, "median_rms": median, "ratio": ratio},
                )
            )

    # ------------------------------------------------------------------ logging
    def _log_stats(self, trainer: Any | None, stats: Tensor) -> None:
        names = ("mean", "std", "min", "max")
        scalars = {f"recipe/data/{n}": self.figures[n] for n in names}
        nf = stats.shape[1]
        if 1 < nf <= MAX_CHANNEL_SCALARS:
            for i in range(nf):
                for j, n in enumerate(names):
                    scalars[f"recipe/data/feature_{i}/{n}"] = float(stats[j, i])
        tensorboard.log_scalars(trainer, scalars)
        writer = tensorboard.get_writer(trainer)
        if writer is not None and nf > 1:
            hb = tensorboard.HistogramBatch(bins=min(64, max(2, nf)))
            hb.add("recipe/data/feature_means", stats[0])
            hb.add("recipe/data/feature_stds", stats[1])
            hb.flush(writer, 0 if trainer is None else trainer.global_step)

    def _log_labels(self, trainer: Any | None, y: Tensor | None) -> None:
        if y is None or y.is_floating_point() or y.is_complex() or y.numel() == 0:
            return
        y = y.detach().reshape(-1).long()  # bool targets too
        valid = y[y >= 0]
        if valid.numel() == 0:
            return
        top = int(valid.max())
        if top >= MAX_LABEL:  # ids, hashes, timestamps: one counter per value would not fit
            self.figures["note_labels"] = f"largest target {top} is no class index: label histogram skipped"
            return
        counts = torch.bincount(valid).cpu()
        self.figures["label_counts"] = [int(c) for c in counts[:1000]]
        self.figures["classes_in_batch"] = int((counts > 0).sum())
        writer = tensorboard.get_writer(trainer)
        if writer is None:
            return
        k = counts.numel()
        writer.add_histogram_raw(
            "recipe/labels",
            min=0.0,
            max=float(k - 1),
            num=float(counts.sum()),
            sum=float((counts * torch.arange(k)).sum()),
            sum_squares=float((counts * torch.arange(k) ** 2).sum()),
            bucket_limits=[i + 0.5 for i in range(k)],
            bucket_counts=[float(c) for c in counts],
            global_step=trainer.global_step,
        )

    def _log_images(self, trainer: Any | None, x: Tensor) -> None:
        imgs = as_images(x, self.image_shape)
        if imgs is None:
            return
        self.figures["images_logged"] = int(min(MAX_IMAGES, imgs.shape[0]))
        grid = tensorboard.upscale(tensorboard.make_grid(imgs[:MAX_IMAGES].float()))
        tensorboard.add_image(trainer, "recipe/batch_before_net", grid)


def as_images(x: Tensor, image_shape: tuple[int, int, int] | None = None) -> Tensor | None:
    """``x`` as (N, C, H, W) images with C in (1, 3), or ``None`` if it does not look like images."""
    if not (x.is_floating_point() or x.dtype == torch.uint8):
        return None
    x = x.detach()
    if image_shape is not None:
        if x[0].numel() != image_shape[0] * image_shape[1] * image_shape[2]:
            return None
        return x.reshape(x.shape[0], *image_shape)
    if x.dim() == 4:
        if x.shape[1] in (1, 3) and x.shape[2] >= 4 and x.shape[3] >= 4:
            return x
        if x.shape[3] in (1, 3) and x.shape[1] >= 4 and x.shape[2] >= 4:
            return x.permute(0, 3, 1, 2)
        return None
    if x.dim() == 3 and x.shape[1] >= 8 and x.shape[2] >= 8 and x.shape[1] == x.shape[2]:
        return x.unsqueeze(1)
    return None


_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)


def _first_layer_input(
    module: nn.Module, batch: Any, step_fn: Any, trainer: Any | None
) -> tuple[str, nn.Module, Tensor | None] | None:
    """(name, module, first tensor argument) of the first layer (a module with parameters of its
    own and no parametrised submodule) that runs in the user's step with a tensor argument, on a
    copy of the model; ``None`` if that cannot be seen."""
    try:
        model = copy_module(module, trainer)
    except ProbeSkip:
        return None
    names = {id(m): n for n, m in model.named_modules()}
    first: list[tuple[str, nn.Module, Tensor | None]] = []

    def hook(mod: nn.Module, args: Any) -> None:
        if not first:
            t = next((a for a in args if isinstance(a, Tensor)), None)
            if t is not None:
                first.append((names.get(id(mod), type(mod).__name__), mod, t))

    def own(m: nn.Module) -> bool:
        return any(True for _ in m.parameters(recurse=False))

    with HookSet() as hooks, preserved_rng(), torch.no_grad():
        for m in model.modules():
            # a layer: parameters of its own and no parametrised submodule (a whole model that
            # also holds a parameter of its own, e.g. a dispersion, is not where the input enters)
            if own(m) and not any(own(c) for c in m.modules() if c is not m):
                hooks.forward(m, hook, pre=True)
        try:
            run_step(model, batch, step_fn)
        except Exception:
            return None
    return first[0] if first else None


def _features(x: Tensor) -> Tensor:
    """Rearrange the input to (samples, features): channels for images and 1-D signals,
    the last dimension for sequences (N, T, D), columns for tabular data."""
    if x.dim() <= 1:
        return x.reshape(-1, 1)
    if x.dim() == 2:
        return x
    if x.dim() == 3:
        if x.shape[1] == x.shape[2]:  # (N, H, W) grayscale
            return x.reshape(-1, 1)
        ch = 1 if x.shape[1] < x.shape[2] else 2
        return x.movedim(ch, -1).reshape(-1, x.shape[ch])
    if x.dim() == 4 and x.shape[3] in (1, 3) and x.shape[1] not in (1, 3):
        return x.reshape(-1, x.shape[3])  # channels-last images
    return x.movedim(1, -1).reshape(-1, x.shape[1])
