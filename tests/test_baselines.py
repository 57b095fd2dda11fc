"""BaselineMonitor: class-prior / target-mean baselines with the user's loss, and its verdict."""

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_recipe as lr
from lightning_recipe.monitors.baselines import TAG, BaselineMonitor
from models import Classifier, accumulator, blobs, mlp, trainer


def digits():
    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    return x, torch.tensor(d.target)


class Blind(nn.Module):
    """Ignores its input: a learnable constant output (it can learn the prior, nothing more)."""

    def __init__(self, d, out):
        super().__init__()
        self.lin = nn.Linear(d, out)

    def forward(self, x):
        return self.lin(x * 0)


def fit(tmp_path, model, x, y, mon, epochs=6, logger=None, seed=0, n_val=None):
    n_val = n_val or len(x) // 4
    L.seed_everything(seed, verbose=False)
    train = DataLoader(TensorDataset(x[n_val:], y[n_val:]), batch_size=32, shuffle=True)
    val = DataLoader(TensorDataset(x[:n_val], y[:n_val]), batch_size=64)
    t = trainer(tmp_path, [mon], logger=logger, max_epochs=epochs, log_every_n_steps=10)
    t.fit(model, train, val)
    return t


def codes(mon):
    return [f.code for f in mon.findings]


def test_healthy_digits_are_quiet_and_the_dashboard_has_the_baseline(tmp_path):
    x, y = digits()
    mon = BaselineMonitor()
    t = fit(tmp_path, Classifier(mlp(64, 10, hidden=64), lr=3e-3), x, y, mon, logger="tb")
    assert codes(mon) == []
    assert mon.figures["val_loss"] == pytest.approx(math.log(10), abs=0.02)  # prior ~ uniform
    assert mon.figures["val_acc"] < 0.15  # always the majority class
    assert mon.figures["model_val_acc"] > 0.85 and mon.figures["best_gap"] > 0.8
    tags = accumulator(t.logger.log_dir).Tags()["scalars"]
    for name in ("train_loss", "val_loss", "val_acc", "model_val_loss", "model_val_acc"):
        assert f"{TAG}/{name}" in tags, name
    charts = t.callbacks and mon.tensorboard_charts()["Recipe"]
    assert any("recipe/train_val" in tag for tag in charts["Loss vs dumb baseline"][1])


def test_the_baseline_loss_is_the_users_loss_of_the_prior(tmp_path):
    x, y = blobs(n=512, classes=3)
    y = torch.where(torch.rand(512) < 0.6, torch.zeros_like(y), y)  # imbalanced
    weight = torch.tensor([0.5, 1.0, 2.0])

    class Weighted(Classifier):
        def loss_fn(self, out, y):
            return F.cross_entropy(out, y, weight=weight, label_smoothing=0.1)

    mon = BaselineMonitor(num_batches=100)
    fit(tmp_path, Weighted(mlp(16, 3)), x, y, mon, epochs=1)
    counts = mon._sum.cpu() + 0.5  # the training targets it saw
    assert counts.sum() > 300
    prior = counts / counts.sum()
    # per-batch means averaged: two batches of 64, with the user's loss call (weight, smoothing)
    halves = [
        F.cross_entropy(prior.log().expand(64, 3), y[i : i + 64], weight=weight, label_smoothing=0.1)
        for i in (0, 64)
    ]
    assert mon.figures["val_loss"] == pytest.approx(float(sum(halves) / 2), rel=1e-4)
    majority = float((y[:128] == int(prior.argmax())).float().mean())
    assert mon.figures["val_acc"] == pytest.approx(majority)


def test_shuffled_labels_are_no_better_than_the_baseline(tmp_path):
    x, y = digits()
    y = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(1))]
    mon = BaselineMonitor()
    with pytest.warns(lr.RecipeWarning, match=r"\[no-better-than-baseline\]"):
        fit(tmp_path, Classifier(mlp(64, 10, hidden=64), lr=3e-3), x, y, mon)
    assert codes(mon) == ["no-better-than-baseline"]
    f = mon.findings[0]
    assert f.severity.value == "warning" and f.evidence["best_gap"] < 0.02
    assert f.evidence["baseline"] == "class prior"


