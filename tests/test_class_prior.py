"""ClassPriorCheck: imbalanced classifiers that start at uniform are caught, prior-initialised,
balanced, class-weighted and per-token ones stay quiet."""

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_recipe as lr
from models import Classifier, mlp, trainer


def imbalanced(n=2048, d=8, pos=1 / 51, seed=0):
    """Binary data with ``pos`` positives, learnable from x."""
    g = torch.Generator().manual_seed(seed)
    y = (torch.rand(n, generator=g) < pos).long()
    x = torch.randn(n, d, generator=g) + 1.5 * y.float().unsqueeze(1)
    return x, y


def multiclass(n=2048, d=8, shares=(0.25, 0.25, 0.25, 0.25), seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.multinomial(torch.tensor(shares), n, replacement=True, generator=g)
    centers = torch.randn(len(shares), d, generator=g)
    return torch.randn(n, d, generator=g) + centers[y], y


class Binary(L.LightningModule):
    """A sigmoid detector trained with BCE-with-logits on (x, y) batches."""

    def __init__(self, d=8, prior=None, pos_weight=None, probs=False):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d, 32), nn.ReLU(), nn.Linear(32, 1))
        if prior is not None:
            with torch.no_grad():
                self.net[-1].bias.fill_(math.log(prior / (1 - prior)))
        self.pos_weight = pos_weight
        self.probs = probs

    def training_step(self, batch, batch_idx):
        x, y = batch
        out = self.net(x).squeeze(-1)
        if self.probs:
            return F.binary_cross_entropy(torch.sigmoid(out), y.float())
        pw = None if self.pos_weight is None else torch.tensor(self.pos_weight)
        return F.binary_cross_entropy_with_logits(out, y.float(), pos_weight=pw)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def prior_init(model, y, classes):
    freq = torch.bincount(y, minlength=classes).float() / len(y)
    with torch.no_grad():
        model.net[-1].bias.copy_(freq.log())
    return model


def run(tmp_path, model, x, y, check=None, batch_size=32, **kw):
    check = check or lr.ClassPriorCheck()
    L.seed_everything(0, verbose=False)
    loader = DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True)
    trainer(tmp_path, [check], logger=None, **{"max_epochs": 1, **kw}).fit(model, loader)
    return check


def codes(check):
    return [f.code for f in check.findings if f.severity.value != "info"]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rare_class_at_uniform_init_is_caught(tmp_path, seed):
    torch.manual_seed(seed)
    x, y = imbalanced(seed=seed)
    check = run(tmp_path, Binary(), x, y)
    assert codes(check) == ["class-prior-init"]
    f = check.findings[0]
    assert f.evidence["ratio"] > 5
    p = float(y.float().mean())
    assert f.evidence["bias"][0] == pytest.approx(math.log(p / (1 - p)), abs=0.3)
    assert "log(p/(1-p))" in f.message


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rare_class_with_prior_bias_is_quiet(tmp_path, seed):
    torch.manual_seed(seed)
    x, y = imbalanced(seed=seed)
    check = run(tmp_path, Binary(prior=float(y.float().mean())), x, y)
    assert codes(check) == []
    assert check.figures["ratio"] < 1.5


def test_balanced_binary_and_pos_weight_are_quiet(tmp_path):
    x, y = imbalanced(pos=0.5)
    assert codes(run(tmp_path / "a", Binary(), x, y)) == []
    x, y = imbalanced()
    p = float(y.float().mean())
    check = run(tmp_path / "b", Binary(pos_weight=(1 - p) / p), x, y)
    assert codes(check) == [] and check.figures["ratio"] < 1.5


def test_binary_cross_entropy_on_probabilities(tmp_path):
    x, y = imbalanced(pos=1 / 11)
    check = run(tmp_path, Binary(probs=True), x, y)
    assert codes(check) == ["class-prior-init"]


def test_softmax_imbalanced_caught_prior_init_quiet(tmp_path):
    shares = (0.82, 0.02, 0.02, 0.02, 0.02, 0.02, 0.02, 0.02, 0.02, 0.02)
    x, y = multiclass(shares=shares)
    check = run(tmp_path / "a", Classifier(mlp(d=8, classes=10)), x, y)
    assert codes(check) == ["class-prior-init"]
    assert "log class prior" in check.findings[0].message
    model = prior_init(Classifier(mlp(d=8, classes=10)), y, 10)
    assert codes(run(tmp_path / "b", model, x, y)) == []


