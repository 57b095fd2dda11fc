"""OverfitBatchCheck: healthy models memorise 20 samples; models that cannot learn are caught."""

import csv
import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lightning_recipe as lr
from lightning_recipe.checks.overfit_batch import OverfitBatchCheck
from models import (
    Classifier,
    GRUNet,
    TinyTransformer,
    accumulator,
    blobs,
    cnn,
    image_blobs,
    loaders,
    mlp,
    token_blobs,
    trainer,
)

pytestmark = pytest.mark.filterwarnings("ignore::lightning_recipe.RecipeWarning")


def run(model, batch, **kw):
    check = OverfitBatchCheck(**kw)
    check.run_check(None, model, batch)
    return check


def codes(check, severity=None):
    return [f.code for f in check.findings if severity is None or f.severity.value == severity]


class Regressor(Classifier):
    def __init__(self, net):
        super().__init__(net, loss="mse")

    def forward(self, x):
        return self.net(x).squeeze(-1)


class Smoothed(Classifier):
    def loss_fn(self, out, y):
        return F.cross_entropy(out, y, label_smoothing=0.1)


class WithL2(Classifier):
    """A regulariser added in training_step: the check must optimise the data loss only."""

    def training_step(self, batch, batch_idx):
        return super().training_step(batch, batch_idx) + 0.1 * sum(p.pow(2).sum() for p in self.parameters())


