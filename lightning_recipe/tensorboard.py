"""TensorBoard plumbing shared by every recipe callback.

* :func:`get_writer` finds the ``SummaryWriter`` among ``trainer.loggers`` (duck-typed: any
  logger whose ``experiment`` has ``add_histogram_raw``), on rank zero only; other loggers get
  one info line and the scalars through Lightning's logger API (:func:`log_scalars`).
* :class:`HistogramBatch` bins tensors on their device (no ``.cpu()`` of whole tensors) and
  sends every histogram of a logging step to the host in one transfer.
* :func:`make_grid` tiles images without torchvision; :func:`add_image`, :func:`add_text`.
* :func:`write_layout` writes the custom-scalars layout (the "Recipe" section of the Custom
  Scalars tab) assembled from every recipe callback's :meth:`tensorboard_charts`.
* :func:`findings_changed` keeps the ``recipe/findings`` markdown table current.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from lightning_recipe import _context

LAYOUT_CATEGORY = "Recipe"


# ---------------------------------------------------------------------------- writer
def get_writer(trainer: Any | None) -> Any | None:
    """The TensorBoard ``SummaryWriter`` of ``trainer`` on rank zero, else ``None``.

    Without a TensorBoard logger it prints one info line per fit (what only TensorBoard can
    show is skipped; scalars still reach the other loggers).
    """
    if trainer is None or not _context.is_global_zero(trainer):
        return None
    state = _context.trainer_state(trainer)
    if state.writer_looked_up:
        return state.writer
    state.writer_looked_up = True
    for logger in getattr(trainer, "loggers", None) or []:
        if type(logger).__name__ in ("CSVLogger",):
            continue
        try:
            experiment = logger.experiment
        except Exception:
            continue
        if hasattr(experiment, "add_histogram_raw") and hasattr(experiment, "add_scalar"):
            state.writer = experiment
            return experiment
    from lightning.pytorch.utilities.rank_zero import rank_zero_info

    rank_zero_info(
        "lightning_recipe: no TensorBoardLogger on the trainer; histograms, images, text and the "
        "Recipe layout are skipped (scalars still go to your loggers)."
    )
    return None


def log_scalars(trainer: Any | None, metrics: dict[str, float], step: int | None = None) -> None:
    """Send scalars to every logger of the trainer (rank zero), not to ``callback_metrics``.

    Values must already be Python floats (sync once per logging step, then call this).
    """
    if trainer is None or not metrics or not _context.is_global_zero(trainer):
        return
    step = _context.global_step(trainer) if step is None else step
    clean = {k: float(v) for k, v in metrics.items()}
    for logger in getattr(trainer, "loggers", None) or []:
        logger.log_metrics(clean, step=step)


# ---------------------------------------------------------------------------- histograms
class HistogramBatch:
    """Histograms of a logging step, binned on the device, shipped to the host at once.

    ``add`` keeps a float32 subsample (at most ``max_samples`` values, evenly strided with an
    odd stride: see :func:`subsample`) of a tensor or of several tensors pooled into one
    histogram; ``flush`` bins all of them in one vectorised pass (a fixed number of kernels,
    whatever the number of histograms), makes one host transfer and writes them with
    ``add_histogram_raw``. Non-finite values are left out of the histograms.

    Example::

        hb = HistogramBatch()
        for name, p in model.named_parameters():
            hb.add(f"recipe/weights/{name}", p)
        hb.flush(writer, step)
    """

    def __init__(self, bins: int = 64, max_samples: int = 1 << 16) -> None:
        if isinstance(bins, bool) or not isinstance(bins, int) or bins < 2:
            raise ValueError(f"`bins` must be an int >= 2, got {bins!r}")
        if isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < bins:
            raise ValueError(f"`max_samples` must be an int >= bins, got {max_samples!r}")
        self.bins = bins
        self.max_samples = max_samples
        self._items: list[tuple[str, Tensor]] = []

    def __len__(self) -> int:
        return len(self._items)

    def add(self, tag: str, tensors: Tensor | list[Tensor]) -> Tensor | None:
        """Queue the histogram of a tensor (or of several, pooled) under ``tag``; return the
        queued float32 subsample (callers can take cheap statistics from it)."""
        group = [tensors] if isinstance(tensors, Tensor) else list(tensors)
        group = [t for t in group if t.numel() > 0]
        if not group:
            return None
        sample = subsample(group, self.max_samples)
        self._items.append((tag, sample))
        return sample

    def flush(self, writer: Any | None, step: int) -> None:
        """Bin everything queued on the device, transfer once, write; clears the queue."""
        items, self._items = self._items, []
        if writer is None or not items:
            return
        device = items[0][1].device
        rows = histogram_rows([v.to(device) for _, v in items], self.bins).cpu().double().numpy()
        for (tag, _), row in zip(items, rows):
            write_histogram_row(writer, tag, row, self.bins, step)


def subsample(tensors: list[Tensor], max_samples: int) -> Tensor:
    """A float32 copy of at most about ``max_samples`` values of ``tensors`` (flattened and
    concatenated), evenly strided on their device. The stride is odd so it does not alias with
    the power-of-two sizes of feature maps (a stride of 16 over 16-wide maps would only ever see
    their first column). A copy, so the full tensors are not kept alive."""
    per = max(1, max_samples // max(1, len(tensors)))
    parts = []
    for t in tensors:
        flat = t.detach().reshape(-1)
        if flat.numel() > per:
            stride = math.ceil(flat.numel() / per)
            flat = flat[:: stride + 1 - stride % 2]
        parts.append(flat)
    device = parts[0].device
    if len(parts) == 1:
        return parts[0].to(dtype=torch.float32, copy=True)
    return torch.cat([p.to(device=device, dtype=torch.float32) for p in parts])


def histogram_rows(samples: list[Tensor], bins: int) -> Tensor:
    """For each 1-D tensor: ``[min, max, count, sum, sum of squares, bin counts...]`` of its
    finite values, as one (N, 5 + bins) tensor computed with a fixed number of kernels."""
    mat = torch.nn.utils.rnn.pad_sequence(samples, batch_first=True, padding_value=float("nan"))
    n = mat.shape[0]
    finite = torch.isfinite(mat)
    weight = finite.to(mat.dtype)
    inf = torch.tensor(float("inf"), device=mat.device, dtype=mat.dtype)
    lo = torch.where(finite, mat, inf).amin(dim=1, keepdim=True)
    hi = torch.where(finite, mat, -inf).amax(dim=1, keepdim=True)
    xs = torch.where(finite, mat, torch.zeros((), device=mat.device, dtype=mat.dtype))
    width = (hi - lo).clamp_min(1e-12)
    idx = ((xs - lo) / width * bins).floor().nan_to_num(0).clamp(0, bins - 1).long()
    idx = idx + torch.arange(n, device=mat.device).unsqueeze(1) * bins
    counts = torch.zeros(n * bins, device=mat.device, dtype=mat.dtype)
    counts = counts.scatter_add_(0, idx.reshape(-1), weight.reshape(-1)).reshape(n, bins)
    head = torch.cat(
        [lo, hi, weight.sum(1, keepdim=True), xs.sum(1, keepdim=True), (xs * xs).sum(1, keepdim=True)], 1
    )
    return torch.cat([head, counts], 1)


def write_histogram_row(writer: Any, tag: str, row: Any, bins: int, step: int) -> None:
    """Write one row produced by :func:`histogram_stats` (already on the host)."""
    lo, hi, num, total, total_sq = (float(v) for v in row[:5])
    counts = [float(c) for c in row[5 : 5 + bins]]
    if num <= 0 or not math.isfinite(lo) or not math.isfinite(hi):
        return
    if hi <= lo:
        hi = lo + max(1e-12, abs(lo) * 1e-6)
    width = (hi - lo) / bins
    limits = [lo + width * (i + 1) for i in range(bins)]
    writer.add_histogram_raw(
        tag,
        min=lo,
        max=hi,
        num=num,
        sum=total,
        sum_squares=total_sq,
        bucket_limits=limits,
        bucket_counts=counts,
        global_step=step,
    )


# ---------------------------------------------------------------------------- images and text
def make_grid(
    images: Tensor,
    nrow: int | None = None,
    padding: int = 1,
    normalize: bool = True,
    pad_value: float = 1.0,
) -> Tensor:
    """Tile ``images`` (N, C, H, W), C in {1, 3}, into one (C, H', W') image in [0, 1].

    Each image is normalised on its own (min to 0, max to 1; a constant image becomes 0.5) so
    filters with different scales are all visible. ``nrow`` is the number of images per row
    (default: a near-square grid).
    """
    if not isinstance(images, Tensor) or images.dim() != 4:
        raise ValueError(
            f"`images` must be a (N, C, H, W) tensor, got {getattr(images, 'shape', type(images))}"
        )
    n, c, h, w = images.shape
    if c not in (1, 3):
        raise ValueError(f"`images` must have 1 or 3 channels, got C={c}")
    if n == 0:
        raise ValueError("`images` is empty")
    if nrow is None:
        nrow = math.ceil(math.sqrt(n))
    if not isinstance(nrow, int) or nrow < 1:
        raise ValueError(f"`nrow` must be a positive int, got {nrow!r}")
    if not isinstance(padding, int) or padding < 0:
        raise ValueError(f"`padding` must be a non-negative int, got {padding!r}")
    x = images.detach().float()
    if normalize:
        flat = x.reshape(n, -1)
        finite = torch.isfinite(flat)
        lo = torch.where(finite, flat, torch.full_like(flat, float("inf"))).amin(dim=1)
        hi = torch.where(finite, flat, torch.full_like(flat, float("-inf"))).amax(dim=1)
        span = (hi - lo).reshape(n, 1, 1, 1)
        x = torch.where(span > 0, (x - lo.reshape(n, 1, 1, 1)) / span.clamp_min(1e-12), 0.5)
        x = torch.nan_to_num(x, nan=0.0, posinf=1.0, neginf=0.0)
    x = x.clamp(0, 1)
    ncol = nrow
    nrows = math.ceil(n / ncol)
    grid = torch.full(
        (c, nrows * (h + padding) + padding, ncol * (w + padding) + padding),
        float(pad_value),
        device=x.device,
    )
    for i in range(n):
        r, col = divmod(i, ncol)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[:, top : top + h, left : left + w] = x[i]
    return grid


def upscale(image: Tensor, min_side: int = 160) -> Tensor:
    """Nearest-neighbour upscale of a (C, H, W) image so tiny filters are visible."""
    _, h, w = image.shape
    factor = max(1, math.ceil(min_side / max(1, min(h, w))))
    if factor == 1:
        return image
    return image.repeat_interleave(factor, dim=1).repeat_interleave(factor, dim=2)


def add_image(trainer: Any | None, tag: str, image_chw: Tensor, step: int | None = None) -> bool:
    """Write a (C, H, W) image in [0, 1] to TensorBoard (rank zero); False if no writer."""
    writer = get_writer(trainer)
    if writer is None:
        return False
    step = _context.global_step(trainer) if step is None else step
    writer.add_image(tag, image_chw.detach().float().cpu(), global_step=step, dataformats="CHW")
    return True


def add_text(trainer: Any | None, tag: str, markdown: str, step: int | None = None) -> bool:
    """Write markdown text to TensorBoard (rank zero); False if no writer."""
    writer = get_writer(trainer)
    if writer is None:
        return False
    step = _context.global_step(trainer) if step is None else step
    writer.add_text(tag, markdown, global_step=step)
    return True


# ---------------------------------------------------------------------------- layout
def recipe_callbacks_of(trainer: Any) -> list[Any]:
    """The recipe callbacks on ``trainer``, in the trainer's order."""
    from lightning_recipe.callback import RecipeCallback

    return [cb for cb in getattr(trainer, "callbacks", None) or [] if isinstance(cb, RecipeCallback)]


