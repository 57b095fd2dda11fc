"""FirstLayerFilterMonitor: finds the first layer over the pixels, logs real filter images and
smoothness, says when the filters are still init noise, skips cleanly without an image layer."""

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_recipe.demo import load_digits_tensors
from lightning_recipe.monitors.first_layer_filters import FirstLayerFilterMonitor, _images, smoothness
from models import (
    Classifier,
    GRUNet,
    accumulator,
    blobs,
    cnn,
    image_blobs,
    loaders,
    mlp,
    token_blobs,
    trainer,
)


def fit(tmp_path, net, data, monitor=None, callbacks=(), lr=1e-2, epochs=1, batch_size=32, **kw):
    L.seed_everything(0, verbose=False)
    monitor = monitor or FirstLayerFilterMonitor()
    train, val = loaders(*data, batch_size=batch_size)
    opts = {"max_epochs": epochs, "limit_val_batches": 1, **kw}
    trainer(tmp_path, [monitor, *callbacks], **opts).fit(Classifier(net, lr=lr), train, val)
    return monitor


def codes(cb):
    return [f.code for f in cb.findings]


def digits_flat():
    x, y, _, _ = load_digits_tensors()
    return x.flatten(1), y


def digits_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def test_mlp_on_flattened_digits_healthy_vs_learning_rate_far_too_low(tmp_path):
    data = digits_flat()
    mon = FirstLayerFilterMonitor(image_shape=(1, 8, 8))
    healthy = fit(tmp_path / "ok", digits_mlp(), data, mon, lr=3e-3, epochs=2)
    assert codes(healthy) == []
    assert healthy.figures["layer"] == "net.0" and healthy.figures["kernel"] == [8, 8]
    assert healthy.figures["ratio_to_init"] < 0.9
    mon = FirstLayerFilterMonitor(image_shape=(1, 8, 8))
    frozen = fit(tmp_path / "low", digits_mlp(), data, mon, lr=1e-6, epochs=2)
    assert codes(frozen) == ["noisy-filters"]
    f = frozen.findings[0]
    assert f.severity.value == "info" and f.evidence["ratio"] > 0.99
    assert 1.8 < f.evidence["smoothness_at_init"] < 2.2  # white noise scores 2
    assert f"{f.evidence['smoothness']:.3g}" in f.message and "'net.0', 8x8" in f.message


def test_first_linear_over_image_batches_needs_no_image_shape(tmp_path):
    x, y, _, _ = load_digits_tensors()
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
    mon = fit(tmp_path, net, (x[:256], y[:256]), lr=1e-9)
    assert mon.figures["layer"] == "net.1" and mon.figures["judged"] is True
    assert codes(mon) == ["noisy-filters"]


def conv5(channels=1):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(channels, 8, 5, padding=2),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(32, 4),
    )


def test_conv_filters_image_and_smoothness_in_tensorboard(tmp_path):
    fit(tmp_path, conv5(3), image_blobs(channels=3), epochs=2)
    acc = accumulator(tmp_path / "run" / "version_0")
    images = acc.Images("recipe/first_layer_filters")
    assert len(images) == 2 and images[0].width >= 160 and len(images[0].encoded_image_string) > 100
    smooth = acc.Scalars("recipe/first_layer_filters/smoothness")
    init = acc.Scalars("recipe/first_layer_filters/smoothness_at_init")
    assert len(smooth) == 2 and 1.5 < init[0].value < 2.5
    assert smooth[-1].value != init[0].value


def test_small_kernels_are_shown_but_not_judged(tmp_path):
    mon = fit(tmp_path, cnn(), image_blobs(), lr=1e-9)
    assert codes(mon) == [] and mon.figures["judged"] is False and "3x3" in mon.figures["note"]
    tags = accumulator(tmp_path / "run" / "version_0").Tags()
    assert "recipe/first_layer_filters" in tags["images"]
    assert not any(t.startswith("recipe/first_layer_filters") for t in tags["scalars"])


class LateFirst(nn.Module):
    """Registers the second conv first; the monitor must pick the one that runs first."""

    def __init__(self):
        super().__init__()
        self.late = nn.Conv2d(8, 8, 5, padding=2)
        self.early = nn.Conv2d(1, 8, 7, padding=3)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.late(self.early(x).relu()).mean((2, 3)))


