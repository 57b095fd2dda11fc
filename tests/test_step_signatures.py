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
