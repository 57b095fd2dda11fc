"""GradientMonitor: vanishing / exploding / non-finite gradients caught, healthy nets silent, exact
norms in TensorBoard, accumulation / bf16 / manual optimisation, the run untouched."""

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_recipe.monitors.gradients import GradientMonitor
from models import (
    Classifier,
    GRUNet,
    TinyTransformer,
    accumulator,
    blobs,
    cnn,
    image_blobs,
    loaders,
    mlp,
    token_blobs,
    trainer,
)


def deep(act, depth=8, width=32, d=16, classes=4, gain=None):
    """``depth`` hidden Linear+act layers and an output Linear; ``gain``: N(0, gain^2/fan_in)."""
    layers, dims = [], [d] + [width] * depth
    for i in range(depth):
        lin = nn.Linear(dims[i], dims[i + 1])
        if gain is not None:
            nn.init.normal_(lin.weight, 0.0, gain / math.sqrt(dims[i]))
            nn.init.zeros_(lin.bias)
        layers += [lin, act()]
    return nn.Sequential(*layers, nn.Linear(width, classes))


def fit(tmp_path, net, data=None, monitor=None, callbacks=(), lr=1e-2, model=None, **kw):
    L.seed_everything(0, verbose=False)
    monitor = monitor or GradientMonitor(every_n_steps=1)
    x, y = data if data is not None else blobs()
    opts = {"max_steps": 6, "limit_val_batches": 1, **kw}
    model = model or Classifier(net, lr=lr)
    trainer(tmp_path, [monitor, *callbacks], **opts).fit(model, *loaders(x, y))
    return monitor


def codes(cb):
    return [f.code for f in cb.findings]


@pytest.mark.parametrize("kind", ["mlp", "cnn", "gru", "transformer", "deep-kaiming", "tanh-xavier"])
def test_healthy_models_are_silent(tmp_path, kind):
    torch.manual_seed(0)
    data = None
    if kind == "mlp":
        net = mlp()
    elif kind == "cnn":
        data, net = image_blobs(), cnn()
    elif kind in ("gru", "transformer"):
        data, net = token_blobs(), GRUNet() if kind == "gru" else TinyTransformer()
    elif kind == "deep-kaiming":
        net = deep(nn.ReLU, gain=math.sqrt(2))
    else:
        net = deep(nn.Tanh, depth=16, gain=1.0)
    mon = fit(tmp_path, net, data)
    assert codes(mon) == []
    assert mon.figures["logging_steps"] == 6 and mon.figures["non_finite_layers"] == 0


def test_vanishing_gradients_in_a_deep_sigmoid_mlp(tmp_path):
    torch.manual_seed(0)
    mon = fit(tmp_path, deep(nn.Sigmoid, depth=8), lr=1e-3)
    assert codes(mon) == ["vanishing-gradients"]
    f = mon.findings[0]
    assert f.severity.value == "warning" and f.step == 2
    assert f.evidence["first_layer"] == "net.0" and f.evidence["last_hidden_layer"] == "net.14"
    assert f.evidence["ratio"] < 1e-4 and all(r < 1e-3 for _, r in f.evidence["history"])
    assert f"{f.evidence['ratio']:.2g}x" in f.message


class QueryBlock(nn.Module):
    """A residual block whose first projection (``q``, an attention query's stand-in) gets a
    tiny gradient in every block alike, as attention query/key weights do at init."""

    def __init__(self, width=16):
        super().__init__()
        self.q, self.v = nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, x):
        return x + torch.tanh(1e-5 * self.q(x) + self.v(x))


class Blocks(nn.Module):
    def __init__(self, n=3, sigmoid_stack=0):
        super().__init__()
        self.blocks = nn.ModuleList([QueryBlock() for _ in range(n)])
        self.tail = deep(nn.Sigmoid, depth=sigmoid_stack, width=16) if sigmoid_stack else nn.Linear(16, 4)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.tail(x)


def test_a_kind_of_parameter_small_in_every_block_alike_is_not_vanishing(tmp_path):
    """The first layer (``blocks.0.q``) gets ~1e-5x the last hidden layer's gradient, but so does
    every block's ``q``: no depth trend, no finding (a tiny BERT's attention query, issue 13)."""
    torch.manual_seed(0)
    mon = fit(tmp_path, Blocks(), lr=1e-3)
    profile = mon.figures["depth_profile"]["opt0"]
    assert profile["first"] == "net.blocks.0.q" and profile["ratio"] < 1e-3  # the plain rule would fire
    assert 0.1 < profile["same_kind_ratio"] < 10
    assert codes(mon) == []


def test_exploding_gradients_in_a_deep_tanh_net_with_large_init(tmp_path):
    torch.manual_seed(0)
    mon = fit(tmp_path, deep(nn.Tanh, depth=20, gain=3.0), lr=1e-3)
    assert codes(mon) == ["exploding-gradients"]
    f = mon.findings[0]
    assert f.evidence["ratio"] > 100 and f.evidence["first_layer"] == "net.0"
    assert all(r > 100 for _, r in f.evidence["history"])