class Augmented(Classifier):
    """Noise augmentation inside training_step: the check freezes the draws, as for a fixed dataset."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x + torch.randn_like(x)), y)


def regression_batch():
    x, _ = blobs(d=8)
    return x[:32], torch.sin(2 * x[:32, 0]) + x[:32, 1] * x[:32, 2]


def healthy(kind):
    torch.manual_seed(0)
    x, y = blobs()
    if kind == "mlp":
        return Classifier(mlp()), (x[:32], y[:32])
    if kind == "cnn":
        xi, yi = image_blobs()
        return Classifier(cnn(dropout=0.5)), (xi[:32], yi[:32])
    if kind in ("gru", "transformer"):
        xt, yt = token_blobs()
        return Classifier(GRUNet() if kind == "gru" else TinyTransformer()), (xt[:32], yt[:32])
    if kind == "dict":
        return Classifier(mlp(), x_key="features", y_key="label"), {"features": x[:32], "label": y[:32]}
    if kind == "regression":
        return Regressor(mlp(d=8, classes=1)), regression_batch()
    if kind == "random-labels":  # nothing to generalise, but one batch is still memorised
        return Classifier(mlp()), (x[:32], torch.randint(0, 4, (32,)))
    if kind == "label-smoothing":
        return Smoothed(mlp()), (x[:32], y[:32])
    if kind == "l2-in-step":
        return WithL2(mlp()), (x[:32], y[:32])
    if kind == "augmented":
        return Augmented(mlp()), (x[:32], y[:32])
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind",
    [
        "mlp",
        "cnn",
        "gru",
        "transformer",
        "dict",
        "regression",
        "random-labels",
        "label-smoothing",
        "l2-in-step",
        "augmented",
    ],
)
def test_healthy_models_memorise_and_stay_silent(kind):
    model, batch = healthy(kind)
    check = run(model, batch)
    assert codes(check) == []
    fig = check.figures
    assert fig["outcomes"][-1].endswith("memorised") and fig["samples"] == 20
    assert fig["relative_gap"] <= 0.01 and fig["steps"] < 200
    if kind in ("mlp", "cnn", "dict", "random-labels"):
        assert fig["accuracy"] == 1.0 and fig["reference"] == pytest.approx(math.log(4), rel=1e-5)
    if kind == "regression":
        assert fig["reference_kind"] == "mean-predictor loss"
    if kind == "label-smoothing":  # floor = entropy of the smoothed target, not 0
        q = torch.tensor([0.925, 0.025, 0.025, 0.025])
        assert fig["floor"] == pytest.approx(float(-(q * q.log()).sum()), rel=1e-4)
        assert fig["best_loss"] > fig["floor"]


class Zeroed(Classifier):
    def forward(self, x):
        return self.net(x) * 0


class InputLost(Classifier):
    def forward(self, x):
        return self.net(torch.zeros_like(x))


class SoftmaxOut(Classifier):
    def forward(self, x):
        return self.net(x).softmax(-1)


class SigmoidOut(Classifier):
    def forward(self, x):
        return self.net(x).sigmoid()


class Bottleneck(Classifier):
    """A frozen 2-unit feature extractor: the head cannot separate 4 classes of 20 samples."""

    def __init__(self):
        super().__init__(nn.Sequential(nn.Linear(16, 2), nn.Linear(2, 4)))
        self.net[0].requires_grad_(False)


class BoundedRegressor(Regressor):
    def forward(self, x):
        return self.net(x).squeeze(-1).sigmoid()


@pytest.mark.parametrize(
    "bug", ["zeroed-output", "input-lost", "softmax", "sigmoid", "bottleneck", "bounded"]
)
def test_models_that_cannot_learn_are_errors(bug):
    torch.manual_seed(0)
    x, y = blobs()
    batch = (x[:32], y[:32])
    model = {
        "zeroed-output": lambda: Zeroed(mlp()),
        "input-lost": lambda: InputLost(mlp()),
        "softmax": lambda: SoftmaxOut(mlp()),
        "sigmoid": lambda: SigmoidOut(mlp()),
        "bottleneck": lambda: Bottleneck(),
        "bounded": lambda: BoundedRegressor(mlp(d=8, classes=1)),
    }[bug]()
    if bug == "bounded":
        xr, _ = blobs(d=8)
        batch = (xr[:32], 2 * xr[:32, 0] + 5)
    with pytest.warns(lr.RecipeWarning, match=r"\[overfit-batch-failed\]"):
        check = run(model, batch)
    assert codes(check) == ["overfit-batch-failed"]
    f = check.findings[0]
    assert f.severity is lr.Severity.ERROR
    assert all(t["outcome"] in ("stuck", "diverged") for t in f.evidence["trials"])
    assert f.evidence["relative_gap"] > 0.3
    assert f"{f.evidence['best_loss']:.4g}" in f.message
    if bug in ("softmax", "sigmoid"):  # right answers, loss stuck at ln(1 + 3/e) for 4 classes
        assert f.evidence["accuracy"] == 1.0
        assert f.evidence["best_loss"] == pytest.approx(math.log(1 + 3 / math.e), abs=0.01)
        assert ("softmax-before-loss" if bug == "softmax" else "squashed") in f.message


def test_softmax_failure_is_info_when_another_check_reports_softmax_before_loss(tmp_path):
    check = OverfitBatchCheck()
    train, val = loaders(*blobs())
    t = trainer(tmp_path, [lr.LossAtInitCheck(), check], logger=None, max_steps=1)
    t.fit(SoftmaxOut(mlp()), train, val)
    assert codes(check) == ["overfit-batch-failed"] and check.findings[0].severity is lr.Severity.INFO
    assert [f.code for f in lr.findings(t) if f.severity is lr.Severity.ERROR] == ["softmax-before-loss"]


def test_on_error_raise_stops_with_the_finding():
    x, y = blobs()
    with pytest.raises(lr.RecipeError, match=r"\[overfit-batch-failed\]"):
        run(SoftmaxOut(mlp()), (x[:32], y[:32]), on_error="raise")


def test_loss_without_gradient_is_an_error():
    class NoGrad(Classifier):
        def forward(self, x):
            with torch.no_grad():
                return self.net(x)

    x, y = blobs()
    with pytest.warns(lr.RecipeWarning, match="does not depend"):
        check = run(NoGrad(mlp()), (x[:32], y[:32]))
    assert codes(check, "error") == ["overfit-batch-failed"]
    assert "does not depend on any trainable parameter" in check.findings[0].message


def test_custom_loss_is_judged_with_its_own_floor_and_reference():
    """A hand-written loss: the floor is the user's own loss of confident one-hot scores, the
    reference its loss of uniform scores, so memorising is judged as for cross-entropy."""

    class Custom(Classifier):
        def training_step(self, batch, batch_idx):
            x, y = batch
            return -(self(x).log_softmax(-1).gather(1, y[:, None])).mean()

    x, y = blobs()
    check = run(Custom(mlp()), (x[:32], y[:32]))
    assert codes(check) == [] and check.figures["outcomes"][0].endswith("memorised")
    assert check.figures["reference_kind"] == "chance loss" and check.figures["floor"] < 1e-6


def test_a_step_that_fails_on_the_copy_is_a_skip():
    class Fails(Classifier):
        def training_step(self, batch, batch_idx):
            raise RuntimeError("boom")

    x, y = blobs()
    check = run(Fails(mlp()), (x[:32], y[:32]))
    assert codes(check) == ["check-skipped"]
    assert "your training_step raised RuntimeError when the check ran it" in check.findings[0].message
    assert check.findings[0].message.rstrip(".").endswith("boom")


def test_the_real_model_and_rng_are_untouched():
    torch.manual_seed(0)
    model = Classifier(cnn(dropout=0.5))
    xi, yi = image_blobs()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    rng = torch.get_rng_state()
    check = run(model, (xi[:32], yi[:32]))
    assert check.figures["outcomes"] == ["lr=0.01: memorised"]
    assert torch.equal(torch.get_rng_state(), rng)
    assert [m.training for m in model.modules()] == modes
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # BatchNorm running stats too
    assert all(p.grad is None for p in model.parameters())


def test_budget_runs_out_as_info_with_the_numbers():
    x, y = blobs()
    check = run(Classifier(mlp()), (x[:32], y[:32]), max_steps=5)
    assert codes(check) == ["overfit-batch-failed"]
    f = check.findings[0]
    assert f.severity is lr.Severity.INFO and "max_steps" in f.message
    assert [t["steps"] for t in f.evidence["trials"]] == [5, 5, 5]
    check = run(Classifier(mlp()), (x[:32], y[:32]), time_limit=1e-4)
    f = check.findings[0]
    assert f.severity is lr.Severity.INFO and "time limit" in f.message
    assert f.evidence["total_steps"] == 1


def test_manual_optimisation_needs_step_fn():
    class Manual(Classifier):
        def __init__(self, net):
            super().__init__(net)
            self.automatic_optimization = False

    x, y = blobs()
    check = run(Manual(mlp()), (x[:32], y[:32]))
    assert codes(check) == ["check-skipped"] and "step_fn" in check.findings[0].message
    check = run(Manual(mlp()), (x[:32], y[:32]), step_fn=lambda m, b: F.cross_entropy(m(b[0]), b[1]))
    assert codes(check) == [] and check.figures["outcomes"] == ["lr=0.01: memorised"]


def test_sync_batchnorm_runs_locally_on_the_copy():
    model = Classifier(nn.SyncBatchNorm.convert_sync_batchnorm(cnn()))
    xi, yi = image_blobs()
    check = run(model, (xi[:32], yi[:32]))
    assert codes(check) == [] and isinstance(model.net[1], nn.SyncBatchNorm)


def test_bad_arguments_are_named():
    for kw, name in [
        ({"num_samples": 0}, "num_samples"),
        ({"lrs": ()}, "lrs"),
        ({"lrs": (1e-3, -1.0)}, "lrs"),
        ({"max_steps": 0}, "max_steps"),
        ({"time_limit": 0}, "time_limit"),
        ({"tolerance": 1.5}, "tolerance"),
        ({"patience": 0}, "patience"),
    ]:
        with pytest.raises(ValueError, match=name):
            OverfitBatchCheck(**kw)
    with pytest.raises(TypeError, match="step_fn"):
        OverfitBatchCheck(step_fn="loss")


def fit(tmp_path, callbacks, logger="csv"):
    L.seed_everything(7, verbose=False)
    x, y = image_blobs()
    model = Classifier(cnn(dropout=0.5))
    train, val = loaders(x, y)
    t = trainer(tmp_path, callbacks, logger=logger, max_steps=4)
    t.fit(model, train, val)
    return t, model


def test_in_a_fit_it_logs_the_curve_and_leaves_the_run_bit_identical(tmp_path):
    _, plain = fit(tmp_path / "plain", [])
    rng_plain = torch.get_rng_state()
    check = OverfitBatchCheck()
    _, probed = fit(tmp_path / "probed", [check])
    assert torch.equal(torch.get_rng_state(), rng_plain)
    assert codes(check) == [] and check.figures["outcomes"] == ["lr=0.01: memorised"]
    for k, v in plain.state_dict().items():
        assert torch.equal(v, probed.state_dict()[k]), k

    def metrics(run_dir):
        with open(run_dir / "run" / "version_0" / "metrics.csv") as fh:
            return list(csv.DictReader(fh))

    assert metrics(tmp_path / "plain") == metrics(tmp_path / "probed")
    fit(tmp_path / "tb", [OverfitBatchCheck()], logger="tb")
    scalars = accumulator(tmp_path / "tb" / "run" / "version_0").Scalars("recipe/overfit_batch/loss")
    assert scalars[0].step == 0 and len(scalars) == check.figures["steps"]
    assert scalars[-1].value == pytest.approx(check.figures["best_loss"], rel=1e-5)


class CudnnLikeGRU(nn.GRU):
    """Behaves like cuDNN's RNN, whose backward refuses to run in eval mode."""

    def forward(self, *args, **kwargs):
        if torch.is_grad_enabled() and not self.training:
            raise RuntimeError("cudnn RNN backward can only be called in training mode")
        return super().forward(*args, **kwargs)


