"""TrainValGapMonitor: memorised tiny sets and too-small models are caught; healthy runs are not."""

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lightning_recipe as lr
from lightning_recipe.monitors.train_val_gap import TrainValGapMonitor
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


def noisy_blobs(n, seed=0, d=32, sep=0.3):
    """Heavily overlapping blobs: a few samples are easy to memorise and hard to generalise from."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(4, d, generator=g) * sep
    y = torch.randint(0, 4, (n,), generator=g)
    x = centers[y] + torch.randn(n, d, generator=g)
    return (x - x.mean(0)) / x.std(0), y


def stripes(n=1024, seed=0):
    """2-D Gaussian points; class = (left / right half) + 2 x (|x1| above / below its median).
    A linear model can only learn the half (~50%, chance 25%); an MLP learns both (~95%)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=g)
    y = (x[:, 0] > 0).long() + 2 * (x[:, 1].abs() > x[:, 1].abs().median()).long()
    return x, y


@pytest.fixture(autouse=True)
def _seed():
    """Models are built before fit() seeds: make their init independent of the test order."""
    L.seed_everything(0, verbose=False)


def fit(tmp_path, model, x, y, monitor, epochs, logger=None, val_fraction=0.25, extra=(), **kw):
    L.seed_everything(0, verbose=False)
    train, val = loaders(x, y, val_fraction=val_fraction)
    t = trainer(tmp_path, [*extra, monitor], logger=logger, max_epochs=epochs, **kw)
    t.fit(model, train, val)
    return t


def codes(monitor):
    return [f.code for f in monitor.findings]


def test_memorised_tiny_train_set_is_overfitting(tmp_path):
    x, y = noisy_blobs(48 + 256)
    mon = TrainValGapMonitor(num_classes=4)
    model = Classifier(mlp(d=32, hidden=512), lr=1e-3)
    fit(tmp_path, model, x, y, mon, epochs=8, val_fraction=256 / 304)
    assert codes(mon) == ["overfitting"]
    f = mon.findings[0]
    assert f.evidence["train_acc"] > 0.8 and f.evidence["val_acc"] < 0.7 and f.evidence["gap"] > 0.2
    assert len(f.evidence["history"]) == 3 and all(
        h["train_acc"] - h["val_acc"] > 0.2 for h in f.evidence["history"]
    )
    assert f"{f.evidence['gap']:.3f}" in f.message and "weight decay" in f.message


def test_linear_model_on_a_nonlinear_problem_is_underfitting(tmp_path):
    x, y = stripes()
    mon = TrainValGapMonitor(num_classes=4)
    fit(tmp_path, Classifier(nn.Linear(2, 4), lr=5e-2), x, y, mon, epochs=8)
    assert codes(mon) == ["underfitting"]
    f = mon.findings[0]
    assert f.evidence["low_accuracy"] == pytest.approx(0.625)
    assert 0.325 < f.evidence["train_acc"] < 0.625 and f.evidence["val_acc"] < 0.625  # above chance, low
    assert f.evidence["gap"] <= 0.05 and f.evidence["train_gain"] < 0.01
    assert "bigger" in f.message and f"{f.evidence['train_acc']:.3f}" in f.message


class Decayed(Classifier):
    """The learning rate is cut 1000x after 10 steps: training stops early for a reason other than size."""

    def configure_optimizers(self):
        opt = super().configure_optimizers()
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=1e-3)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


@pytest.mark.parametrize("case", ["lr=0", "decayed"])
def test_a_model_that_is_not_training_is_not_called_too_small(tmp_path, case):
    x, y = stripes()
    mon = TrainValGapMonitor(num_classes=4)
    model = Classifier(nn.Linear(2, 4), lr=0.0) if case == "lr=0" else Decayed(nn.Linear(2, 4), lr=5e-2)
    fit(tmp_path, model, x, y, mon, epochs=8)
    assert codes(mon) == []
    h = mon.history[-1]
    assert h["train_acc"] < 0.625 and h["val_acc"] < 0.625  # low and plateaued all the same