def test_the_first_conv_called_wins(tmp_path):
    mon = fit(tmp_path, LateFirst(), image_blobs())
    assert mon.figures["layer"] == "net.early" and mon.figures["kernel"] == [7, 7]


class Signal1d(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(2, 6, 9, padding=4)
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        return self.head(self.conv(x).relu().mean(-1))


def test_conv1d_filters_are_strips(tmp_path):
    x, y = blobs(d=64)
    mon = fit(tmp_path, Signal1d(), (x.reshape(-1, 2, 32), y))
    assert mon.figures["type"] == "Conv1d" and mon.figures["kernel"] == [9] and mon.figures["judged"]
    image = accumulator(tmp_path / "run" / "version_0").Images("recipe/first_layer_filters")[0]
    assert image.width > image.height  # 1-pixel-high strips, upscaled


@pytest.mark.parametrize("kind", ["tabular", "gru"])
def test_no_image_layer_gives_one_skip_and_nothing_else(tmp_path, kind):
    data, net = (blobs(), mlp()) if kind == "tabular" else (token_blobs(), GRUNet())
    mon = fit(tmp_path, net, data)
    assert codes(mon) == ["check-skipped"]
    assert "image_shape" in mon.findings[0].message
    tags = accumulator(tmp_path / "run" / "version_0").Tags()
    assert not any(
        "first_layer_filters" in t
        for kind_tags in tags.values()
        if isinstance(kind_tags, list)
        for t in kind_tags
    )


class PreHookCounter(Callback):
    def __init__(self):
        self.at_start = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.at_start.append(sum(len(m._forward_pre_hooks) for m in pl_module.modules()))


def test_detection_hooks_live_for_the_first_batch_only(tmp_path):
    counter = PreHookCounter()
    net = cnn()
    fit(tmp_path, net, image_blobs(), callbacks=[counter], max_steps=3)
    assert counter.at_start == [3, 0, 0]  # 2 convs + 1 linear, then none
    assert sum(len(m._forward_pre_hooks) for m in net.modules()) == 0


def test_smoothness_scores_white_noise_2_and_smooth_filters_low():
    torch.manual_seed(0)
    noise = torch.randn(64, 1, 9, 9)
    assert smoothness(noise).item() == pytest.approx(2.0, abs=0.1)
    g = torch.linspace(-2, 2, 9)
    blob = torch.exp(-(g[:, None] ** 2 + g[None, :] ** 2)).expand(4, 1, 9, 9)
    assert smoothness(blob).item() == pytest.approx(0.377, abs=0.01)
    assert smoothness(torch.zeros(3, 1, 5, 5)).isnan()


def test_channels_shown():
    assert _images(torch.randn(10, 3, 5, 5), None, 4).shape == (4, 3, 5, 5)
    assert _images(torch.randn(10, 2, 5, 5), None, 64).shape == (10, 1, 5, 5)
    assert _images(torch.randn(6, 2 * 16), (2, 4, 4), 64).shape == (6, 1, 4, 4)


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"every_n_epochs": 0}, ValueError),
        ({"every_n_epochs": None}, ValueError),
        ({"image_shape": (8, 8)}, ValueError),
        ({"image_shape": (1, 8, -8)}, ValueError),
        ({"min_kernel_size": 1}, ValueError),
        ({"noisy_ratio": 1.5}, ValueError),
        ({"max_filters": 0}, ValueError),
        ({"get_input": "x"}, TypeError),
    ],
)
def test_bad_arguments(kwargs, error):
    with pytest.raises(error, match=next(iter(kwargs))):
        FirstLayerFilterMonitor(**kwargs)


def test_run_is_bit_identical_with_and_without_the_monitor(tmp_path):
    def run(path, callbacks):
        L.seed_everything(7, verbose=False)
        model = Classifier(conv5(), lr=1e-2)
        trainer(path, callbacks, max_epochs=2, logger=None).fit(model, *loaders(*image_blobs()))
        return model.state_dict(), torch.get_rng_state()

    w0, r0 = run(tmp_path / "a", [])
    w1, r1 = run(tmp_path / "b", [FirstLayerFilterMonitor()])
    assert all(torch.equal(w0[k], w1[k]) for k in w0) and torch.equal(r0, r1)