def test_rnn_dropout_is_turned_off_without_eval_mode():
    # the copy's RNNs were put in eval mode to drop their inter-layer dropout, which on a GPU made
    # every RNN model fail the probe step (cuDNN) and the check a skip
    net = GRUNet()
    net.rnn = CudnnLikeGRU(16, 16, num_layers=2, dropout=0.3, batch_first=True)
    x, y = token_blobs()
    check = run(Classifier(net), (x[:32], y[:32]))
    assert codes(check) == [] and check.figures["outcomes"][-1].endswith("memorised")
    assert net.rnn.dropout == 0.3  # the real model's layer is untouched


# ---------------------------------------------------------------------------- ambiguous samples
class CharLM(L.LightningModule):
    """makemore-style next-character GRU: each word starts with BOS (0), targets shifted by one,
    padding targets ignored (-1). Position 0 sees only BOS, so its loss cannot reach 0."""

    def __init__(self, vocab: int, blind: bool = False) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, 32)
        self.rnn = nn.GRU(32, 64, batch_first=True)
        self.head = nn.Linear(64, vocab)
        self.blind = blind

    def training_step(self, batch, batch_idx):
        x, y = batch
        x = torch.zeros_like(x) if self.blind else x  # bug: the tokens never reach the model
        logits = self.head(self.rnn(self.emb(x))[0])
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1), ignore_index=-1)


