"""LossCurveMonitor: diverging, NaN and flat curves and early LR decay are caught; healthy runs are not."""

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from lightning_recipe.monitors.loss_curve import LossCurveMonitor
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


class Sched(Classifier):
    """Classifier with an optional LR scheduler factory ``sched(optimizer, planned_steps)``."""

    def __init__(self, net, lr=1e-2, optimizer="adam", sched=None, interval="step"):
        super().__init__(net, lr=lr, optimizer=optimizer)
        self.sched, self.interval = sched, interval

    def configure_optimizers(self):
        opt = super().configure_optimizers()
        if self.sched is None:
            return opt
        planned = self.trainer.estimated_stepping_batches
        return {
            "optimizer": opt,
            "lr_scheduler": {"scheduler": self.sched(opt, planned), "interval": self.interval},
        }


@pytest.fixture(autouse=True)
def _seed():
    """Models are built before fit() seeds: make their init independent of the test order."""
    L.seed_everything(0, verbose=False)


def fit(tmp_path, model, data, monitor, steps=60, logger=None, batch_size=32, **kw):
    L.seed_everything(0, verbose=False)
    train, _ = loaders(*data, batch_size=batch_size)
    opts = {"max_steps": -1 if steps is None else steps, "max_epochs": 1000, **kw}
    t = trainer(tmp_path, [monitor], logger=logger, **opts)
    t.fit(model, train)
    return t


def codes(monitor):
    return [f.code for f in monitor.findings]


@pytest.mark.parametrize(
    "kind,batch_size",
    [("mlp", 32), ("mlp", 4), ("cnn", 32), ("gru", 4)],
)
def test_healthy_curves_are_silent(tmp_path, kind, batch_size):
    torch.manual_seed(0)
    net, data, lr = {
        "mlp": (mlp, blobs, 1e-3),
        "cnn": (cnn, image_blobs, 1e-2),
        "gru": (GRUNet, token_blobs, 1e-2),
    }[kind]
    mon = LossCurveMonitor(every_n_steps=5)
    fit(tmp_path, Classifier(net(), lr=lr), data(), mon, steps=120, batch_size=batch_size)
    assert codes(mon) == []
    assert mon.figures["relative_improvement"] > 0.3  # the flatness test did run and saw progress
    assert mon.figures["loss"] < mon.figures["initial_loss"]


@pytest.mark.parametrize(
    "name,sched",
    [
        ("cosine", lambda opt, n: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=n)),
        ("onecycle", lambda opt, n: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=n)),
        (
            "warmup+cosine",
            lambda opt, n: torch.optim.lr_scheduler.SequentialLR(
                opt,
                [
                    torch.optim.lr_scheduler.LinearLR(opt, start_factor=1e-3, total_iters=10),
                    torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=n - 10),
                ],
                milestones=[10],
            ),
        ),
    ],
)
def test_schedules_over_the_whole_run_are_silent(tmp_path, name, sched):
    mon = LossCurveMonitor(every_n_steps=5)
    fit(tmp_path, Sched(mlp(), sched=sched), blobs(), mon, steps=None, max_epochs=10)
    assert codes(mon) == [], name
    assert mon._lr_done  # the check ran up to the deadline
    assert min(mon._lr_peak.values()) > 0


@pytest.mark.parametrize(
    "kind,step,intervals",
    [("gru", 15, 3), ("mlp", 5, 1)],  # GRU: 7-16x its first loss, 3 intervals; MLP: 1e5x, reported at once
)
def test_sgd_lr_far_too_high_diverges(tmp_path, kind, step, intervals):
    torch.manual_seed(0)
    net, data = {"mlp": (mlp, blobs), "gru": (GRUNet, token_blobs)}[kind]
    mon = LossCurveMonitor(every_n_steps=5)
    fit(tmp_path, Classifier(net(), lr=10.0, optimizer="sgd"), data(), mon, steps=20)
    assert codes(mon)[0] == "loss-diverged"
    f = mon.findings[0]
    assert f.severity.value == "error" and f.step == step
    assert len(f.evidence["losses"]) == intervals and min(f.evidence["losses"]) > 4 * f.evidence["best"]
    assert f.evidence["best"] == f.evidence["initial"]  # it never improved on the first batch
    assert f"{f.evidence['losses'][-1]:.4g}" in f.message and "too high" in f.message


class NaNAt(Classifier):
    def __init__(self, step):
        super().__init__(mlp())
        self.nan_step = step

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.global_step >= self.nan_step else loss


def test_nan_loss_reports_the_first_step(tmp_path):
    mon = LossCurveMonitor(every_n_steps=5)
    fit(tmp_path, NaNAt(7), blobs(), mon, steps=14)
    assert codes(mon) == ["non-finite-loss"]
    f = mon.findings[0]
    assert f.evidence["first_step"] == 7 and f.step == 7
    assert f.evidence["non_finite_batches"] == 3 and f.evidence["batches"] == 5  # steps 5..9, NaN from 7
    assert "at step 7" in f.message


