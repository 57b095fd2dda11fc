"""DataInspectionCheck: normalised inputs pass, raw-scale / NaN / constant inputs are caught."""

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lightning_recipe as lr
from lightning_recipe import DataInspectionCheck
from models import Classifier, accumulator, blobs, cnn, image_blobs, loaders, mlp, trainer


def run(tmp_path, x, y, check=None, model=None, **kw):
    check = check or lr.DataInspectionCheck()
    train, val = loaders(x, y, **kw)
    trainer(tmp_path, [check], max_steps=1).fit(model or Classifier(mlp(d=x.shape[1])), train, val)
    return check


def codes(check):
    return [f.code for f in check.findings]


def test_standardised_tabular_and_images_are_silent(tmp_path):
    assert codes(run(tmp_path / "a", *blobs())) == []
    assert codes(run(tmp_path / "b", *image_blobs(), model=Classifier(cnn()))) == []
    x, y = image_blobs()
    assert codes(run(tmp_path / "c", (x - x.min()) / (x.max() - x.min()), y, model=Classifier(cnn()))) == []


def test_digits_raw_scale_is_reported(tmp_path):
    from lightning_recipe.demo import load_digits_tensors

    x, y, _, _ = load_digits_tensors(normalize=False)
    check = run(tmp_path, x[:256], y[:256], model=Classifier(cnn(classes=10)))
    assert codes(check) == ["input-not-normalized"]
    f = check.findings[0]
    assert f.evidence["max"] == 16.0 and f.evidence["rms"] > 5 and "16" in f.message


def test_0_255_images_and_wild_feature_scales(tmp_path):
    x, y = image_blobs()
    check = run(tmp_path / "a", (x - x.min()) / (x.max() - x.min()) * 255, y, model=Classifier(cnn()))
    assert codes(check) == ["input-not-normalized"]
    x, y = blobs(d=16)
    x[:, 3] *= 1e4  # one column in dollars
    check = run(tmp_path / "b", x, y)
    assert "input-not-normalized" in codes(check)
    assert any(f.evidence.get("feature") == 3 for f in check.findings)


def test_nan_and_constant_inputs_are_bad_input(tmp_path):
    x, y = blobs()
    x[::7, 1] = float("inf")
    check = run(tmp_path / "a", x, y, shuffle=False)
    assert codes(check)[0] == "bad-input" and check.findings[0].severity is lr.Severity.ERROR
    check = run(tmp_path / "b", torch.zeros(128, 16), y[:128])
    assert codes(check) == ["bad-input"] and "constant" in check.findings[0].message


def test_integer_inputs_are_not_judged(tmp_path):
    tokens = torch.randint(0, 500, (128, 10))
    y = torch.randint(0, 3, (128,))

    class Bag(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.EmbeddingBag(500, 8)
            self.out = torch.nn.Linear(8, 3)

        def forward(self, t):
            return self.out(self.emb(t))

    check = run(tmp_path, tokens, y, model=Classifier(Bag()))
    assert codes(check) == [] and "integer" in check.figures["note"]


def test_tensorboard_gets_batch_image_labels_and_stats(tmp_path):
    x, y = image_blobs(channels=3)
    check = run(tmp_path, x, y, model=Classifier(cnn(channels=3)))
    acc = accumulator(tmp_path / "run" / "version_0")
    tags = acc.Tags()
    assert "recipe/batch_before_net" in tags["images"]
    assert "recipe/labels" in tags["histograms"]
    assert {"recipe/data/mean", "recipe/data/feature_2/std"} <= set(tags["scalars"])
    labels = acc.Histograms("recipe/labels")[0].histogram_value
    assert sum(labels.bucket) == 32 and list(labels.bucket) == check.figures["label_counts"]
    img = acc.Images("recipe/batch_before_net")[0]
    assert img.width >= 160 and img.height >= 160


def test_flattened_images_with_image_shape(tmp_path):
    x, y = image_blobs(size=8)
    check = run(tmp_path, x.reshape(len(x), 64), y, check=lr.DataInspectionCheck(image_shape=(1, 8, 8)))
    assert check.figures["images_logged"] == 32


def test_bad_arguments():
    with pytest.raises(ValueError, match="max_rms"):
        lr.DataInspectionCheck(max_rms=-1)
    with pytest.raises(ValueError, match="image_shape"):
        lr.DataInspectionCheck(image_shape=(2, 8, 8))


def test_unreadable_batch_is_skipped_not_crashed(tmp_path):
    x, y = blobs()

    class Custom(Classifier):
        def split(self, batch):
            return batch["pixels"], batch["digit"]

    # no known key: the float tensor is read as the input by structure; no target key, no classes
    check = run(tmp_path, x, y, model=Custom(mlp()), dict_keys=("pixels", "digit"))
    assert codes(check) == [] and "input_dtype" in check.figures
    check = run(
        tmp_path / "b",
        x,
        y,
        model=Custom(mlp()),
        dict_keys=("pixels", "digit"),
        check=lr.DataInspectionCheck(get_input=lambda b: b["pixels"], get_target=lambda b: b["digit"]),
    )
    assert codes(check) == [] and check.figures["classes_in_batch"] >= 3


@pytest.mark.parametrize("target", ["bool", "ids"])
def test_targets_that_are_not_class_indices_do_not_stop_the_check(target):
    # bool targets made bincount raise, and int64 ids / hashes / timestamps asked it for one counter
    # per value up to the largest (1.7e9 timestamps: 13.6 GB, enough to get the run killed; 2**40
    # here fails at once): either way the input itself was never judged
    x, y = blobs(n=32)
    y = y > 1 if target == "bool" else torch.arange(32) + 2**40
    check = lr.DataInspectionCheck()
    check.run_safely(None, "check", check.check, None, Classifier(mlp()), (x * 50, y))
    assert codes(check) == ["input-not-normalized"]
    counts = check.figures.get("label_counts")
    assert counts == ([int((~y).sum()), int(y.sum())] if target == "bool" else None)


class LogCounts(L.LightningModule):
    """Count data whose model log-transforms (or normalises) its input itself: raw counts are its
    correct input, and the scale is judged where the input enters the first parametrised layer."""

    def __init__(self, first: str):
        super().__init__()
        self.first = first
        self.norm = nn.BatchNorm1d(16) if first == "batchnorm" else None
        self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
        # a parameter of the model's own (a dispersion, a temperature), as scvi-tools' VAE holds:
        # the model is not the layer where the input enters
        self.dispersion = nn.Parameter(torch.zeros(4))

    def forward(self, x):
        if self.first == "log1p":
            x = torch.log1p(x)
        elif self.first == "batchnorm":
            x = self.norm(x)
        return self.net(x) + self.dispersion

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


@pytest.mark.parametrize(("first", "flagged"), [("log1p", False), ("batchnorm", False), ("raw", True)])
def test_scale_is_judged_where_the_input_enters_the_first_layer(first, flagged):
    g = torch.Generator().manual_seed(0)
    x = torch.poisson(torch.rand(64, 16, generator=g) * 200, generator=g)  # raw counts, RMS ~115
    y = torch.randint(0, 4, (64,), generator=g)
    check = DataInspectionCheck()
    check.check(None, LogCounts(first), (x, y))
    assert ("input-not-normalized" in [f.code for f in check.findings]) is flagged
    if not flagged:
        assert "normalised_inside_model" in check.figures
        assert check.figures["first_layer"] in ("net.0", "norm")