def words_batch(n: int = 32, length: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    vocab = 27
    x = torch.zeros(n, length, dtype=torch.long)
    y = torch.full((n, length), -1, dtype=torch.long)
    for i in range(n):
        k = int(torch.randint(3, length, (1,), generator=g))
        w = torch.randint(1, vocab, (k,), generator=g)
        x[i, 1 : k + 1 if k + 1 <= length else length] = w[: length - 1]
        y[i, :k] = w
        if k < length:
            y[i, k] = 0  # end of word
    return vocab, (x, y)


def test_ambiguity_floor_is_the_conditional_entropy_of_the_labels():
    from lightning_recipe._probe import LossCapture
    from lightning_recipe.checks.overfit_batch import ambiguity_floor

    x = torch.tensor([[1.0, 2.0], [1.0, 2.0], [3.0, 4.0]])
    with LossCapture() as cap:
        F.cross_entropy(torch.zeros(3, 2), torch.tensor([0, 1, 1]))
    floor, kind = ambiguity_floor(cap.calls[0], x)
    assert floor == pytest.approx(2 * math.log(2) / 3)  # two equal inputs, labels 0 and 1
    assert "equal inputs" in kind
    tokens = torch.tensor([[5, 1], [5, 2]])  # same first token, different next ones
    with LossCapture() as cap:
        F.cross_entropy(torch.zeros(4, 3), torch.tensor([1, 0, 2, 0]))
    floor, kind = ambiguity_floor(cap.calls[0], tokens)
    assert floor == pytest.approx(2 * math.log(2) / 4)  # position 0 ambiguous, position 1 not
    assert "prefixes" in kind
    with LossCapture() as cap:
        F.cross_entropy(torch.zeros(3, 2), torch.tensor([0, 1, 1]))
    assert ambiguity_floor(cap.calls[0], torch.randn(3, 2))[0] == 0.0


def test_a_language_model_whose_first_token_is_ambiguous_is_not_an_error():
    torch.manual_seed(0)
    vocab, batch = words_batch()
    check = run(CharLM(vocab), batch)
    assert codes(check, "error") == []
    assert check.figures["floor"] > 0.3  # BOS -> first letter of 20 random words
    assert any(o.endswith("memorised") for o in check.figures["outcomes"])


def test_a_language_model_that_never_sees_its_tokens_is_still_an_error():
    torch.manual_seed(0)
    vocab, batch = words_batch()
    with pytest.warns(lr.RecipeWarning, match=r"\[overfit-batch-failed\]"):
        check = run(CharLM(vocab, blind=True), batch)
    f = check.findings[0]
    assert f.code == "overfit-batch-failed" and f.severity is lr.Severity.ERROR
    assert f.evidence["floor"] > 0.3 and "prefixes" in f.evidence["floor_kind"]
    assert f.evidence["relative_gap"] > 0.3


def test_the_floor_also_reads_one_token_tensor_split_inside_the_step():
    from lightning_recipe._probe import LossCapture
    from lightning_recipe.checks.overfit_batch import ambiguity_floor

    seqs = torch.tensor([[1, 5, 6], [1, 7, 6]])  # x = seqs[:, :-1], y = seqs[:, 1:]
    with LossCapture() as cap:
        F.cross_entropy(torch.zeros(4, 8), seqs[:, 1:].reshape(-1))
    floor, _ = ambiguity_floor(cap.calls[0], seqs)
    assert floor == pytest.approx(2 * math.log(2) / 4)  # BOS -> 5 or 7; then unambiguous


class L1Linear(L.LightningModule):
    """A linear model with an L1 loss on targets with noise it cannot fit (8 weights, 20
    samples): healthy, fits most of the way, and stops short of the 1%."""

    def __init__(self):
        super().__init__()
        self.net = nn.Linear(8, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.l1_loss(self.net(x).squeeze(-1), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def test_a_model_stuck_most_of_the_way_down_is_an_info():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20, 8, generator=g)
    y = x @ torch.randn(8, generator=g) + 0.15 * torch.randn(20, generator=g)
    check = run(L1Linear(), (x, y))
    assert codes(check) == ["overfit-batch-failed"], check.findings
    f = check.findings[0]
    assert f.severity is lr.Severity.INFO and "most of the way" in f.message
    assert 0.01 < f.evidence["relative_gap"] <= 0.2