def test_nan_in_the_tail_after_the_last_logging_step_is_reported(tmp_path):
    mon = LossCurveMonitor(every_n_steps=50)
    fit(tmp_path, NaNAt(12), blobs(), mon, steps=14)
    assert codes(mon) == ["non-finite-loss"] and mon.findings[0].evidence["first_step"] == 12


def test_flat_curve_from_lr_zero(tmp_path):
    mon = LossCurveMonitor(every_n_steps=5)
    fit(tmp_path, Classifier(mlp(), lr=0.0, optimizer="sgd"), blobs(), mon, steps=115)
    assert codes(mon) == ["loss-not-decreasing"]
    f = mon.findings[0]
    assert f.step == 110 and abs(f.evidence["relative_improvement"]) < 0.01
    assert f.evidence["learning_rates"] == [0.0] and "after 110 steps" in f.message


def test_rising_curve_gets_the_lower_lr_advice(tmp_path):
    class NoZeroGrad(Classifier):
        def optimizer_zero_grad(self, epoch, batch_idx, optimizer):
            pass  # gradients pile up: the effective step grows every batch

    mon = LossCurveMonitor(every_n_steps=5)
    fit(tmp_path, NoZeroGrad(mlp()), blobs(), mon, steps=115)
    f = next(f for f in mon.findings if f.code == "loss-not-decreasing")
    assert (
        f.evidence["relative_improvement"] < -0.01
        and f.evidence["recent_mean"] > f.evidence["first_window_mean"]
    )
    assert "make it worse" in f.message and "raise the learning rate" not in f.message


@pytest.mark.parametrize(
    "sched,low_from",
    [
        # milestones meant as epochs (3, 6, 9 of 10) but the scheduler is stepped per batch
        (lambda opt, n: torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[3, 6, 9], gamma=0.1), 9),
        (lambda opt, n: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5), 7),
    ],
)
def test_lr_decayed_early(tmp_path, sched, low_from):
    mon = LossCurveMonitor(every_n_steps=5)
    fit(tmp_path, Sched(mlp(), sched=sched), blobs(), mon, steps=None, max_epochs=10)
    assert codes(mon) == ["lr-decayed-early"]
    f = mon.findings[0]
    # reported once the rate stayed low for 5% of the planned steps (3 of 60)
    assert f.step == low_from + 3 and f.evidence["planned_steps"] == 60
    assert f.evidence["low_since_step"] == low_from
    assert f.evidence["learning_rates"]["opt0_group0"] < 0.01 * 1e-2
    assert f"By step {low_from + 3} of 60" in f.message and f"since step {low_from}" in f.message


class DocsWarmup(Classifier):
    """The warm-up recipe of Lightning's docs: the rate is set by hand after each optimizer step, so
    step 0 runs at the full rate and step 1 at 1/500 of it."""

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure):
        optimizer.step(closure=optimizer_closure)
        if self.trainer.global_step < 500:
            scale = min(1.0, float(self.trainer.global_step + 1) / 500.0)
            for group in optimizer.param_groups:
                group["lr"] = scale * self.lr


class Plateau(Classifier):
    """ReduceLROnPlateau that cuts the rate 10x after every epoch (threshold: a 99% improvement)."""

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=self.lr)
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0, factor=0.1, threshold=0.99)
        return {
            "optimizer": opt,
            "lr_scheduler": {"scheduler": plateau, "monitor": "train_loss_epoch", "interval": "epoch"},
        }


@pytest.mark.parametrize("case", ["docs-warmup", "cyclic", "plateau"])
def test_healthy_schedules_that_dip_low_are_not_lr_decayed_early(tmp_path, case):
    """Before the fix: the docs' warm-up was reported at step 1 (its rate is 0.2% of the step-0
    rate for 3 steps), CyclicLR(1e-5..1e-2) at step 12 (the bottom of its first cycle), and a
    plateau scheduler once it had cut the rate 3 times (a decay the metric asked for)."""
    if case == "docs-warmup":
        model = DocsWarmup(mlp(), lr=1e-3)
    elif case == "cyclic":
        cyclic = lambda opt, n: torch.optim.lr_scheduler.CyclicLR(  # noqa: E731
            opt, base_lr=1e-5, max_lr=1e-2, step_size_up=6
        )
        model = Sched(mlp(), sched=cyclic)
    else:
        model = Plateau(mlp())
    mon = LossCurveMonitor(every_n_steps=5)
    fit(tmp_path, model, blobs(), mon, steps=None, max_epochs=10)
    assert "lr-decayed-early" not in codes(mon), mon.findings
    if case == "plateau":
        assert mon.figures["lr/opt0_group0"] < 1e-5  # the rate did fall far below 1% of its peak
        assert "ReduceLROnPlateau" in mon.figures["lr_check"]
    else:
        assert min(mon._lr_peak.values()) > 0 and mon._lr_done  # the check ran to the deadline


