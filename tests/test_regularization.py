"""RegularizationCheck: a hand-written penalty that overwhelms the data loss at init."""

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_recipe as lr
from lightning_recipe.checks.regularization import RegularizationCheck
from models import blobs, cnn, mlp, trainer


def digits(n: int = 256):
    d = load_digits()
    x = torch.tensor(d.data[:n], dtype=torch.float32)
    x = (x - x.mean(0)) / (x.std(0) + 1.0)
    return x, torch.tensor(d.target[:n])


class Penalised(L.LightningModule):
    """Cross-entropy (or MSE) plus ``lam * sum(w ** 2)`` over the weights, added by hand."""

    def __init__(self, net, lam=0.0, kind="ce", weight_decay=0.0, aux=0.0, multitask=False):
        super().__init__()
        self.net, self.lam, self.kind, self.weight_decay = net, lam, kind, weight_decay
        self.aux, self.multitask = aux, multitask

    def training_step(self, batch, batch_idx):
        x, y = batch
        out = self.net(x)
        loss = F.cross_entropy(out, y) if self.kind == "ce" else F.mse_loss(out.squeeze(-1), y)
        if self.multitask:  # a second data loss with its own weight: no penalty
            loss = 0.5 * loss + 2.0 * F.mse_loss(out.softmax(-1), F.one_hot(y, out.shape[-1]).float())
        if self.aux:  # an activation penalty: depends on the input, an auxiliary loss
            loss = loss + self.aux * out.pow(2).mean()
        if self.lam:
            weights = [p for n, p in self.net.named_parameters() if "weight" in n]
            loss = loss + self.lam * sum((w**2).sum() for w in weights)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3, weight_decay=self.weight_decay)


def run(tmp_path, model, x, y, **kw):
    check = RegularizationCheck(**kw)
    loader = DataLoader(TensorDataset(x, y), batch_size=64)
    t = trainer(tmp_path, [check], logger=None, max_steps=1)
    t.fit(model, loader)
    return check


def codes(check):
    return [f.code for f in check.findings]


def test_the_issues_l2_penalty_is_flagged(tmp_path):
    x, y = digits()
    model = Penalised(nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)), lam=0.1)
    with pytest.warns(lr.RecipeWarning, match=r"\[regularization-dominates\]"):
        check = run(tmp_path, model, x, y)
    assert codes(check) == ["regularization-dominates"]
    f = check.findings[0]
    assert f.severity.value == "warning"
    assert 0.6 < f.evidence["penalty_fraction"] < 0.72  # two thirds of the loss
    assert f.evidence["grad_ratio"] > 1.0
    assert f.evidence["penalty"] + f.evidence["data_loss"] == pytest.approx(f.evidence["loss"], rel=1e-5)
    assert f.evidence["data_loss"] == pytest.approx(2.3, abs=0.3)  # the cross-entropy at init


@pytest.mark.parametrize("lam", [1e-4, 5e-4])
@pytest.mark.parametrize("kind", ["mlp", "cnn", "regression"])
def test_weight_decay_at_usual_strengths_is_quiet(tmp_path, lam, kind):
    if kind == "regression":
        x, _ = blobs(n=128)
        y = x[:, :3].sum(1)
        model = Penalised(mlp(16, 1), lam=lam, kind="mse")
    else:
        x, y = digits()
        net = mlp(64, 10, hidden=128) if kind == "mlp" else cnn(classes=10)
        x = x if kind == "mlp" else x.view(-1, 1, 8, 8)
        model = Penalised(net, lam=lam)
    check = run(tmp_path, model, x, y)
    assert codes(check) == []
    assert 0 < check.figures["grad_ratio"] < 0.05
    assert 0 < check.figures["penalty_fraction"] < 0.05


def test_optimizer_weight_decay_and_no_penalty_are_quiet(tmp_path):
    x, y = digits()
    check = run(tmp_path, Penalised(mlp(64, 10), weight_decay=0.5), x, y)
    assert codes(check) == []
    assert check.figures["grad_ratio"] == 0.0  # no penalty in the loss at all


def test_weighted_data_losses_are_no_penalty(tmp_path):
    x, y = digits()
    check = run(tmp_path, Penalised(mlp(64, 10), multitask=True), x, y)
    assert codes(check) == []
    assert check.figures["grad_ratio"] == 0.0


def test_an_input_dependent_auxiliary_loss_is_not_judged(tmp_path):
    x, y = digits()
    check = run(tmp_path, Penalised(mlp(64, 10), aux=50.0), x, y)
    assert codes(check) == []
    assert check.figures["grad_ratio"] > 0.5  # it is large, but it is not a regulariser
    assert "auxiliary" in check.figures["note"]


class PinballLoss(nn.Module):
    """A custom loss module (no parameters) that calls a functional loss inside: read as one
    loss, not two."""

    def forward(self, pred, target):
        err = target.unsqueeze(-1) - pred
        q = torch.tensor([0.1, 0.5, 0.9])
        return torch.maximum(q * err, (q - 1) * err).mean() + 0.0 * F.l1_loss(pred[..., 1], target)


class LibraryLoss(L.LightningModule):
    """The data loss comes from a loss module or a distribution's log-likelihood, the penalty is
    added by hand (``lam * sum(w ** 2)``)."""

    def __init__(self, kind, lam=0.0):
        super().__init__()
        self.kind, self.lam = kind, lam
        self.net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 3 if kind == "module" else 2))
        self.loss = PinballLoss()

    def training_step(self, batch, batch_idx):
        x, y = batch
        out = self.net(x)
        target = y.float() / 9.0
        if self.kind == "module":
            loss = self.loss(out, target)
        else:
            dist = torch.distributions.Normal(out[:, 0], F.softplus(out[:, 1]) + 1e-3)
            loss = -dist.log_prob(target).mean()
        if self.lam:
            loss = loss + self.lam * sum(
                (p**2).sum() for n, p in self.net.named_parameters() if "weight" in n
            )
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


@pytest.mark.parametrize("kind", ["module", "distribution"])
def test_loss_modules_and_distributions_are_data_losses(tmp_path, kind):
    """A loss module (counted once, not with the functional loss it calls) or a distribution's
    negative log-likelihood is the data loss: no penalty without one, and the issue's penalty
    is still flagged."""
    x, y = digits()
    check = run(tmp_path, LibraryLoss(kind), x, y)
    assert codes(check) == [], check.findings
    assert check.figures["penalty_fraction"] == 0.0
    with pytest.warns(lr.RecipeWarning, match=r"\[regularization-dominates\]"):
        check = run(tmp_path, LibraryLoss(kind, lam=0.5), x, y)
    assert codes(check) == ["regularization-dominates"]
    f = check.findings[0]
    assert f.evidence["penalty"] + f.evidence["data_loss"] == pytest.approx(f.evidence["loss"], rel=1e-5)


def test_the_real_run_is_untouched(tmp_path):
    x, y = digits()
    states = []
    for callbacks in ([], [RegularizationCheck()]):
        torch.manual_seed(0)
        model = Penalised(mlp(64, 10), lam=0.1)
        loader = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True)
        L.seed_everything(0, verbose=False)
        trainer(tmp_path, callbacks, logger=None, max_steps=3).fit(model, loader)
        states.append({k: v.clone() for k, v in model.state_dict().items()})
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_arguments_are_validated():
    with pytest.raises(ValueError, match="max_grad_ratio"):
        RegularizationCheck(max_grad_ratio=0)