class Reversed(nn.Module):
    """Registers its head before its body: registration order is not forward order."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(32, 4)
        self.body = deep(nn.Sigmoid, depth=8)[:-1]

    def forward(self, x):
        return self.head(self.body(x))


def test_depth_follows_forward_order_not_registration_order(tmp_path):
    torch.manual_seed(0)
    mon = fit(tmp_path, Reversed(), lr=1e-3)
    f = mon.findings[0]
    assert f.code == "vanishing-gradients"
    assert f.evidence["first_layer"] == "net.body.0" and f.evidence["last_hidden_layer"] == "net.body.14"


class NaNGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


class Inject(nn.Module):
    """Identity whose backward returns NaN on the training calls listed in ``on_calls``."""

    def __init__(self, on_calls=None):
        super().__init__()
        self.on_calls, self.calls = on_calls, 0

    def forward(self, x):
        if not self.training:
            return x
        self.calls += 1
        hit = self.on_calls is None or self.calls - 1 in self.on_calls
        return NaNGrad.apply(x) if hit else x


def nan_net(on_calls=None):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), Inject(on_calls), nn.ReLU(), nn.Linear(32, 4)
    )


def test_injected_nan_gradients_name_the_layers(tmp_path):
    mon = fit(tmp_path, nan_net(), max_steps=2)
    assert codes(mon) == ["non-finite-gradients"]
    f = mon.findings[0]
    assert f.severity.value == "error" and f.step == 0
    assert f.evidence["layers"] == ["net.0", "net.2"]
    assert f.evidence["deepest"] == "net.2" and f.evidence["first_in_forward_order"] == "net.0"
    assert "2 of 3 layers" in f.message and "'net.2'" in f.message


def test_nan_between_logging_steps_is_caught_by_the_every_step_flag(tmp_path):
    mon = GradientMonitor(every_n_steps=5, check_every_step=True)
    f = fit(tmp_path, nan_net(on_calls={2}), monitor=mon, max_steps=6).findings[0]
    assert f.code == "non-finite-gradients" and f.step == 5
    assert f.evidence["first_step"] == 2 and f.evidence["steps_between_logging"] == 3  # steps 2, 3, 4
    assert "at step 2" in f.message
    off = fit(tmp_path / "off", nan_net(on_calls={2}), monitor=GradientMonitor(every_n_steps=5), max_steps=6)
    assert off.findings[0].step == 5 and "first_step" not in off.findings[0].evidence


class GradProbe(Callback):
    """Runs after the monitor: the true norm of each layer's gradient at each optimizer step."""

    def __init__(self):
        self.norms = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        net = pl_module.net
        self.norms[trainer.global_step] = {
            f"net.{i}": math.sqrt(sum(float(p.grad.norm()) ** 2 for p in m.parameters()))
            for i, m in enumerate(net)
            if isinstance(m, nn.Linear)
        }


@pytest.mark.parametrize("accumulate", [1, 2])
def test_tensorboard_norms_are_exact_and_histograms_real(tmp_path, accumulate):
    probe = GradProbe()
    fit(tmp_path, mlp(), callbacks=[probe], max_steps=3, accumulate_grad_batches=accumulate)
    acc = accumulator(tmp_path / "run" / "version_0")
    for layer in ("net.0", "net.2", "net.4"):
        logged = acc.Scalars(f"recipe/grad_norm/{layer}")
        assert [s.step for s in logged] == [0, 1, 2]
        for s in logged:
            assert s.value == pytest.approx(probe.norms[s.step][layer], rel=1e-5)
        hist = acc.Histograms(f"recipe/gradients/{layer}")
        assert [h.step for h in hist] == [0, 1, 2] and hist[0].histogram_value.num > 0
    assert acc.Histograms("recipe/weights/net.0.weight")[0].histogram_value.num == 32 * 16
    ratio = acc.Scalars("recipe/grad_depth_ratio")
    rel = {k: acc.Scalars(f"recipe/grad_relative/net.{k}")[0].value for k in (0, 2)}
    assert ratio[0].value == pytest.approx(rel[0] / rel[2], rel=1e-5)


def test_bf16_mixed_precision(tmp_path):
    mon = fit(tmp_path, mlp(), precision="bf16-mixed", max_steps=3)
    assert codes(mon) == [] and mon.figures["logging_steps"] == 3
    assert acc_has(tmp_path, "recipe/grad_norm/net.0")


def acc_has(tmp_path, tag):
    return len(accumulator(tmp_path / "run" / "version_0").Scalars(tag)) > 0


