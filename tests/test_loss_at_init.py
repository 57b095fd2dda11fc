"""LossAtInitCheck: healthy models pass, broken inits and softmax-before-loss are caught."""

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lightning_recipe as lr
from models import (
    Classifier,
    GRUNet,
    TinyTransformer,
    blobs,
    cnn,
    image_blobs,
    loaders,
    mlp,
    token_blobs,
    trainer,
)


def fit_check(tmp_path, model, x, y, check=None, dict_keys=None, **kw):
    check = check or lr.LossAtInitCheck()
    train, val = loaders(x, y, dict_keys=dict_keys)
    L.seed_everything(0, verbose=False)
    trainer(tmp_path, [check], **{"max_steps": 2, **kw}).fit(model, train, val)
    return check


def codes(check, severity=None):
    return [f.code for f in check.findings if severity is None or f.severity.value == severity]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("kind", ["mlp", "cnn", "tanh", "dict"])
def test_healthy_default_init_is_silent(tmp_path, seed, kind):
    torch.manual_seed(seed)
    if kind == "cnn":
        x, y = image_blobs()
        model = Classifier(cnn())
    else:
        x, y = blobs(d=16, classes=4)
        model = Classifier(mlp(act=nn.Tanh if kind == "tanh" else nn.ReLU), x_key="features", y_key="label")
    check = fit_check(tmp_path, model, x, y, dict_keys=("features", "label") if kind == "dict" else None)
    assert codes(check) == []
    assert check.figures["chance"] == pytest.approx(math.log(4), rel=1e-6)
    assert abs(check.figures["relative_deviation"]) < 0.25


def test_dict_batches_are_read(tmp_path):
    x, y = blobs()
    model = Classifier(mlp(), x_key="features", y_key="label")
    check = fit_check(tmp_path, model, x, y, dict_keys=("features", "label"))
    assert codes(check) == [] and check.figures["num_classes"] == 4


def test_overconfident_init_is_reported_with_numbers(tmp_path):
    torch.manual_seed(0)
    net = mlp()
    with torch.no_grad():
        net[-1].weight.mul_(30)
    with pytest.warns(lr.RecipeWarning, match=r"\[loss-at-init\]"):
        check = fit_check(tmp_path, Classifier(net), *blobs())
    f = check.findings[0]
    assert f.code == "loss-at-init" and f.severity is lr.Severity.WARNING
    assert f.evidence["expected"] == pytest.approx(math.log(4))
    assert f.evidence["loss"] > 1.25 * math.log(4)
    assert f"{f.evidence['loss']:.4g}" in f.message and "1.386" in f.message


class SoftmaxModel(Classifier):
    def forward(self, x):
        return self.net(x).softmax(-1)


def test_softmax_before_cross_entropy_is_an_error(tmp_path):
    check = fit_check(tmp_path, SoftmaxModel(mlp()), *blobs())
    assert codes(check) == ["softmax-before-loss"]
    f = check.findings[0]
    assert f.severity is lr.Severity.ERROR
    assert f.evidence["row_sum_min"] == pytest.approx(1.0, abs=1e-4)


class NLLModel(Classifier):
    def __init__(self, net, apply):
        super().__init__(net)
        self.apply_fn = apply

    def loss_fn(self, out, y):
        return F.nll_loss(self.apply_fn(out), y)


def test_nll_loss_healthy_with_log_softmax(tmp_path):
    check = fit_check(tmp_path, NLLModel(mlp(), lambda o: o.log_softmax(-1)), *blobs())
    assert codes(check) == [] and check.figures["chance"] == pytest.approx(math.log(4), rel=1e-5)


def test_nll_loss_on_probabilities_and_on_raw_logits(tmp_path):
    check = fit_check(tmp_path / "a", NLLModel(mlp(), lambda o: o.softmax(-1)), *blobs())
    assert "softmax-before-loss" in codes(check)
    check = fit_check(tmp_path / "b", NLLModel(mlp(), lambda o: o), *blobs())
    assert codes(check, "warning") == ["loss-at-init"] and "log_softmax" in check.findings[0].message


class Regressor(Classifier):
    def __init__(self, net, squeeze=True):
        super().__init__(net, loss="mse")
        self.squeeze = squeeze

    def forward(self, x):
        out = self.net(x)
        return out.squeeze(-1) if self.squeeze else out


def regression_data(offset=50.0):
    x, _ = blobs(d=8)
    y = x[:, 0] * 2.0 + offset
    return x, y


