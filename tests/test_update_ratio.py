"""UpdateRatioMonitor: silent on healthy runs, LR far too high / low and frozen updates are caught."""

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_recipe.monitors.update_ratio import UpdateRatioMonitor
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


class Opt(Classifier):
    """Classifier with SGD + momentum or Adam."""

    def __init__(self, net, optimizer="adam", lr=1e-2, momentum=0.9):
        super().__init__(net, lr=lr, optimizer=optimizer)
        self.momentum = momentum

    def configure_optimizers(self):
        if self.optimizer == "sgd":
            return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)
        return torch.optim.Adam(self.parameters(), lr=self.lr)


@pytest.fixture(autouse=True)
def _seed():
    """Models are built before fit() seeds: make their init independent of the test order."""
    L.seed_everything(0, verbose=False)


def fit(tmp_path, model, data, monitor, steps=40, logger=None, **kw):
    L.seed_everything(0, verbose=False)
    train, _ = loaders(*data)
    t = trainer(tmp_path, [monitor], logger=logger, max_steps=steps, max_epochs=100, **kw)
    t.fit(model, train)
    return t


def codes(monitor):
    return [f.code for f in monitor.findings]


@pytest.mark.parametrize(
    "kind,optimizer,lr",
    [("mlp", "adam", 1e-2), ("cnn", "sgd", 0.1), ("gru", "adam", 1e-2), ("gru", "sgd", 0.1)],
)
def test_healthy_runs_are_silent(tmp_path, kind, optimizer, lr):
    torch.manual_seed(0)
    net, data = {
        "mlp": (mlp, blobs),
        "cnn": (cnn, image_blobs),
        "gru": (GRUNet, token_blobs),
    }[kind]
    mon = UpdateRatioMonitor(every_n_steps=5)
    fit(tmp_path, Opt(net(), optimizer, lr), data(), mon, steps=60)
    assert codes(mon) == []
    assert 1e-4 < mon.figures["median_ratio"] < 0.3
    assert mon.figures["parameters_measured"] == len(list(mon._names))


def test_sgd_lr_far_too_high_is_reported_with_numbers(tmp_path):
    torch.manual_seed(0)
    mon = UpdateRatioMonitor(every_n_steps=5)
    fit(tmp_path, Opt(mlp(), "sgd", lr=10.0), blobs(), mon, steps=12)
    assert "update-ratio-high" in codes(mon)
    f = next(f for f in mon.findings if f.code == "update-ratio-high")
    assert f.severity.value == "warning" and f.step <= 10
    assert all(m > 1.0 for m in f.evidence["medians"]) and len(f.evidence["medians"]) == 3
    assert f.evidence["learning_rates"] == [10.0]
    assert f"{f.evidence['medians'][-1]:.2g}" in f.message and "too high" in f.message


def test_sgd_lr_far_too_low_is_reported(tmp_path):
    torch.manual_seed(0)
    mon = UpdateRatioMonitor(every_n_steps=5)
    fit(tmp_path, Opt(mlp(), "sgd", lr=1e-7), blobs(), mon, steps=12)
    assert codes(mon) == ["update-ratio-low"]
    f = mon.findings[0]
    assert all(m < 1e-5 for m in f.evidence["medians"])
    assert "too low" in f.message and "1e-07" in f.message


def test_ratio_that_falls_after_convergence_is_not_called_low(tmp_path):
    # SGD 0.1 + momentum memorises the blobs; its ratios fall to ~1e-5 once the loss is ~1e-5
    torch.manual_seed(0)
    mon = UpdateRatioMonitor(every_n_steps=10, low=1e-3)  # a band the run leaves when it converges
    fit(tmp_path, Opt(mlp(), "sgd", 0.1), blobs(), mon, steps=150)
    assert mon.figures["median_ratio"] < 1e-3
    assert "update-ratio-low" not in codes(mon)


class Unused(Classifier):
    """A layer in the optimizer that never gets a gradient, a frozen layer and an lr=0 group."""

    def __init__(self):
        super().__init__(mlp())
        self.unused = nn.Linear(4, 4)
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)
        self.zero_lr = nn.Linear(4, 4)

    def training_step(self, batch, batch_idx):
        x, y = batch
        out = self.net(x)
        return F.cross_entropy(out + self.frozen(out) + self.zero_lr(out), y)

    def configure_optimizers(self):
        rest = [p for n, p in self.named_parameters() if not n.startswith("zero_lr")]
        return torch.optim.Adam([{"params": rest}, {"params": self.zero_lr.parameters(), "lr": 0.0}], lr=1e-2)


