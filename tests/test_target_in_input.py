"""TargetInInputCheck: a leaked label column, a copy / log / ratio of a regression target are
caught; strongly but legitimately correlated features, lag windows, images and tokens are not."""

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_recipe as lr
from models import Classifier, blobs, cnn, image_blobs, mlp, trainer


def fit(tmp_path, x, y, model=None, check=None, **kw):
    check = check or lr.TargetInInputCheck()
    if model is None:
        classes = int(y.max()) + 1 if not y.is_floating_point() else 1
        model = Classifier(mlp(d=x.shape[1], classes=classes), loss="ce" if classes > 1 else "mse")
    L.seed_everything(0, verbose=False)
    loader = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True)
    trainer(tmp_path, [check], logger=None, **{"max_steps": 10, **kw}).fit(model, loader)
    return check


def loud(check):
    return [f.code for f in check.findings if f.severity.value != "info"]


def regression(n=1024, d=8, noise=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = x @ torch.randn(d, generator=g) + noise * torch.randn(n, generator=g)
    return x, y.unsqueeze(1)


def standardise(x):
    return (x - x.mean(0)) / x.std(0)


# ---------------------------------------------------------------------------- classification
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_label_column_in_the_table_is_caught(tmp_path, seed):
    x, y = blobs(n=512, seed=seed)
    leaky = torch.cat([x[:, :5], y.float().unsqueeze(1), x[:, 5:]], 1)
    check = fit(tmp_path, leaky, y)
    assert loud(check) == ["target-in-input"]
    f = check.findings[0]
    assert f.evidence["feature"] == 5 and f.evidence["agreement"] == 1.0
    assert "Input feature 5 is the target" in f.message


def test_standardised_binary_label_column_is_caught(tmp_path):
    x, y = blobs(n=512, classes=2)
    leaky = standardise(torch.cat([x, y.float().unsqueeze(1)], 1))
    assert loud(fit(tmp_path, leaky, y)) == ["target-in-input"]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_healthy_and_strong_features_are_quiet(tmp_path, seed):
    x, y = blobs(n=512, seed=seed)
    g = torch.Generator().manual_seed(seed)
    agree = torch.where(torch.rand(512, generator=g) < 0.95, y, torch.randint(0, 4, (512,), generator=g))
    strong = torch.cat(
        [x, agree.float().unsqueeze(1), y.float().unsqueeze(1) + torch.randn(512, 1, generator=g)], 1
    )
    check = fit(tmp_path, strong, y)
    assert loud(check) == [] and check.figures["class_agreement (the target)"] < 0.98


def test_digits_and_images_are_quiet(tmp_path):
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16
    y = torch.tensor(digits.target)
    check = fit(tmp_path / "a", x, y)
    assert loud(check) == [] and check.figures["features"] == 64
    xi, yi = image_blobs(n=256)
    check = fit(tmp_path / "b", xi, yi, model=Classifier(cnn()))
    assert check.findings == [] and "not a table" in check.figures["note"]


def test_token_ids_with_the_label_token_and_without(tmp_path):
    class Bag(Classifier):
        def forward(self, tokens):
            return self.net(self.emb(tokens).mean(1))

    def model():
        m = Bag(mlp(d=8, classes=2))
        m.emb = nn.Embedding(1000, 8)
        return m

    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(5, 1000, (512, 16), generator=g)
    y = (tokens[:, 3] % 2).long()  # learnable from a token, but no position is the label
    assert loud(fit(tmp_path / "a", tokens, y, model=model())) == []
    prompt = tokens.clone()
    prompt[:, 0] = y + 1  # "label: positive ..." left in the prompt
    assert loud(fit(tmp_path / "b", prompt, y, model=model())) == ["target-in-input"]


def test_rare_classes_need_enough_minority_labels(tmp_path):
    x, _ = blobs(n=256)
    y = torch.zeros(256, dtype=torch.long)
    y[:3] = 1
    flag = (y == 1).float().unsqueeze(1)  # perfect on 3 positives: not enough to call it the label
    assert loud(fit(tmp_path, torch.cat([x, flag], 1), y)) == []


# ---------------------------------------------------------------------------- regression
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("leak", ["copy", "log", "ratio", "bucket"])
def test_feature_computed_from_the_target_is_caught(tmp_path, seed, leak):
    x, y = regression(seed=seed)
    price = torch.exp(y / y.std())  # a positive target
    size = x[:, :1].abs() + 0.5
    feature = {
        "copy": price,
        "log": torch.log(price),
        "ratio": price / size,  # price per unit of a feature the model also sees
        "bucket": torch.bucketize(price, torch.quantile(price, torch.linspace(0, 1, 12)[1:-1])).float(),
    }[leak]
    inputs = standardise(torch.cat([size, x[:, 1:], feature], 1))
    check = fit(tmp_path, inputs, price)
    assert loud(check) == ["target-in-input"], check.figures
    f = check.findings[0]
    assert f.evidence.get("feature") == inputs.shape[1] - 1 or inputs.shape[1] - 1 in f.evidence["features"]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_strongly_correlated_features_are_quiet(tmp_path, seed):
    x, y = regression(seed=seed, noise=0.3)
    g = torch.Generator().manual_seed(seed)
    near = y + 0.03 * y.std() * torch.randn(y.shape, generator=g)  # r = 0.9996
    check = fit(tmp_path, standardise(torch.cat([x, near, near.exp()], 1)), y)
    assert loud(check) == []
    assert check.figures["min_1_minus_r2 (the target)"] > 1e-4
    assert check.figures["min_monotone_violations (the target)"] > 10


@pytest.mark.parametrize("series", ["random_walk", "sine", "noisy_sine"])
def test_lag_windows_are_quiet(tmp_path, series):
    g = torch.Generator().manual_seed(0)
    t = torch.arange(3000, dtype=torch.float32)
    s = {
        "random_walk": torch.randn(3000, generator=g).cumsum(0),
        "sine": torch.sin(t * 2 * torch.pi / 50),
        "noisy_sine": torch.sin(t * 2 * torch.pi / 50) + 0.05 * torch.randn(3000, generator=g),
    }[series]
    windows = s.unfold(0, 9, 1)
    x, y = windows[:, :8], windows[:, 8:]
    check = fit(tmp_path, x, y)
    assert loud(check) == []


def test_single_feature_function_fitting_is_quiet(tmp_path):
    x = torch.linspace(0, 3, 512).unsqueeze(1)
    assert loud(fit(tmp_path, x, x**3)) == []


def test_preflight_and_skips(tmp_path):
    x, y = blobs(n=128)
    leaky = torch.cat([x, y.float().unsqueeze(1)], 1)
    check = lr.TargetInInputCheck()
    check.check(None, Classifier(mlp(d=17)), (leaky, y))
    assert loud(check) == ["target-in-input"]
    check = lr.TargetInInputCheck()
    check.check(None, Classifier(mlp()), (x,))
    assert check.findings == [] and "no target" in check.figures["note"]


def test_arguments_are_validated():
    with pytest.raises(ValueError, match="tolerance"):
        lr.TargetInInputCheck(tolerance=0.5)
    with pytest.raises(ValueError, match="num_samples"):
        lr.TargetInInputCheck(num_samples=4)


def test_shifted_sequences_are_not_judged(tmp_path):
    """(x, y) with y = x shifted by one: the autoregressive layout, not a leak (future-leak's job)."""
    g = torch.Generator().manual_seed(0)
    stream = torch.randint(0, 50, (512, 9), generator=g)
    check = lr.TargetInInputCheck()
    check.check(None, None, (stream[:, :-1], stream[:, 1:]))
    assert check.findings == [] and "sequence" in check.figures["note"]
    s = torch.randn(512, 9, generator=g).cumsum(1)
    check = lr.TargetInInputCheck()
    check.check(None, None, (s[:, :-1], s[:, 1:]))
    assert check.findings == []


def test_multi_output_regression_is_judged_per_column(tmp_path):
    x, y = regression()
    y2 = torch.cat([y, 2 * y + 1], 1)
    check = lr.TargetInInputCheck()
    check.check(None, None, (torch.cat([x, y2[:, 1:]], 1), y2))
    assert set(loud(check)) == {"target-in-input"} and "target column" in check.findings[-1].message
