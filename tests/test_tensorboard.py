"""TensorBoard plumbing: device histograms, image grids, writer lookup, layout, findings text."""

import numpy as np
import pytest
import torch

from lightning_recipe import tensorboard as tb
from lightning_recipe.callback import RecipeCallback
from models import Classifier, accumulator, blobs, loaders, mlp, trainer


class FakeWriter:
    def __init__(self):
        self.hist = {}

    def add_histogram_raw(self, tag, **kw):
        self.hist[tag] = kw


def test_histogram_matches_numpy_and_drops_non_finite():
    torch.manual_seed(0)
    x = torch.randn(10_000)
    x[:5] = float("nan")
    x[5] = float("inf")
    hb = tb.HistogramBatch(bins=20, max_samples=1 << 20)
    hb.add("h", x)
    hb.add("const", torch.full((10,), 3.0))
    w = FakeWriter()
    hb.flush(w, step=7)
    h = w.hist["h"]
    finite = x[torch.isfinite(x)].numpy().astype(np.float64)
    counts, _ = np.histogram(finite, bins=20, range=(finite.min(), finite.max()))
    assert h["num"] == finite.size
    assert np.allclose(h["bucket_counts"], counts, atol=2)  # edges differ by float rounding only
    assert h["min"] == pytest.approx(finite.min()) and h["max"] == pytest.approx(finite.max())
    assert h["sum"] == pytest.approx(finite.sum(), rel=1e-4)
    assert h["global_step"] == 7 and len(h["bucket_limits"]) == 20
    assert w.hist["const"]["num"] == 10 and sum(w.hist["const"]["bucket_counts"]) == 10
    assert len(hb) == 0


def test_histogram_subsamples_big_tensors():
    hb = tb.HistogramBatch(bins=8, max_samples=1000)
    hb.add("big", torch.arange(100_000, dtype=torch.float32))
    w = FakeWriter()
    hb.flush(w, 0)
    assert 900 <= w.hist["big"]["num"] <= 1000


def test_histogram_flush_is_one_transfer(monkeypatch):
    calls = []
    orig = torch.Tensor.cpu

    def counting_cpu(self, *a, **k):
        calls.append(self.shape)
        return orig(self, *a, **k)

    hb = tb.HistogramBatch()
    for i in range(5):
        hb.add(f"t{i}", torch.randn(100))
    monkeypatch.setattr(torch.Tensor, "cpu", counting_cpu)
    hb.flush(FakeWriter(), 0)
    assert len(calls) == 1


def test_make_grid_shapes_and_per_image_normalisation():
    imgs = torch.stack([torch.zeros(1, 4, 4), torch.ones(1, 4, 4) * 5, torch.arange(16.0).reshape(1, 4, 4)])
    g = tb.make_grid(imgs, nrow=2, padding=1)
    assert g.shape == (1, 2 * 5 + 1, 2 * 5 + 1)
    assert float(g.min()) >= 0 and float(g.max()) <= 1
    assert float(g[0, 1:5, 1:5].mean()) == pytest.approx(0.5)  # constant image -> 0.5
    assert float(g[0, 6:10, 1:5].min()) == 0 and float(g[0, 6:10, 1:5].max()) == 1
    assert tb.make_grid(torch.rand(5, 3, 6, 6)).shape[0] == 3
    with pytest.raises(ValueError, match="channels"):
        tb.make_grid(torch.rand(2, 5, 4, 4))
    with pytest.raises(ValueError, match="images"):
        tb.make_grid(torch.rand(4, 4))
    assert tb.upscale(torch.rand(1, 8, 8), 32).shape == (1, 32, 32)


class Charted(RecipeCallback):
    def tensorboard_charts(self):
        return {"Recipe": {"probe": ("Multiline", [r"recipe/probe/.*"])}}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        tb.log_scalars(trainer, {"recipe/probe/a": 1.0 + batch_idx})
        if batch_idx == 1:
            self.report(trainer, "check-skipped", "info", "hello | world")


def test_writer_layout_scalars_and_findings_text_in_event_file(tmp_path):
    x, y = blobs()
    train, val = loaders(x, y)
    t = trainer(tmp_path, [Charted()], max_steps=3)
    t.fit(Classifier(mlp()), train, val)
    acc = accumulator(tmp_path / "run" / "version_0")
    tags = acc.Tags()
    assert "recipe/probe/a" in tags["scalars"]
    assert [e.value for e in acc.Scalars("recipe/probe/a")] == [1.0, 2.0, 3.0]
    assert "custom_scalars__config__" in tags["tensors"]
    assert "recipe/findings/text_summary" in tags["tensors"]
    assert "recipe/report/text_summary" in tags["tensors"]
    text = acc.Tensors("recipe/findings/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert "check-skipped" in text and "hello \\| world" in text
    from tensorboard.plugins.custom_scalar import layout_pb2

    layout = layout_pb2.Layout()
    layout.ParseFromString(acc.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0])
    assert layout.category[0].title == "Recipe"
    assert layout.category[0].chart[0].multiline.tag == [r"recipe/probe/.*"]


def test_csv_logger_gets_scalars_and_no_writer(tmp_path):
    x, y = blobs()
    train, val = loaders(x, y)
    t = trainer(tmp_path, [Charted()], logger="csv", max_steps=3)
    t.fit(Classifier(mlp()), train, val)
    assert tb.get_writer(t) is None
    text = (tmp_path / "run" / "version_0" / "metrics.csv").read_text()
    assert "recipe/probe/a" in text
    assert (tmp_path / "run" / "version_0" / "recipe_report.json").exists()


def test_norms_of_half_precision_tensors_do_not_overflow():
    # _foreach_norm returns the tensors' own dtype: a finite float16 gradient whose norm passes
    # 65504 read as inf (a false non-finite-gradients error under precision="16-true")
    from lightning_recipe import stats

    half = torch.full((100_000,), 300.0, dtype=torch.float16)
    out = stats.norms([half, half.bfloat16(), torch.ones(4, dtype=torch.float64)])
    assert out.dtype == torch.float32
    assert torch.allclose(out, torch.tensor([300.0 * 100_000**0.5, 300.0 * 100_000**0.5, 2.0]), rtol=1e-3)