def test_chance_level_comes_from_loss_at_init_check(tmp_path):
    x, y = stripes()
    mon = TrainValGapMonitor()  # no num_classes: LossAtInitCheck measured 4 classes
    fit(tmp_path, Classifier(nn.Linear(2, 4), lr=5e-2), x, y, mon, epochs=8, extra=[lr.LossAtInitCheck()])
    assert codes(mon) == ["underfitting"] and mon.figures["low_accuracy"] == pytest.approx(0.625)


def test_without_a_class_count_underfitting_is_not_judged(tmp_path):
    x, y = stripes(n=256)
    mon = TrainValGapMonitor()
    fit(tmp_path, Classifier(nn.Linear(2, 4), lr=1e-2), x, y, mon, epochs=5)
    assert codes(mon) == [] and "not judged" in mon.figures["underfitting"]


@pytest.mark.parametrize("kind", ["mlp", "cnn", "gru", "stripes-mlp"])
def test_healthy_runs_are_silent(tmp_path, kind):
    torch.manual_seed(0)
    if kind == "stripes-mlp":
        (x, y), model, c = stripes(), Classifier(mlp(d=2, hidden=64), lr=1e-2), 4
    elif kind == "cnn":
        (x, y), model, c = image_blobs(n=512), Classifier(cnn()), 4
    elif kind == "gru":
        (x, y), model, c = token_blobs(n=512), Classifier(GRUNet()), 3
    else:
        (x, y), model, c = blobs(n=512), Classifier(mlp(), lr=1e-3), 4
    mon = TrainValGapMonitor(num_classes=c)
    fit(tmp_path, model, x, y, mon, epochs=8)
    assert codes(mon) == []
    assert len(mon.history) == 8 and mon.figures["train_acc_name"] == "train_acc_epoch"


def test_tensorboard_tags_and_sanity_check_skipped(tmp_path):
    x, y = blobs()
    mon = TrainValGapMonitor()
    t = fit(tmp_path, Classifier(mlp()), x, y, mon, epochs=3, logger="tb", num_sanity_val_steps=2)
    assert len(mon.history) == 3  # the sanity check is not a validation
    acc = accumulator(t.logger.log_dir)
    for tag in ("train_acc", "val_acc", "train_loss", "val_loss"):
        events = acc.Scalars(f"recipe/train_val/{tag}")
        assert [e.value for e in events] == pytest.approx([h[tag] for h in mon.history])
    gaps = acc.Scalars("recipe/train_val_gap/acc")
    assert [e.value for e in gaps] == pytest.approx([h["train_acc"] - h["val_acc"] for h in mon.history])
    assert len(acc.Scalars("recipe/train_val_gap/loss")) == 3
    charts = mon.tensorboard_charts()["Recipe"]
    assert charts["Train vs val loss"] == ("Multiline", [r"recipe/train_val/(train|val)_loss$"])
    assert charts["Train vs val loss (log10)"] == ("Multiline", [r"recipe/train_val/(train|val)_loss_log10"])
    logged = [e.value for e in acc.Scalars("recipe/train_val/val_loss_log10")]
    assert logged == pytest.approx([math.log10(h["val_loss"]) for h in mon.history])