#: the order of the charts in the Recipe section: what a user reads first comes first
CHART_ORDER = (
    "LossCurveMonitor",
    "TrainValGapMonitor",
    "BaselineMonitor",
    "UpdateRatioMonitor",
    "InputIndependentBaseline",
    "ActivationMonitor",
    "GradientMonitor",
    "CheckpointEnsemble",
    "FirstLayerFilterMonitor",
    "OverfitBatchCheck",
)


def build_layout(callbacks: Iterable[Any]) -> dict[str, dict[str, list]]:
    """Merge every callback's charts into ``{category: {title: [kind, [tag regexes]]}}``,
    ordered by :data:`CHART_ORDER` (unknown callbacks last, in trainer order)."""
    layout: dict[str, dict[str, list]] = {}
    rank = {name: i for i, name in enumerate(CHART_ORDER)}
    for cb in sorted(callbacks, key=lambda cb: rank.get(type(cb).__name__, len(rank))):
        for category, charts in (cb.tensorboard_charts() or {}).items():
            section = layout.setdefault(category, {})
            for title, (kind, tags) in charts.items():
                if kind not in ("Multiline", "Margin"):
                    raise ValueError(f"chart kind must be 'Multiline' or 'Margin', got {kind!r}")
                section.setdefault(title, [kind, list(tags)])
    return layout