def test_a_blind_model_on_imbalanced_classes_is_flagged(tmp_path):
    # 90% of one class: the blind model learns the prior, whose loss (0.33) is far below the
    # uniform chance loss (0.69): only the prior baseline shows it learned nothing
    x, _ = blobs(n=768, classes=2)
    y = (torch.rand(768, generator=torch.Generator().manual_seed(0)) < 0.1).long()
    mon = BaselineMonitor()
    fit(tmp_path, Classifier(Blind(16, 2), lr=1e-2), x, y, mon)
    assert codes(mon) == ["no-better-than-baseline"]
    assert mon.findings[0].evidence["model_val_loss"] < 0.5 < math.log(2)


def test_imbalanced_learnable_and_regression_models_are_quiet(tmp_path):
    x, y = blobs(n=768, classes=2)
    keep = (y == 0) | (torch.rand(768) < 0.15)  # about 85/15
    mon = BaselineMonitor()
    fit(tmp_path, Classifier(mlp(16, 2)), x[keep], y[keep], mon)
    assert codes(mon) == [] and mon.figures["best_gap"] > 0.3
    xr, _ = blobs(n=512)
    yr = xr[:, :3].sum(1, keepdim=True) + 0.3 * torch.randn(512, 1)
    mon = BaselineMonitor()
    fit(tmp_path, Classifier(mlp(16, 1), loss="mse"), xr, yr, mon)
    assert codes(mon) == [] and mon.figures["best_gap"] > 0.5
    assert "model_val_acc" not in mon.figures


def test_a_blind_regression_model_is_flagged(tmp_path):
    xr, _ = blobs(n=512)
    yr = xr[:, :3].sum(1, keepdim=True) + 2.0
    mon = BaselineMonitor()
    fit(tmp_path, Classifier(Blind(16, 1), loss="mse", lr=3e-2), xr, yr, mon, epochs=8)
    assert codes(mon) == ["no-better-than-baseline"]
    assert mon.findings[0].evidence["baseline"] == "target mean"


class LikelihoodModel(L.LightningModule):
    """The negative log-likelihood of a predicted distribution whose mean is not one of its
    parameters (a log-normal: mean = exp(loc + scale**2 / 2)), as forecasting and single-cell
    models predict; ``blind`` ignores the input."""

    def __init__(self, blind=False):
        super().__init__()
        self.net, self.blind = mlp(16, 2), blind

    def training_step(self, batch, batch_idx):
        return self._nll(batch)

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self._nll(batch))

    def _nll(self, batch):
        x, y = batch
        out = self.net(x * 0 if self.blind else x)
        dist = torch.distributions.LogNormal(out[:, 0], F.softplus(out[:, 1]) + 1e-3)
        return -dist.log_prob(y).mean()

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


@pytest.mark.parametrize("blind", [False, True])
def test_a_distribution_loss_is_compared_with_the_know_nothing_distribution(tmp_path, blind):
    xr, _ = blobs(n=512)
    yr = (0.5 * xr[:, :3].sum(1) + 0.1 * torch.randn(512)).exp()
    mon = BaselineMonitor()
    fit(tmp_path, LikelihoodModel(blind), xr, yr, mon, epochs=8)
    assert "val_loss" in mon.figures and "gap" not in mon.figures.get("skipped", "")
    if blind:
        assert codes(mon) == ["no-better-than-baseline"], mon.findings
    else:
        assert codes(mon) == [] and mon.figures["best_gap"] > 0.3, mon.figures


def test_the_real_run_is_bit_identical(tmp_path):
    x, y = digits()
    states = []
    for callbacks in ([], [BaselineMonitor(every_n_steps=1)]):
        torch.manual_seed(0)
        model = Classifier(mlp(64, 10), lr=3e-3)
        L.seed_everything(0, verbose=False)
        loader = DataLoader(TensorDataset(x[:256], y[:256]), batch_size=32, shuffle=True)
        trainer(tmp_path, callbacks, logger=None, max_epochs=2).fit(model, loader, loader)
        states.append({k: v.clone() for k, v in model.state_dict().items()})
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert torch._C._len_torch_function_stack() == 0


def test_arguments_are_validated():
    with pytest.raises(ValueError, match="min_gap"):
        BaselineMonitor(min_gap=1.0)
    with pytest.raises(ValueError, match="every_n_steps"):
        BaselineMonitor(every_n_steps=0)