class TwoOptimizers(L.LightningModule):
    """Manual optimisation: a broken (deep sigmoid) and a healthy network, one optimizer each."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        torch.manual_seed(0)
        self.broken, self.healthy = deep(nn.Sigmoid, depth=8), deep(nn.ReLU, depth=3, gain=math.sqrt(2))

    def training_step(self, batch, batch_idx):
        x, y = batch
        for net, opt in zip((self.broken, self.healthy), self.optimizers()):
            loss = F.cross_entropy(net(x), y)
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()

    def configure_optimizers(self):
        return torch.optim.Adam(self.broken.parameters(), 1e-3), torch.optim.Adam(
            self.healthy.parameters(), 1e-3
        )


def test_manual_optimisation_with_two_optimizers(tmp_path):
    mon = fit(tmp_path, None, model=TwoOptimizers(), max_steps=8)
    assert codes(mon) == ["vanishing-gradients"]
    f = mon.findings[0]
    assert f.evidence["optimizer"] == 0 and f.evidence["first_layer"] == "broken.0"
    assert "(optimizer 0)" in f.message
    assert mon.figures["depth_profile"]["opt1"]["first"] == "healthy.0"
    assert acc_has(tmp_path, "recipe/grad_depth_ratio/opt1") and acc_has(
        tmp_path, "recipe/grad_norm/healthy.4"
    )


class PreHookCounter(Callback):
    def __init__(self):
        self.at_start = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.at_start[trainer.global_step] = sum(len(m._forward_pre_hooks) for m in pl_module.modules())


def test_hooks_only_on_logging_steps(tmp_path):
    counter = PreHookCounter()
    net = mlp()
    mon = fit(tmp_path, net, monitor=GradientMonitor(every_n_steps=2), callbacks=[counter], max_steps=5)
    assert counter.at_start == {0: 3, 1: 0, 2: 3, 3: 0, 4: 3}
    assert sum(len(m._forward_pre_hooks) for m in net.modules()) == 0
    assert mon.figures["logging_steps"] == 3


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"vanishing_ratio": 2.0}, ValueError),
        ({"exploding_ratio": 0.5}, ValueError),
        ({"exploding_ratio": float("inf")}, ValueError),
        ({"patience": 0}, ValueError),
        ({"every_n_steps": -1}, ValueError),
        ({"histograms": 1}, TypeError),
        ({"check_every_step": None}, TypeError),
        ({"exclude": "net.0"}, TypeError),
    ],
)
def test_bad_arguments(kwargs, error):
    with pytest.raises(error, match=next(iter(kwargs))):
        GradientMonitor(**kwargs)


def test_exclude_leaves_a_layer_out_of_the_profile(tmp_path):
    torch.manual_seed(0)
    mon = fit(
        tmp_path,
        deep(nn.Sigmoid, depth=8),
        lr=1e-3,
        monitor=GradientMonitor(every_n_steps=1, exclude=["net.0"]),
    )
    assert mon.findings[0].evidence["first_layer"] == "net.2"


def test_run_is_bit_identical_with_and_without_the_monitor(tmp_path):
    def run(path, callbacks):
        L.seed_everything(7, verbose=False)
        model = Classifier(cnn(), lr=1e-2)
        trainer(path, callbacks, max_epochs=1, logger=None).fit(model, *loaders(*image_blobs()))
        return model.state_dict(), torch.get_rng_state()

    w0, r0 = run(tmp_path / "a", [])
    w1, r1 = run(tmp_path / "b", [GradientMonitor(every_n_steps=2)])
    assert all(torch.equal(w0[k], w1[k]) for k in w0) and torch.equal(r0, r1)


def test_findings_and_streaks_survive_a_checkpoint(tmp_path):
    torch.manual_seed(0)
    mon = fit(tmp_path, deep(nn.Sigmoid, depth=8), lr=1e-3)
    again = GradientMonitor(every_n_steps=1)
    again.load_state_dict(mon.state_dict())
    assert [f.code for f in again.findings] == ["vanishing-gradients"]
    assert again.streaks.counts["vanishing-gradients:opt0"] == 6 and again.has_reported("vanishing-gradients")


def test_training_that_ends_before_the_next_logging_step_is_checked_at_the_end(tmp_path):
    # a NaN loss often stops the run before the next logging step
    mon = fit(tmp_path, nan_net(on_calls={2}), monitor=GradientMonitor(every_n_steps=50), max_steps=4)
    f = mon.findings[0]
    assert f.code == "non-finite-gradients" and f.step == 3  # the last step's gradients
    assert f.evidence["layers"] == ["net.0", "net.2", "net.5"]  # the weights went NaN at step 2
    flag = GradientMonitor(every_n_steps=50, check_every_step=True)
    f = fit(tmp_path / "flag", nan_net(on_calls={2}), monitor=flag, max_steps=4).findings[0]
    assert f.evidence["first_step"] == 2 and f.evidence["steps_between_logging"] == 2
