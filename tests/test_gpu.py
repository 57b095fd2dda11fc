"""The suite on a CUDA device (skipped without one; CI has none)."""

import lightning as L
import pytest
import torch

import lightning_recipe as lr
from models import Classifier, cnn, image_blobs, loaders, trainer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("precision", ["32-true", "16-mixed", "bf16-mixed"])
def test_full_suite_on_gpu_is_silent_and_logs(tmp_path, precision):
    if precision == "bf16-mixed" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    L.seed_everything(0, verbose=False)
    x, y = image_blobs(n=512)
    train, val = loaders(x, y, batch_size=64)
    t = trainer(
        tmp_path,
        lr.recipe_callbacks(monitor="val_loss", print_report=False),
        accelerator="gpu",
        precision=precision,
        max_epochs=3,
        log_every_n_steps=2,
    )
    t.fit(Classifier(cnn()), train, val)
    loud = [f for f in lr.findings(t) if f.severity is not lr.Severity.INFO]
    assert loud == []
    figures = {type(cb).__name__: cb.figures for cb in t.callbacks if isinstance(cb, lr.RecipeCallback)}
    assert figures["LossAtInitCheck"]["num_classes"] == 4
    assert (tmp_path / "run" / "version_0" / "recipe_report.json").exists()


def test_checks_catch_a_bug_on_gpu(tmp_path):
    class Softmaxed(Classifier):
        def forward(self, x):
            return self.net(x).softmax(-1)

    x, y = image_blobs(n=256)
    train, val = loaders(x, y)
    t = trainer(tmp_path, lr.recipe_callbacks(print_report=False), accelerator="gpu", max_steps=5)
    t.fit(Softmaxed(cnn()), train, val)
    assert "softmax-before-loss" in {f.code for f in lr.findings(t)}