def write_layout(trainer: Any) -> None:
    """Write the custom-scalars layout once per fit, on rank zero (idempotent)."""
    state = _context.trainer_state(trainer)
    if state.layout_written:
        return
    state.layout_written = True
    layout = build_layout(recipe_callbacks_of(trainer))
    state.layout = layout
    writer = get_writer(trainer)
    if writer is None or not layout:
        return
    writer.add_custom_scalars(layout)


# ---------------------------------------------------------------------------- findings text
def findings_markdown(findings: list[Any]) -> str:
    """A markdown table (step, severity, code, message) of ``findings``.

    TensorBoard's markdown breaks words anywhere and sizes columns by their longest line, so the
    message is wrapped with ``<br>`` (an allowed tag there) to leave the short columns room; the
    callback that saw the finding closes the message.
    """
    if not findings:
        return "No findings."
    import textwrap

    rows = ["| step | severity | code | message |", "|---:|---|---|---|"]
    for f in findings:
        text = f"{f.message} ({f.source})".replace("|", "\\|").replace("\n", " ")
        msg = "<br>".join(textwrap.wrap(text, 72)) or text
        rows.append(f"| {f.step} | **{f.severity.value}** | `{f.code}` | {msg} |")
    return "\n".join(rows)


def findings_changed(trainer: Any) -> None:
    """Rewrite ``recipe/findings`` when findings arrive (at most once per global step; the
    last batch of a step is written by :func:`flush_findings`)."""
    writer = get_writer(trainer)
    if writer is None:
        return
    state = _context.trainer_state(trainer)
    step = _context.global_step(trainer)
    if step == state.findings_step:
        state.findings_pending = True
        return
    _write_findings(trainer, writer, state, step)


def flush_findings(trainer: Any) -> None:
    """Write ``recipe/findings`` if findings arrived since the last write."""
    writer = get_writer(trainer)
    state = _context.trainer_state(trainer)
    if writer is not None and state.findings_pending:
        _write_findings(trainer, writer, state, max(state.findings_step, _context.global_step(trainer)))


def _write_findings(trainer: Any, writer: Any, state: Any, step: int) -> None:
    from lightning_recipe.report import gather_findings

    found = gather_findings(trainer)
    writer.add_text("recipe/findings", findings_markdown(found), global_step=step)
    state.findings_step = step
    state.findings_written = len(found)
    state.findings_pending = False