def test_regression_reports_mean_predictor_as_info(tmp_path):
    check = fit_check(tmp_path, Regressor(mlp(d=8, classes=1)), *regression_data())
    assert codes(check) == ["loss-at-init"]
    f = check.findings[0]
    assert f.severity is lr.Severity.INFO
    assert f.evidence["target_mean"] == pytest.approx(50.0, abs=1.0)
    assert f.evidence["ratio"] > 100 and "bias" in f.message


def test_regression_broadcast_bug_is_caught(tmp_path):
    with pytest.warns(UserWarning):  # torch's own easy-to-miss warning
        check = fit_check(tmp_path, Regressor(mlp(d=8, classes=1), squeeze=False), *regression_data(0.0))
    assert "loss-broadcast" in codes(check, "warning")
    f = next(f for f in check.findings if f.code == "loss-broadcast")
    assert f.evidence["result"] == [32, 32]


def test_binary_with_logits_and_sigmoid_before_loss(tmp_path):
    class Binary(Classifier):
        def __init__(self, sigmoid):
            super().__init__(mlp(classes=1))
            self.sigmoid = sigmoid

        def loss_fn(self, out, y):
            out = out.squeeze(-1)
            return F.binary_cross_entropy_with_logits(out.sigmoid() if self.sigmoid else out, (y > 1).float())

    check = fit_check(tmp_path / "ok", Binary(False), *blobs())
    assert codes(check) == [] and check.figures["chance"] == pytest.approx(math.log(2), rel=1e-5)
    check = fit_check(tmp_path / "bad", Binary(True), *blobs())
    assert "softmax-before-loss" in codes(check)


def test_custom_loss_is_judged_against_its_own_chance_loss(tmp_path):
    """A hand-written loss (no torch.nn.functional loss): the step is the loss call, and the
    reference is the user's own loss of uniform class scores (ln C), with the message saying so."""

    class Custom(Classifier):
        def loss_fn(self, out, y):
            return -(out.log_softmax(-1).gather(1, y[:, None])).mean()

    x, y = blobs()
    check = fit_check(tmp_path, Custom(mlp()), x, y)
    assert codes(check) == ["loss-at-init"] and check.findings[0].severity is lr.Severity.INFO
    assert check.figures["reference_kind"] == "chance loss"
    assert check.figures["reference"] == pytest.approx(math.log(int(y.max()) + 1), rel=1e-5)
    assert "uniform prediction" in check.findings[0].message


def test_manual_optimisation_needs_step_fn(tmp_path):
    class Manual(Classifier):
        def __init__(self, net):
            super().__init__(net)
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            opt = self.optimizers()
            opt.zero_grad()
            x, y = batch
            loss = F.cross_entropy(self(x), y)
            self.manual_backward(loss)
            opt.step()

    check = fit_check(tmp_path / "a", Manual(mlp()), *blobs())
    assert codes(check) == ["check-skipped"] and "step_fn" in check.findings[0].message
    step_fn = lambda m, b: F.cross_entropy(m(b[0]), b[1])  # noqa: E731
    check = fit_check(tmp_path / "b", Manual(mlp()), *blobs(), check=lr.LossAtInitCheck(step_fn=step_fn))
    assert codes(check) == [] and check.figures["num_classes"] == 4


def test_several_batches_use_the_untouched_copy(tmp_path):
    torch.manual_seed(0)
    check = fit_check(
        tmp_path, Classifier(mlp(), lr=1.0), *blobs(), check=lr.LossAtInitCheck(num_batches=3), max_steps=4
    )
    assert check.figures["batches"] == 3 and codes(check) == []


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="tolerance"):
        lr.LossAtInitCheck(tolerance=0)
    with pytest.raises(ValueError, match="num_batches"):
        lr.LossAtInitCheck(num_batches=0)
    with pytest.raises(TypeError, match="step_fn"):
        lr.LossAtInitCheck(step_fn="loss")


def test_logs_of_the_probed_step_do_not_leak(tmp_path):
    x, y = blobs()
    train, _ = loaders(x, y, shuffle=False)
    seen = []

    class Spy(Classifier):
        def training_step(self, batch, batch_idx):
            seen.append(batch_idx)
            return super().training_step(batch, batch_idx)

    t = trainer(tmp_path, [lr.LossAtInitCheck()], logger="csv", max_steps=1)
    t.fit(Spy(mlp()), train)
    assert len(seen) == 2  # the real step and the probed one
    rows = (tmp_path / "run" / "version_0" / "metrics.csv").read_text().strip().splitlines()
    assert len([r for r in rows[1:] if r.split(",")[rows[0].split(",").index("train_loss_step")]]) == 1


def check_once(model, batch, **kw):
    check = lr.LossAtInitCheck(**kw)
    check.check(None, model, batch)
    return check


