"""Every step signature Lightning accepts gets the full suite: ``training_step(dataloader_iter)``
(callbacks get no batch), a step that returns None for some batches, a one-argument
``validation_step``. No internal error (the conftest fails on one), and the checks measure."""

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lightning_recipe as lr
from models import blobs, loaders, trainer


class Base(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))

    def forward(self, x):
        return self.net(x)

    def validation_step(self, batch):  # one argument, as Lightning allows
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


class DataloaderIter(Base):
    def training_step(self, dataloader_iter):
        batch, _, _ = next(dataloader_iter)
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, batch_size=len(x))
        return loss


class SkipsOddBatches(Base):
    def training_step(self, batch, batch_idx):
        if batch_idx % 2:
            return None  # Lightning skips the optimizer step for this batch
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss


@pytest.mark.parametrize("cls", [DataloaderIter, SkipsOddBatches])
def test_step_signatures_get_measured(tmp_path, cls):
    x, y = blobs()
    callbacks = lr.recipe_callbacks(monitor="val_loss", print_report=False)
    t = trainer(tmp_path, callbacks, max_epochs=2)
    t.fit(cls(), *loaders(x, y))
    figures = {type(cb).__name__: cb.figures for cb in callbacks}
    assert figures["LossAtInitCheck"]["num_classes"] == 4
    assert figures["OverfitBatchCheck"] and figures["BatchIndependenceCheck"]
    assert figures["ClassPriorCheck"]["labels_from"] in ("batches", "first batch")
    if cls is DataloaderIter:  # callbacks get no batch: the training data is read by the check
        assert figures["TrainValOverlapCheck"]["read_from_fresh_iterator"] == len(t.train_dataloader.dataset)
    skipped = {f.source: f.message for f in lr.findings(t) if f.code == "check-skipped"}
    skipped.pop("FirstLayerFilterMonitor", None)  # an MLP on non-image data
    assert skipped == {}
    assert [f for f in lr.findings(t) if f.severity is not lr.Severity.INFO] == []


class LogsThroughTheLogger(Base):
    """``self.logger.experiment`` in the step (images, histograms): the copy's logger takes the
    calls and does nothing, so the step runs on every probe."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.logger.experiment.add_histogram("inputs", x, self.global_step)
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss


def test_a_step_that_writes_through_the_logger_is_measured_and_the_copy_writes_nothing(tmp_path):
    x, y = blobs()
    callbacks = lr.recipe_callbacks(print_report=False)
    writes = []
    t = trainer(tmp_path, callbacks, max_epochs=1)  # with a TensorBoardLogger
    original = t.logger.experiment.add_histogram

    def add_histogram(tag, *args, **kwargs):
        writes.append(tag)
        return original(tag, *args, **kwargs)

    t.logger.experiment.add_histogram = add_histogram
    t.fit(LogsThroughTheLogger(), *loaders(x, y))
    assert writes.count("inputs") == t.global_step  # the real steps only, none from the probes
    skipped = {f.source: f.message for f in lr.findings(t) if f.code == "check-skipped"}
    skipped.pop("FirstLayerFilterMonitor", None)
    assert skipped == {}
    assert (
        callbacks[[type(c).__name__ for c in callbacks].index("LossAtInitCheck")].figures["num_classes"] == 4
    )


class AssertsTrainerState(Base):
    """Asserts on the trainer's state at the first batch (Lightning's own tests do this): true in
    the real step, false when a check reruns the step on validation batches (its validation_step
    makes no loss call, so the validation-time probes use training_step)."""

    def validation_step(self, batch):
        x, y = batch
        self.log("val_acc", (self(x).argmax(-1) == y).float().mean())

    def training_step(self, batch, batch_idx):
        assert self.trainer.training, "training_step outside training"
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss


class NeedsGradMode(Base):
    def training_step(self, batch, batch_idx):
        assert torch.is_grad_enabled(), "training_step needs grad mode"
        x, y = batch
        return F.cross_entropy(self(x), y)


class TwoBatchesPerStep(Base):
    def training_step(self, dataloader_iter):
        (x1, y1), _, _ = next(dataloader_iter)
        (x2, y2), _, _ = next(dataloader_iter)
        return F.cross_entropy(self(torch.cat([x1, x2])), torch.cat([y1, y2]))


class ReadsDictBatches(Base):
    """Training batches are dicts of loaders' batches; validation batches are plain (x, y), and
    validation_step makes no loss call: a validation-time probe's training_step cannot read them."""

    def training_step(self, batch, batch_idx):
        x, y = batch["a"]
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch):
        x, y = batch
        self.log("val_acc", (self(x).argmax(-1) == y).float().mean())