def test_params_not_updating(tmp_path):
    mon = UpdateRatioMonitor(every_n_steps=2)
    fit(tmp_path, Unused(), blobs(), mon, steps=8)
    assert codes(mon) == ["params-not-updating", "params-not-updating"]
    # a layer that never runs a forward is an info (unused by design, or forgotten in forward) ...
    info = next(f for f in mon.findings if f.severity.value == "info")
    assert sorted(info.evidence["parameters"]) == ["unused.bias", "unused.weight"]
    assert info.evidence["kind"] == "never-ran" and "never ran a forward" in info.message
    # ... a layer that runs and still never changes (lr=0 here) is the warning
    f = next(f for f in mon.findings if f.severity.value == "warning")
    assert sorted(f.evidence["parameters"]) == ["zero_lr.bias", "zero_lr.weight"]
    assert "frozen" not in f.message and "zero_lr.weight" in f.message
    assert f.evidence["measured"] == 10  # 6 of the MLP + unused + zero_lr; frozen ones are left out


def test_updates_below_float_resolution_after_convergence_are_not_params_not_updating(tmp_path):
    """Adam memorising 48 samples drives the loss to 0: gradients ~1e-13 make updates smaller than
    half a float32 ulp of the weights, so some tensors change by exactly 0 from step ~150 on
    (measured: 1, then 2 more tensors flagged at steps 201-261 before the fix). They moved before:
    a gradient reaches them, the run has converged."""
    mon = UpdateRatioMonitor(every_n_steps=10, dense_steps=0)
    L.seed_everything(0, verbose=False)
    train, _ = loaders(*blobs(n=64), batch_size=48)
    trainer(tmp_path, [mon], logger=None, max_steps=300, max_epochs=-1).fit(
        Opt(mlp(hidden=64), "adam", 0.05), train
    )
    assert mon.figures["median_ratio"] < 1e-6  # it did converge: updates ~0
    assert "params-not-updating" not in codes(mon), mon.findings


class EpochWarmup(Opt):
    """A per-epoch warm-up that starts at lr = 0: the whole first epoch makes no update."""

    def configure_optimizers(self):
        opt = super().configure_optimizers()
        warm = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: min(1.0, epoch / 3))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": warm, "interval": "epoch"}}


def test_a_scheduled_lr_of_zero_is_not_params_not_updating(tmp_path):
    mon = UpdateRatioMonitor(every_n_steps=2)
    fit(tmp_path, EpochWarmup(mlp(), "adam", 1e-2), blobs(), mon, steps=12)  # 6 steps per epoch
    assert codes(mon) == [], mon.findings
    assert mon.figures["median_ratio"] > 1e-4  # measured once the rate rose


def test_tensorboard_tags_and_layout(tmp_path):
    mon = UpdateRatioMonitor(every_n_steps=4, dense_steps=0)
    t = fit(tmp_path, Classifier(mlp()), blobs(), mon, steps=13, logger="tb")
    acc = accumulator(t.logger.log_dir)
    scalars = set(acc.Tags()["scalars"])
    for name, _ in t.lightning_module.named_parameters():
        assert f"recipe/update_ratio/{name}" in scalars
    med = acc.Scalars("recipe/update_ratio_summary/median")
    assert [e.step for e in med] == [1, 5, 9, 13]
    assert all(-3 < e.value < 0 for e in med)  # log10 of Adam 1e-2 ratios on this MLP
    assert {e.value for e in acc.Scalars("recipe/update_ratio_summary/band_high")} == {0.0}
    assert {e.value for e in acc.Scalars("recipe/update_ratio_summary/band_low")} == {-5.0}
    assert {e.value for e in acc.Scalars("recipe/update_ratio_summary/fraction_high")} == {0.0}
    hist = acc.Histograms("recipe/update_ratio_summary/log10_ratios")
    assert len(hist) == 4 and hist[0].histogram_value.num == 6
    from tensorboard.plugins.custom_scalar import layout_pb2

    layout = layout_pb2.Layout()
    layout.ParseFromString(acc.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0])
    tags = {t for cat in layout.category if cat.title == "Recipe" for c in cat.chart for t in c.multiline.tag}
    assert r"recipe/update_ratio_summary/(median|band_low|band_high|target)" in tags