@pytest.mark.parametrize("shares", [(0.25,) * 4, (0.4, 0.3, 0.2, 0.1)])
def test_balanced_or_mild_multiclass_is_quiet(tmp_path, shares):
    x, y = multiclass(shares=shares)
    check = run(tmp_path, Classifier(mlp(d=8, classes=4)), x, y)
    assert codes(check) == [] and check.figures["ratio"] < 1.3


def test_class_weights_balance_the_loss(tmp_path):
    x, y = imbalanced(pos=1 / 21)
    counts = torch.bincount(y, minlength=2).float()

    class Weighted(Classifier):
        def loss_fn(self, out, y):
            return F.cross_entropy(out, y, weight=counts.sum() / counts)

    check = run(tmp_path, Weighted(mlp(d=8, classes=2)), x, y)
    assert codes(check) == [] and check.figures["ratio"] < 1.3


def test_few_labels_are_not_judged(tmp_path):
    x, y = imbalanced(n=64)
    check = run(tmp_path, Binary(), x, y)
    assert codes(check) == [] and check.figures["labels"] == 64


def test_per_token_losses_are_left_alone(tmp_path):
    class LM(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(50, 16)
            self.out = nn.Linear(16, 50)

        def training_step(self, batch, batch_idx):
            (tokens,) = batch
            logits = self.out(self.emb(tokens[:, :-1]))
            return F.cross_entropy(logits.reshape(-1, 50), tokens[:, 1:].reshape(-1))

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    g = torch.Generator().manual_seed(0)
    tokens = torch.multinomial(torch.tensor([20.0] + [1.0] * 49), 256 * 17, replacement=True, generator=g)
    check = lr.ClassPriorCheck()
    L.seed_everything(0, verbose=False)
    loader = DataLoader(TensorDataset(tokens.view(256, 17)), batch_size=32)
    trainer(tmp_path, [check], logger=None, max_epochs=1).fit(LM(), loader)
    assert codes(check) == [] and "per token" in check.figures["note"]


def test_judged_after_num_batches_and_resume_state(tmp_path):
    x, y = imbalanced()
    check = run(tmp_path, Binary(), x, y, check=lr.ClassPriorCheck(num_batches=10))
    assert codes(check) == ["class-prior-init"]
    assert check.figures["labels"] == 320
    state = check.state_dict()
    again = lr.ClassPriorCheck()
    again.load_state_dict(state)
    assert again.done and [f.code for f in again.findings] == ["class-prior-init"]


def test_arguments_are_validated():
    with pytest.raises(ValueError, match="max_ratio"):
        lr.ClassPriorCheck(max_ratio=1.0)
    with pytest.raises(ValueError, match="min_labels"):
        lr.ClassPriorCheck(min_labels=0)
    with pytest.raises(ValueError, match="num_batches"):
        lr.ClassPriorCheck(num_batches=0)


def test_loss_modules_with_pos_weight_and_label_smoothing(tmp_path):
    x, y = imbalanced()
    p = float(y.float().mean())

    class Module(Binary):
        def __init__(self):
            super().__init__()
            self.loss = nn.BCEWithLogitsLoss(pos_weight=torch.tensor([(1 - p) / p]))

        def training_step(self, batch, batch_idx):
            x, y = batch
            return self.loss(self.net(x), y.float().unsqueeze(1))

    check = run(tmp_path / "a", Module(), x, y)
    assert codes(check) == [] and check.figures["ratio"] < 1.3

    class Smoothed(Classifier):
        def loss_fn(self, out, y):
            return nn.CrossEntropyLoss(label_smoothing=0.1)(out, y)

    check = run(tmp_path / "b", Smoothed(mlp(d=8, classes=2)), x, y)
    assert codes(check) == ["class-prior-init"]


def test_run_stopped_inside_the_first_epoch_is_judged(tmp_path):
    x, y = imbalanced()
    check = run(tmp_path, Binary(), x, y, max_steps=12)
    assert codes(check) == ["class-prior-init"] and check.figures["labels"] == 12 * 32