class StopAt(L.Callback):
    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        trainer.should_stop = trainer.global_step >= self.step


class Endless(torch.utils.data.IterableDataset):
    """A stream without a length: the trainer cannot plan the number of steps."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __iter__(self):
        return iter(zip(self.x, self.y))


@pytest.mark.parametrize("case", ["infinite", "stream"])
def test_unknown_planned_steps_is_not_judged_and_does_not_crash(tmp_path, case):
    """``estimated_stepping_batches`` is inf for ``max_epochs=-1`` (the message's int(inf) was an
    internal error that turned the whole monitor off) and -1 for a stream without a length."""
    x, y = blobs()
    if case == "infinite":
        train, opts = loaders(x, y)[0], {"max_epochs": -1, "callbacks": [StopAt(20)]}
    else:
        train, opts = torch.utils.data.DataLoader(Endless(x, y), batch_size=32), {"max_epochs": 3}
    decay = lambda opt, n: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)  # noqa: E731
    mon = LossCurveMonitor(every_n_steps=5)
    L.seed_everything(0, verbose=False)
    t = trainer(tmp_path, [mon, *opts.pop("callbacks", [])], logger=None, **opts)
    t.fit(Sched(mlp(), sched=decay), train)
    assert t.global_step >= 18
    assert codes(mon) == [], mon.findings
    assert "planned" in mon.figures["lr_check"]
    assert mon.figures["lr/opt0_group0"] < 1e-6  # the rate did decay: it was not judged


@pytest.mark.parametrize("kind", ["mlp", "gru"])
def test_a_long_warm_up_is_not_a_flat_curve(tmp_path, kind):
    """Adam warming up linearly to 1e-3 over 10000 (MLP) / 2000 (GRU) steps: at step 110 the rate
    is 1e-5..6e-5 and the loss has moved 0.4-0.8%, which read as "flat: raise the learning rate"."""
    net, data, steps = {"mlp": (mlp, blobs, 10000), "gru": (GRUNet, token_blobs, 2000)}[kind]
    warm = lambda opt, n: torch.optim.lr_scheduler.LinearLR(  # noqa: E731
        opt, start_factor=1e-3, total_iters=steps
    )
    mon = LossCurveMonitor(every_n_steps=5)
    fit(tmp_path, Sched(net(), lr=1e-3, sched=warm), data(), mon, steps=150)
    assert codes(mon) == [], mon.findings
    assert mon.figures["flat_test"].startswith("not judged")


def test_ddp_vote_runs_even_when_the_monitor_turned_itself_off():
    """With on_error="raise" under DDP every rank votes on each logging step; a rank whose monitor
    failed internally must still vote, or the others wait in the all-reduce for ever."""
    from types import SimpleNamespace

    votes = []
    strategy = SimpleNamespace(reduce_boolean_decision=lambda flag, all=True: votes.append(flag) or flag)
    t = SimpleNamespace(
        global_step=5, log_every_n_steps=5, world_size=2, strategy=strategy, is_global_zero=False, loggers=[]
    )
    mon = LossCurveMonitor(every_n_steps=5, on_error="raise")
    mon._broken = True  # this rank's monitor failed earlier and turned itself off
    mon.on_train_batch_end(t, None, {"loss": torch.tensor(1.0)}, None, 0)
    assert votes == [False]


def test_epoch_interval_step_decay_is_silent(tmp_path):
    sched = lambda opt, n: torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[6, 8], gamma=0.1)  # noqa: E731
    mon = LossCurveMonitor(every_n_steps=5)
    fit(tmp_path, Sched(mlp(), sched=sched, interval="epoch"), blobs(), mon, steps=None, max_epochs=10)
    assert codes(mon) == []


def test_tensorboard_tags_hold_the_interval_means(tmp_path):
    seen = []

    class Spy(Classifier):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            seen.append(float(loss))
            return loss

    mon = LossCurveMonitor(every_n_steps=4)
    t = fit(tmp_path, Spy(mlp()), blobs(), mon, steps=12, logger="tb")
    acc = accumulator(t.logger.log_dir)
    train = acc.Scalars("recipe/loss/train")
    assert [e.step for e in train] == [4, 8, 12]
    for i, e in enumerate(train):
        assert e.value == pytest.approx(sum(seen[4 * i : 4 * i + 4]) / 4, rel=1e-5)
    logs = acc.Scalars("recipe/loss/train_log10")
    assert [e.value for e in logs] == pytest.approx([math.log10(e.value) for e in train], rel=1e-5)
    assert [e.value for e in acc.Scalars("recipe/lr/opt0_group0")] == pytest.approx([1e-2] * 3)
    charts = mon.tensorboard_charts()["Recipe"]
    assert ("Multiline", [r"recipe/loss/train_log10"]) in charts.values()


def test_gradient_accumulation_undoes_lightnings_division(tmp_path):
    seen = []

    class Spy(Classifier):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            seen.append(float(loss))
            return loss

    mon = LossCurveMonitor(every_n_steps=2)
    t = fit(tmp_path, Spy(mlp()), blobs(), mon, steps=4, logger="tb", accumulate_grad_batches=2)
    train = accumulator(t.logger.log_dir).Scalars("recipe/loss/train")
    assert [e.step for e in train] == [2, 4]
    assert train[0].value == pytest.approx(sum(seen[:4]) / 4, rel=1e-5)


def test_no_sync_between_logging_steps(tmp_path, monkeypatch):
    import lightning_recipe.monitors.loss_curve as lc

    transfers, reductions = [], []
    real_to_host, real_chunk = lc.stats.to_host, lc._chunk_stats
    monkeypatch.setattr(lc.stats, "to_host", lambda v: transfers.append(1) or real_to_host(v))
    monkeypatch.setattr(
        lc, "_chunk_stats", lambda items, s: reductions.append(len(items)) or real_chunk(items, s)
    )
    mon = LossCurveMonitor(every_n_steps=10)
    fit(tmp_path, Classifier(mlp()), blobs(), mon, steps=35)
    assert reductions == [10, 10, 10, 5]  # steps 0-9, 10-19, 20-29, and the tail 30-34 at train end
    assert len(transfers) == 4


def test_manual_optimisation_without_returned_loss_is_skipped(tmp_path):
    class Manual(Classifier):
        def __init__(self):
            super().__init__(mlp())
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            opt = self.optimizers()
            x, y = batch
            loss = F.cross_entropy(self(x), y)
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()

    mon = LossCurveMonitor(every_n_steps=2)
    fit(tmp_path, Manual(), blobs(), mon, steps=6)
    assert codes(mon) == ["check-skipped"] and "return the loss" in mon.findings[0].message


def test_run_is_bit_identical_with_the_monitor(tmp_path):
    def weights(callbacks):
        L.seed_everything(1, verbose=False)
        model = Classifier(cnn())
        trainer(tmp_path, callbacks, logger=None, max_steps=12, max_epochs=100).fit(
            model, loaders(*image_blobs())[0]
        )
        return model.state_dict()

    w0, w1 = weights([]), weights([LossCurveMonitor(every_n_steps=3)])
    assert all(torch.equal(w0[k], w1[k]) for k in w0)


def test_state_round_trip(tmp_path):
    mon = LossCurveMonitor(every_n_steps=5)
    fit(tmp_path, Classifier(mlp(), lr=0.0, optimizer="sgd"), blobs(), mon, steps=115)
    other = LossCurveMonitor(every_n_steps=5)
    other.load_state_dict(mon.state_dict())
    for attr in (
        "initial",
        "best",
        "best_step",
        "_first_window",
        "_recent",
        "_intervals",
        "_lr_peak",
        "_lr_done",
    ):
        assert getattr(other, attr) == getattr(mon, attr), attr
    assert other.streaks.counts == mon.streaks.counts and other.findings == mon.findings
    assert other._last_logged_step == mon._last_logged_step


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="divergence_factor"):
        LossCurveMonitor(divergence_factor=1.0)
    with pytest.raises(ValueError, match="flat_tolerance"):
        LossCurveMonitor(flat_tolerance=0)
    with pytest.raises(ValueError, match="lr_floor"):
        LossCurveMonitor(lr_floor=1.5)
    with pytest.raises(ValueError, match="lr_deadline"):
        LossCurveMonitor(lr_deadline=0.0)
    with pytest.raises(ValueError, match="window"):
        LossCurveMonitor(window=0)
    with pytest.raises(ValueError, match="patience"):
        LossCurveMonitor(patience=True)
    with pytest.raises(ValueError, match="every_n_steps"):
        LossCurveMonitor(every_n_steps=-5)


def test_the_loss_is_read_by_the_probe_layer():
    """``_loss_of`` reads what the step returned with ``_probe.find_loss``: no loss for ``None``."""
    from types import SimpleNamespace

    from lightning_recipe.monitors.loss_curve import _loss_of

    t = torch.tensor(0.5)
    assert _loss_of(None) is None and _loss_of({"acc": t}) is None
    assert _loss_of(torch.tensor([1, 2])) is None and _loss_of(torch.zeros(0)) is None
    assert all(_loss_of(out) == t for out in (t, {"loss": t}, SimpleNamespace(loss=t)))