def test_bfloat16_models_are_judged_with_bfloat16_rounding():
    # bf16 keeps 8 bits of mantissa: healthy log-probabilities of 100 classes (about -4.6) logsumexp
    # to 0 +- 0.016 after rounding, and softmax rows sum to 1 +- 0.004; fixed float32 limits (1e-2 and
    # 1e-3) called a healthy bf16 log_softmax + nll_loss broken and missed a bf16 softmax
    torch.manual_seed(0)
    x, y = blobs(n=256, classes=100)
    batch = (x.bfloat16(), y)
    healthy = check_once(NLLModel(mlp(classes=100), lambda o: o.log_softmax(-1)).bfloat16(), batch)
    assert codes(healthy, "warning") == []
    raw = check_once(NLLModel(mlp(classes=100), lambda o: o).bfloat16(), batch)
    assert codes(raw, "warning") == ["loss-at-init"]
    x, y = blobs(n=256, classes=4)
    soft = check_once(SoftmaxModel(mlp()).bfloat16(), (x.bfloat16(), y))
    assert codes(soft) == ["softmax-before-loss"]


@pytest.mark.parametrize(
    ("net", "seed", "n"), [(GRUNet, 0, 1), (GRUNet, 2, 1), (GRUNet, 0, 2), (TinyTransformer, 7, 3)]
)
def test_a_few_samples_above_chance_by_label_luck_are_not_a_warning(net, seed, n):
    # one to three samples: a healthy default init whose loss is 1.3-1.4x chance only because of which
    # labels those samples hold; averaged over every possible label its predictions are near uniform
    x, y = token_blobs()
    torch.manual_seed(seed)
    check = check_once(Classifier(net()), (x[seed * 3 : seed * 3 + n], y[seed * 3 : seed * 3 + n]))
    assert check.figures["loss"] > 1.25 * check.figures["chance"]  # the case this is about
    assert codes(check, "warning") == []
    f = check.findings[0]
    assert f.code == "loss-at-init" and f.severity is lr.Severity.INFO
    assert f.evidence["label_free_ratio"] < 1.25 and f"{f.evidence['loss']:.4g}" in f.message


def test_model_copies_never_synchronise_batchnorm():
    # the checks run the step on a copy in training mode on every rank; a SyncBatchNorm there
    # all-gathers batch statistics, so a copy that fails on one rank only (out of memory, say)
    # would leave the other ranks waiting forever. Every copy normalises with its own batch.
    from lightning_recipe._probe import copy_module

    model = Classifier(nn.SyncBatchNorm.convert_sync_batchnorm(cnn()))
    clone = copy_module(model)
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in clone.modules())
    assert isinstance(model.net[1], nn.SyncBatchNorm)
    x, y = image_blobs()
    assert codes(check_once(model, (x[:32], y[:32]))) == []


@pytest.mark.parametrize("seed", [0, 5])
def test_kaiming_scale_final_layer_is_info_not_warning(seed):
    # Kaiming/He-normal weights everywhere (cs231n's init for ReLU nets, and some libraries' default
    # for the output layer too): 1.66-1.67x chance on these labels, 1.32-1.42x label-free. Mildly
    # confident, trains fine: an info that names the figures, not a warning (below 2 * tolerance)
    x, y = blobs(d=16, classes=4)
    torch.manual_seed(seed)
    net = mlp()
    for m in net.modules():
        if isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight)
    check = check_once(Classifier(net), (x[:32], y[:32]))
    assert check.figures["loss"] > 1.25 * check.figures["chance"]
    assert 1.25 < check.figures["label_free_ratio"] <= 1.5
    assert codes(check, "warning") == []
    (f,) = check.findings
    assert f.code == "loss-at-init" and f.severity is lr.Severity.INFO
    assert f"{f.evidence['label_free_ratio']:.2f}x" in f.message and "Kaiming" in f.message


def test_final_layer_scaled_up_is_still_a_warning_on_sequence_models():
    # a final layer 10x PyTorch's default: label-free 1.57-3.33x on the transformer, 1.36-2.21x on the
    # GRU (30 seeds, 32 samples); these seeds are above 1.5x label-free and warn
    x, y = token_blobs()
    for net_cls in (GRUNet, TinyTransformer):
        torch.manual_seed(0)
        net = net_cls()
        with torch.no_grad():
            net.out.weight.mul_(10)
        check = check_once(Classifier(net), (x[:32], y[:32]))
        assert check.figures["label_free_ratio"] > 1.5, net_cls.__name__
        assert codes(check, "warning") == ["loss-at-init"], net_cls.__name__