@pytest.mark.parametrize(
    ("cls", "error"),
    [
        (AssertsTrainerState, "AssertionError"),
        (NeedsGradMode, "AssertionError"),
        (TwoBatchesPerStep, "StopIteration"),
        (ReadsDictBatches, "TypeError"),
    ],
)
def test_a_step_that_raises_on_a_probe_is_a_precise_skip_and_the_run_goes_on(tmp_path, cls, error):
    # the conftest fails the test on any internal-error finding
    x, y = blobs()
    callbacks = lr.recipe_callbacks(print_report=False)
    t = trainer(tmp_path, callbacks, max_epochs=1)
    train, val = loaders(x, y)
    if cls is ReadsDictBatches:
        from lightning.pytorch.utilities import CombinedLoader

        train = CombinedLoader({"a": train}, "max_size_cycle")
    t.fit(cls(), train, val)
    assert t.current_epoch == 1 and t.global_step > 0  # the real run went on
    raised = [f for f in lr.findings(t) if f.code == "check-skipped" and f"raised {error}" in f.message]
    assert raised, [f.message for f in lr.findings(t) if f.code == "check-skipped"]
    for f in raised:
        assert f"your training_step raised {error} when the check ran it" in f.message
    if cls is TwoBatchesPerStep:
        assert "asked dataloader_iter for more batches" in raised[0].message
    if cls is AssertsTrainerState:
        assert "training_step outside training" in raised[0].message
    # the checks that never reran the step on a later batch still measured
    figures = {type(cb).__name__: cb.figures for cb in callbacks}
    assert figures["UpdateRatioMonitor"] and figures["GradientMonitor"]


@pytest.mark.internal_error_expected
def test_our_own_hook_failing_inside_the_step_is_still_an_internal_error(tmp_path, monkeypatch):
    # an exception raised by the suite's own code while the user's step runs (here the loss
    # capture's hook) is the suite's failure: internal-error, not a skip blamed on the user's step
    from lightning_recipe._probe import capture

    namespace: dict = {}  # a function compiled as if it were in capture.py: a bug of the suite's
    exec(
        compile("def record(self, *a, **k):\n    raise RuntimeError('suite bug')", capture.__file__, "exec"),
        namespace,
    )
    monkeypatch.setattr(capture.LossCapture, "__torch_function__", namespace["record"])
    x, y = blobs()
    check = lr.LossAtInitCheck()
    trainer(tmp_path, [check], max_steps=1).fit(SkipsOddBatches(), *loaders(x, y))
    (f,) = check.findings
    assert f.code == "internal-error" and "suite bug" in f.message


def test_detect_anomaly_runs_the_probes_without_anomaly_mode(tmp_path):
    # Trainer(detect_anomaly=True) makes NaN gradients raise in the run's own backward (the fit
    # stops there, as the user asked); the probes' backward on copies, which runs first, measures
    # them instead of failing internally (the conftest fails the test on an internal error)
    class NanLoss(Base):
        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self(x), y) * torch.tensor(float("nan"))

    x, y = blobs()
    callbacks = lr.recipe_callbacks(print_report=False)
    t = trainer(tmp_path, callbacks, max_steps=1, detect_anomaly=True)
    with pytest.raises(RuntimeError, match="returned nan values"):
        t.fit(NanLoss(), *loaders(x, y))
    assert not torch.is_anomaly_enabled()
    figures = {type(cb).__name__: cb.figures for cb in callbacks}
    assert figures["RegularizationCheck"] and figures["GradientCheck"]
