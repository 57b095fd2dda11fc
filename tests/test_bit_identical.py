"""The suite never changes the user's run: same final weights and logged metrics with a fixed seed."""

import csv

import lightning as L
import pytest
import torch

import lightning_recipe as lr
from models import Classifier, blobs, cnn, image_blobs, loaders, mlp, trainer


def fit(tmp_path, callbacks, kind):
    L.seed_everything(123, verbose=False)
    x, y = image_blobs() if kind == "cnn" else blobs()
    model = Classifier(cnn() if kind == "cnn" else mlp(), lr=1e-2)
    train, val = loaders(x, y)
    t = trainer(tmp_path, callbacks, logger="csv", max_epochs=2)
    t.fit(model, train, val)
    with open(tmp_path / "run" / "version_0" / "metrics.csv") as fh:
        rows = [{k: v for k, v in r.items() if not k.startswith("recipe/")} for r in csv.DictReader(fh)]
    rows = [r for r in rows if any(v for k, v in r.items() if k not in ("epoch", "step"))]
    if callbacks:  # the suite really measured: a callback that turned itself off proves nothing
        measured = {type(cb).__name__: cb.figures for cb in callbacks if isinstance(cb, lr.RecipeCallback)}
        assert len(measured) >= 14 and all(measured.values()), sorted(k for k, v in measured.items() if not v)
        blind = {f.source: f.message for f in lr.findings(t) if f.code in ("internal-error", "check-skipped")}
        if kind == "mlp":  # no conv layer and no image input: no first-layer filters to look at
            blind.pop("FirstLayerFilterMonitor", None)
        assert blind == {}, blind
    return model.state_dict(), rows, t.optimizers[0].state_dict(), torch.get_rng_state()


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_suite_leaves_the_run_bit_identical(tmp_path, kind):
    w0, m0, o0, r0 = fit(tmp_path / "plain", [], kind)
    w1, m1, o1, r1 = fit(tmp_path / "suite", lr.recipe_callbacks(), kind)
    assert w0.keys() == w1.keys()
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k
    assert m0 == m1
    assert torch.equal(r0, r1)
    for a, b in zip(o0["state"].values(), o1["state"].values()):
        for k in a:
            assert torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k])), k