class Quiet(Classifier):
    """Logs nothing, or metrics under its own names."""

    def __init__(self, prefix=None):
        super().__init__(mlp())
        self.prefix = prefix

    def training_step(self, batch, batch_idx):
        x, y = batch
        out = self(x)
        if self.prefix:
            self.log(f"{self.prefix}tr", (out.argmax(-1) == y).float().mean(), on_step=False, on_epoch=True)
        return F.cross_entropy(out, y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        if self.prefix:
            self.log(f"{self.prefix}va", (self(x).argmax(-1) == y).float().mean())


def test_no_metrics_is_one_info_naming_the_names_tried(tmp_path):
    mon = TrainValGapMonitor()
    fit(tmp_path, Quiet(), *blobs(), mon, epochs=3)
    assert codes(mon) == ["check-skipped"]
    f = mon.findings[0]
    assert (
        f.severity.value == "info"
        and "train_acc" in f.evidence["tried"]
        and "val_loss" in f.evidence["tried"]
    )
    assert "train_accuracy" in f.message and "_epoch" in f.message


def test_custom_metric_names(tmp_path):
    mon = TrainValGapMonitor(train_metric="acc_tr", val_metric="acc_va")
    fit(tmp_path, Quiet(prefix="acc_"), *blobs(), mon, epochs=2)
    assert codes(mon) == [] and len(mon.history) == 2
    assert mon.figures["train_acc_name"] == "acc_tr" and mon.figures["val_acc_name"] == "acc_va"


class LossOnly(Classifier):
    """Logs only train_loss / val_loss (no accuracy)."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))


def test_overfitting_from_losses_alone(tmp_path):
    x, y = noisy_blobs(48 + 256)
    mon = TrainValGapMonitor()
    fit(tmp_path, LossOnly(mlp(d=32, hidden=512), lr=1e-3), x, y, mon, epochs=12, val_fraction=256 / 304)
    assert codes(mon) == ["overfitting"]
    f = mon.findings[0]
    assert f.evidence["val_loss"] > 1.2 * f.evidence["best_val_loss"]
    assert f.evidence["train_loss"] < f.evidence["train_loss_at_best"]
    assert "validation loss rose" in f.message


class WordNames(Classifier):
    """Logs its metrics under names no guess covers, the way libraries do: the split word stands
    anywhere (``valid_`` / ``validation`` prefixes, ``_train`` suffixes), plus decoys that have no
    training twin (``ptl/val_loss``) or are not a loss (``kl_validation``)."""

    def __init__(self, net, train_word="train", val_word="valid", suffix=False, **kw):
        super().__init__(net, **kw)
        self.words = (train_word, val_word, suffix)

    def _name(self, word, what):
        return f"{what}_{word}" if self.words[2] else f"{word}_{what}"

    def training_step(self, batch, batch_idx):
        x, y = batch
        out = self(x)
        loss = F.cross_entropy(out, y)
        self.log(self._name(self.words[0], "loss"), loss, on_step=True, on_epoch=True)
        self.log(self._name(self.words[0], "accuracy"), (out.argmax(-1) == y).float().mean(), on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        out = self(x)
        self.log("ptl/val_loss", F.cross_entropy(out, y))
        self.log("kl_validation", torch.tensor(0.0))
        self.log(self._name(self.words[1], "loss"), F.cross_entropy(out, y))
        self.log(self._name(self.words[1], "accuracy"), (out.argmax(-1) == y).float().mean())


@pytest.mark.parametrize(
    "train_word, val_word, suffix",
    [
        ("train", "valid", False),
        ("train", "validation", False),
        ("train", "validation", True),
        ("training", "val", True),
    ],
)
def test_pairs_are_read_by_the_words_in_their_names(tmp_path, train_word, val_word, suffix):
    """Metric pairs that differ only in a train / val word, wherever it stands, are found
    without naming them (pytorch-tabular's ``valid_loss``, scvi-tools' ``elbo_validation``)."""
    mon = TrainValGapMonitor()
    model = WordNames(mlp(), train_word=train_word, val_word=val_word, suffix=suffix)
    fit(tmp_path, model, *blobs(), mon, epochs=2)
    assert codes(mon) == [] and len(mon.history) == 2, mon.findings
    val_loss = f"loss_{val_word}" if suffix else f"{val_word}_loss"
    assert mon.figures["val_loss_name"] == val_loss
    assert mon.figures["train_loss_name"].startswith(f"loss_{train_word}" if suffix else f"{train_word}_loss")
    assert mon.figures["val_acc_name"].endswith(val_word) or mon.figures["val_acc_name"].startswith(val_word)


def test_memorised_set_is_overfitting_under_library_names(tmp_path):
    """The broken case stays caught when the names are read by their words."""
    x, y = noisy_blobs(48 + 256)

    mon = TrainValGapMonitor()
    model = WordNames(mlp(d=32, hidden=512), lr=1e-3, train_word="train", val_word="validation")
    fit(tmp_path, model, x, y, mon, epochs=12, val_fraction=256 / 304)
    assert "overfitting" in codes(mon), mon.findings
    assert mon.figures["val_loss_name"] == "validation_loss"


def test_run_is_bit_identical_with_the_monitor(tmp_path):
    def weights(callbacks):
        L.seed_everything(1, verbose=False)
        model = Classifier(cnn())
        train, val = loaders(*image_blobs())
        trainer(tmp_path, callbacks, logger=None, max_epochs=2).fit(model, train, val)
        return model.state_dict()

    w0, w1 = weights([]), weights([TrainValGapMonitor(num_classes=4)])
    assert all(torch.equal(w0[k], w1[k]) for k in w0)


def test_state_round_trip(tmp_path):
    x, y = noisy_blobs(48 + 256)
    mon = TrainValGapMonitor(num_classes=4)
    fit(tmp_path, Classifier(mlp(d=32, hidden=512), lr=1e-3), x, y, mon, epochs=4, val_fraction=256 / 304)
    other = TrainValGapMonitor(num_classes=4)
    other.load_state_dict(mon.state_dict())
    assert other.history == mon.history and other.streaks.counts == mon.streaks.counts
    assert other.findings == mon.findings and other.figures == mon.figures


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="together"):
        TrainValGapMonitor(train_metric="a")
    with pytest.raises(TypeError, match="val_loss"):
        TrainValGapMonitor(train_loss="a", val_loss=3)
    with pytest.raises(ValueError, match="num_classes"):
        TrainValGapMonitor(num_classes=1)
    with pytest.raises(ValueError, match="gap"):
        TrainValGapMonitor(gap=1.5)
    with pytest.raises(ValueError, match="low_accuracy"):
        TrainValGapMonitor(low_accuracy=0)
    with pytest.raises(ValueError, match="loss_rise"):
        TrainValGapMonitor(loss_rise=-1)
    with pytest.raises(ValueError, match="patience"):
        TrainValGapMonitor(patience=0)


def test_several_validation_dataloaders_use_the_first_ones_metrics(tmp_path):
    """With two validation dataloaders Lightning logs ``val_acc/dataloader_idx_0`` and ``..._1``:
    the first loader's metrics are the ones compared (was: check-skipped, nothing judged)."""

    class TwoVal(Classifier):
        def validation_step(self, batch, batch_idx, dataloader_idx=0):
            super().validation_step(batch, batch_idx)

    x, y = noisy_blobs(48 + 256)
    L.seed_everything(0, verbose=False)
    train, val = loaders(x, y, val_fraction=256 / 304)
    mon = TrainValGapMonitor(num_classes=4)
    t = trainer(tmp_path, [mon], logger=None, max_epochs=8)
    t.fit(TwoVal(mlp(d=32, hidden=512), lr=1e-3), train, [val, val])
    assert "val_acc/dataloader_idx_0" in t.callback_metrics
    assert codes(mon) == ["overfitting"]
    assert mon.figures["val_acc_name"] == "val_acc/dataloader_idx_0"


class ScriptedLosses(L.LightningModule):
    """Logs a scripted train/val loss per epoch (a real fit, real callback_metrics)."""

    def __init__(self, val_losses):
        super().__init__()
        self.layer = nn.Linear(2, 1)
        self.val_losses = val_losses

    def training_step(self, batch, batch_idx):
        loss = self.layer(batch[0]).pow(2).mean()
        self.log("train_loss", 1.0 / (self.current_epoch + 1), on_epoch=True, on_step=False)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.val_losses[self.current_epoch])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-3)


@pytest.mark.parametrize(
    ("val_losses", "withdrawn"),
    [
        ([1.0, 0.8, 0.7, 0.9, 1.0, 1.1, 0.6, 0.5], True),  # a rise at a schedule's peak, then a new best
        ([1.0, 0.8, 0.7, 0.9, 1.0, 1.1, 1.2, 1.3], False),  # it kept rising: the verdict stands
    ],
)
def test_overfitting_refuted_by_a_new_best_is_withdrawn_at_fit_end(tmp_path, val_losses, withdrawn):
    x = torch.randn(32, 2)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=16)
    mon = TrainValGapMonitor()
    trainer(tmp_path, [mon], max_epochs=len(val_losses)).fit(ScriptedLosses(val_losses), data, data)
    (f,) = [f for f in mon.findings if f.code == "overfitting"]
    if withdrawn:
        assert f.severity is lr.Severity.INFO and f.evidence["was"] == "warning"
        assert "Withdrawn at the end of fit: the validation loss reached a new best 0.5" in f.message
    else:
        assert f.severity is lr.Severity.WARNING and "withdrawn" not in f.evidence