def test_layer_granularity(tmp_path):
    mon = UpdateRatioMonitor(every_n_steps=4, granularity="layer", dense_steps=0)
    t = fit(tmp_path, Classifier(mlp()), blobs(), mon, steps=5, logger="tb")
    scalars = {
        s for s in accumulator(t.logger.log_dir).Tags()["scalars"] if s.startswith("recipe/update_ratio/")
    }
    assert scalars == {"recipe/update_ratio/net.0", "recipe/update_ratio/net.2", "recipe/update_ratio/net.4"}


def test_no_work_between_logging_steps(tmp_path, monkeypatch):
    import lightning_recipe.monitors.update_ratio as ur

    copies = []
    real_copy = ur._copy
    monkeypatch.setattr(ur, "_copy", lambda params: copies.append(len(params)) or real_copy(params))
    steps_seen = []

    class Spy(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            steps_seen.append((trainer.global_step, mon._pending != {}))

    mon = UpdateRatioMonitor(every_n_steps=10, dense_steps=3)
    L.seed_everything(0, verbose=False)
    t = trainer(tmp_path, [mon, Spy()], logger=None, max_steps=35, max_epochs=100)
    t.fit(Classifier(mlp()), loaders(*blobs())[0])
    logged = [s for s, pending in steps_seen if pending]
    assert logged == [0, 1, 2, 10, 20, 30]  # dense start, then every 10 optimizer steps
    assert mon.snapshots_taken == len(copies) == 6
    assert mon._pending == {} and mon._samples == []  # freed right after the step


def test_gradient_accumulation_measures_each_optimizer_step_once(tmp_path):
    mon = UpdateRatioMonitor(every_n_steps=2, dense_steps=0)
    seen = []
    real = mon._publish
    mon._publish = lambda trainer, samples: seen.append(trainer.global_step) or real(trainer, samples)
    fit(tmp_path, Classifier(mlp()), blobs(), mon, steps=8, accumulate_grad_batches=3)
    assert seen == [1, 3, 5, 7]  # published after the step that was due (global_step already moved)
    assert mon.snapshots_taken == 4 and codes(mon) == []


class GAN(L.LightningModule):
    """Manual optimisation, two optimizers, the discriminator steps twice per batch."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        self.gen = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 16))
        self.disc = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 1))

    def training_step(self, batch, batch_idx):
        x, _ = batch
        opt_g, opt_d = self.optimizers()
        for _ in range(2):
            fake = self.gen(torch.randn(x.shape[0], 4)).detach()
            d_loss = F.softplus(self.disc(fake)).mean() + F.softplus(-self.disc(x)).mean()
            opt_d.zero_grad()
            self.manual_backward(d_loss)
            opt_d.step()
        g_loss = F.softplus(-self.disc(self.gen(torch.randn(x.shape[0], 4)))).mean()
        opt_g.zero_grad()
        self.manual_backward(g_loss)
        opt_g.step()
        return g_loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.gen.parameters(), 1e-3), torch.optim.Adam(self.disc.parameters(), 1e-3)


def test_manual_optimisation_with_two_optimizers(tmp_path):
    mon = UpdateRatioMonitor(every_n_steps=3, dense_steps=0)
    published = []
    real = mon._publish
    mon._publish = lambda trainer, samples: (
        published.append([s.index for s in samples]) or real(trainer, samples)
    )
    L.seed_everything(0, verbose=False)
    x, y = blobs(d=16)
    t = trainer(tmp_path, [mon], logger="tb", max_steps=20, max_epochs=100)
    t.fit(GAN(), loaders(x, y)[0])
    assert published and all(sorted(p) == [0, 1] for p in published)  # D once (not twice), G once
    assert codes(mon) == []
    scalars = set(accumulator(t.logger.log_dir).Tags()["scalars"])
    assert "recipe/update_ratio/gen.0.weight" in scalars and "recipe/update_ratio/disc.2.bias" in scalars


class InfAt(Classifier):
    """fp16 autocast with a GradScaler; the loss is multiplied by inf on some steps."""

    def __init__(self, bad_steps):
        super().__init__(mlp())
        self.bad_steps = bad_steps

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("inf") if self.global_step in self.bad_steps else loss


@pytest.mark.skipif(not hasattr(torch.amp, "GradScaler"), reason="needs torch.amp.GradScaler('cpu')")
def test_steps_skipped_by_the_grad_scaler_are_ignored(tmp_path):
    from lightning.pytorch.plugins.precision import MixedPrecision

    scaler = torch.amp.GradScaler("cpu")
    mon = UpdateRatioMonitor(every_n_steps=1, dense_steps=0)
    plugin = MixedPrecision("16-mixed", "cpu", scaler=scaler)
    model = InfAt(bad_steps={2, 3, 4, 5})
    fit(tmp_path, model, blobs(), mon, steps=9, plugins=[plugin])
    assert mon.figures["scaler_skipped_samples"] >= 4
    assert "params-not-updating" not in codes(mon)


def test_rotating_subset_bounds_the_snapshot(tmp_path):
    mon = UpdateRatioMonitor(every_n_steps=1, max_snapshot_mb=0.004)  # ~4 KB: one or two tensors at a time
    measured = []
    real = mon._publish
    mon._publish = lambda trainer, samples: measured.append(tuple(samples[0].names)) or real(trainer, samples)
    fit(tmp_path, Classifier(mlp()), blobs(), mon, steps=10)
    names = {n for m in measured for n in m}
    biggest = max(p.numel() * 4 for p in Classifier(mlp()).parameters())
    assert biggest <= 0.004 * 2**20
    assert names == {n for n, _ in Classifier(mlp()).named_parameters()}  # all covered in turn
    assert all(len(m) < 6 for m in measured) and mon.figures["rotating_subset"] is True


def test_run_is_bit_identical_with_the_monitor(tmp_path):
    def weights(callbacks):
        L.seed_everything(1, verbose=False)
        model = Opt(cnn(), "sgd", 0.1)
        t = trainer(tmp_path, callbacks, logger=None, max_steps=12, max_epochs=100)
        t.fit(model, loaders(*image_blobs())[0])
        return model.state_dict(), t.optimizers[0].state_dict()["state"]

    w0, s0 = weights([])
    w1, s1 = weights([UpdateRatioMonitor(every_n_steps=3)])
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    assert all(torch.equal(s0[i]["momentum_buffer"], s1[i]["momentum_buffer"]) for i in s0)


def test_state_round_trip_and_resume_from_checkpoint(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    def run(max_steps, monitor, ckpt=None):
        L.seed_everything(0, verbose=False)
        saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=1)
        t = trainer(tmp_path, [monitor, saver], logger=None, max_steps=max_steps, enable_checkpointing=True)
        t.fit(Opt(mlp(), "sgd", lr=1e-7), loaders(*blobs())[0], ckpt_path=ckpt)
        return monitor

    first = run(2, UpdateRatioMonitor(every_n_steps=5))  # two low samples: below the patience of 3
    assert codes(first) == [] and first.streaks.counts["low"] == 2
    other = UpdateRatioMonitor(every_n_steps=5)
    other.load_state_dict(first.state_dict())
    assert other.streaks.counts == first.streaks.counts and other._judged_samples == 2
    assert other._peak_lr == first._peak_lr and other._last_logged_step == first._last_logged_step
    resumed = run(3, UpdateRatioMonitor(every_n_steps=5), ckpt=str(tmp_path / "ckpt" / "last.ckpt"))
    assert codes(resumed) == ["update-ratio-low"]  # the third sample completes the restored streak
    assert resumed.findings[0].evidence["steps"] == [0, 1, 2]


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="granularity"):
        UpdateRatioMonitor(granularity="module")
    with pytest.raises(ValueError, match="`low` must be below `high`"):
        UpdateRatioMonitor(low=1.0, high=0.1)
    with pytest.raises(ValueError, match="high"):
        UpdateRatioMonitor(high=math.inf)
    with pytest.raises(ValueError, match="patience"):
        UpdateRatioMonitor(patience=0)
    with pytest.raises(ValueError, match="max_snapshot_mb"):
        UpdateRatioMonitor(max_snapshot_mb=0)
    with pytest.raises(ValueError, match="every_n_steps"):
        UpdateRatioMonitor(every_n_steps=0)
    with pytest.raises(ValueError, match="dense_steps"):
        UpdateRatioMonitor(dense_steps=-1)
    with pytest.raises(TypeError, match="histogram"):
        UpdateRatioMonitor(histogram="yes")
