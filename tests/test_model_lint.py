"""ModelLintCheck: each common mistake is caught on a minimal broken model; healthy models stay quiet."""

import csv

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lightning_recipe as lr
from lightning_recipe.checks.model_lint import ModelLintCheck
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

pytestmark = pytest.mark.filterwarnings("ignore::lightning_recipe.RecipeWarning")


def fit(tmp_path, model, data=None, dict_keys=None, extra=(), check=None, **kw):
    check = check or ModelLintCheck()
    x, y = data if data is not None else blobs()
    train, val = loaders(x, y, dict_keys=dict_keys)
    L.seed_everything(0, verbose=False)
    trainer(tmp_path, [check, *extra], logger=None, **{"max_steps": 12, **kw}).fit(model, train, val)
    return check


def codes(check, severity=None):
    return sorted(f.code for f in check.findings if severity is None or f.severity.value == severity)


def finding(check, code, kind=None):
    return next(
        f for f in check.findings if f.code == code and (kind is None or f.evidence.get("kind") == kind)
    )


# ---------------------------------------------------------------------------- healthy models
class FrozenBackbone(Classifier):
    """Fine-tuning: a frozen backbone kept in eval mode (BatchNorm statistics and dropout off)."""

    def __init__(self):
        backbone = nn.Sequential(nn.Linear(16, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Dropout(0.2))
        super().__init__(nn.Sequential(backbone, nn.Linear(64, 4)))
        backbone.requires_grad_(False)
        backbone.eval()

    def configure_optimizers(self):
        return torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=1e-2)


class FrozenBNStats(Classifier):
    """mmdetection's norm_eval: BatchNorm layers put in eval on their own, affine still trained."""

    def on_train_batch_start(self, batch, batch_idx):
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()


class SometimesAux(Classifier):
    """An auxiliary head used every third step only: no gradient on most steps is healthy."""

    def __init__(self):
        super().__init__(mlp())
        self.aux = nn.Linear(16, 4)

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        if batch_idx % 3 == 0:
            loss = loss + F.cross_entropy(self.aux(batch[0]), batch[1])
        return loss


class FunctionalDropout(Classifier):
    def forward(self, x):
        return self.net[-1](F.dropout(self.net[:-1](x), 0.3, training=self.training))


class Manual(Classifier):
    def __init__(self, zero_grad=True, accumulate=1):
        super().__init__(mlp())
        self.automatic_optimization = False
        self.zero_grad_after_step, self.accumulate = zero_grad, accumulate

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        x, y = batch
        self.manual_backward(F.cross_entropy(self(x), y) / self.accumulate)
        if (batch_idx + 1) % self.accumulate == 0:
            opt.step()
            if self.zero_grad_after_step:
                opt.zero_grad()


class GAN(L.LightningModule):
    """Two optimizers in manual optimisation: the generator's loss also fills the
    discriminator's gradients, which are cleared before the discriminator's own backward."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        self.gen = nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Linear(32, 16))
        self.disc = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 1))

    def training_step(self, batch, batch_idx):
        g_opt, d_opt = self.optimizers()
        real = batch[0]
        fake = self.gen(torch.randn(real.shape[0], 4))
        ones, zeros = torch.ones(real.shape[0], 1), torch.zeros(real.shape[0], 1)
        g_opt.zero_grad()
        self.manual_backward(F.binary_cross_entropy_with_logits(self.disc(fake), ones))
        g_opt.step()
        d_opt.zero_grad()
        d_loss = F.binary_cross_entropy_with_logits(self.disc(real), ones)
        d_loss = d_loss + F.binary_cross_entropy_with_logits(self.disc(fake.detach()), zeros)
        self.manual_backward(d_loss)
        d_opt.step()

    def validation_step(self, batch, batch_idx):
        self.log("d_real", self.disc(batch[0]).mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.gen.parameters(), 1e-3), torch.optim.Adam(self.disc.parameters(), 1e-3)


def healthy(kind):
    torch.manual_seed(0)
    if kind == "cnn":
        return Classifier(cnn(dropout=0.3)), image_blobs(), {}
    if kind == "bn-stats-frozen":
        return FrozenBNStats(cnn(dropout=0.3)), image_blobs(), {}
    if kind in ("gru", "transformer"):
        return Classifier(GRUNet() if kind == "gru" else TinyTransformer()), token_blobs(), {}
    if kind == "dict":
        return (
            Classifier(mlp(), x_key="features", y_key="label"),
            blobs(),
            {"dict_keys": ("features", "label")},
        )
    if kind == "frozen-backbone":
        return FrozenBackbone(), blobs(), {}
    if kind == "sometimes-aux":
        return SometimesAux(), blobs(), {}
    if kind == "functional-dropout":
        return FunctionalDropout(mlp()), blobs(), {}
    if kind == "manual":
        return Manual(), blobs(), {}
    if kind == "manual-accumulation":
        return Manual(accumulate=2), blobs(), {"max_epochs": 2}
    if kind == "gan":
        return GAN(), blobs(), {}
    return Classifier(mlp()), blobs(), {}


@pytest.mark.parametrize(
    "kind",
    [
        "mlp",
        "cnn",
        "gru",
        "transformer",
        "dict",
        "frozen-backbone",
        "bn-stats-frozen",
        "sometimes-aux",
        "functional-dropout",
        "manual",
        "manual-accumulation",
        "gan",
    ],
)
def test_healthy_models_are_silent(tmp_path, kind):
    model, data, kw = healthy(kind)
    check = fit(tmp_path, model, data, **kw)
    assert check.findings == []
    assert check.figures["grad_steps_watched"] >= 4
    assert check.figures["params_in_no_optimizer"] == 0
    if kind == "gan":  # no forward, no loss in validation_step: nothing to rerun, only notes
        assert len(check.figures["notes"]) == 2
        return
    assert check.figures["validation_rerun_difference"] == 0.0
    if not kind.startswith("manual"):
        assert check.figures["output_layer"] in ("net.4", "net.9", "net.out", "net.1")


# ---------------------------------------------------------------------------- broken models
class HeadOnlyOptimizer(Classifier):
    def configure_optimizers(self):
        return torch.optim.Adam(self.net[-1].parameters(), lr=1e-2)


class Detached(Classifier):
    def forward(self, x):
        return self.net[-1](self.net[:-1](x).detach())


class ZeroGated(Classifier):
    def __init__(self):
        super().__init__(mlp())
        self.side = nn.Linear(16, 4)

    def forward(self, x):
        return self.net(x) + 0.0 * self.side(x)


def test_params_in_no_optimizer(tmp_path):
    with pytest.warns(lr.RecipeWarning, match=r"\[params-not-updating\]"):
        check = fit(tmp_path, HeadOnlyOptimizer(mlp()))
    assert codes(check) == ["params-not-updating"]
    f = finding(check, "params-not-updating", "not-in-optimizer")
    assert f.severity is lr.Severity.WARNING and f.step == 0
    assert f.evidence["names"] == ["net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"]
    assert f.evidence["values"] == 16 * 32 + 32 + 32 * 32 + 32 and "1,600 values" in f.message


def test_params_without_gradient(tmp_path):
    check = fit(tmp_path / "detach", Detached(mlp()))
    f = finding(check, "params-not-updating", "no-gradient")
    assert f.evidence["count"] == 4 and f.evidence["always_none"] == 4 and f.evidence["steps"] == 6
    assert "net.0.weight" in f.message
    check = fit(tmp_path / "gated", ZeroGated())
    f = finding(check, "params-not-updating", "no-gradient")
    assert f.evidence["names"] == ["side.weight", "side.bias"] and f.evidence["always_none"] == 0
    assert "all zeros" in f.message


class SpareBranch(Classifier):
    """A submodule that never runs a forward (an optional encoder switched off, as in a library
    model): an info, not a warning; a module that runs but gets no gradient stays a warning."""

    def __init__(self, detach=False):
        super().__init__(mlp())
        self.spare = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 1))
        self.detach_body = detach

    def forward(self, x):
        if self.detach_body:
            return self.net[-1](self.net[:-1](x).detach())
        return self.net(x)


def test_params_of_modules_that_never_ran_are_an_info(tmp_path):
    check = fit(tmp_path / "spare", SpareBranch())
    assert [f.severity for f in check.findings if f.code == "params-not-updating"] == [lr.Severity.INFO]
    f = finding(check, "params-not-updating", "never-ran")
    assert f.evidence["names"] == ["spare.0.weight", "spare.0.bias", "spare.2.weight", "spare.2.bias"]
    assert "never ran a forward" in f.message
    # the broken case next to it still warns: the body runs, its gradient is cut by detach()
    check = fit(tmp_path / "detach", SpareBranch(detach=True))
    f = finding(check, "params-not-updating", "no-gradient")
    assert f.severity is lr.Severity.WARNING and f.evidence["names"][0] == "net.0.weight"
    assert "spare.0.weight" not in f.evidence["names"]


class TrainInValidation(Classifier):
    def validation_step(self, batch, batch_idx):
        self.train()
        return super().validation_step(batch, batch_idx)


class AlwaysDropout(Classifier):
    def forward(self, x):
        return self.net[-1](F.dropout(self.net[:-1](x), 0.3, training=True))


class EvalInTraining(Classifier):
    def training_step(self, batch, batch_idx):
        self.eval()
        return super().training_step(batch, batch_idx)


def test_train_mode_during_validation(tmp_path):
    check = fit(tmp_path, TrainInValidation(cnn(dropout=0.3)), image_blobs())
    assert codes(check) == ["train-eval-mode", "train-eval-mode"]
    modes = finding(check, "train-eval-mode", "train-in-validation")
    assert modes.evidence["modules"] == ["net.1", "net.4", "net.8"]
    rerun = finding(check, "train-eval-mode", "random-validation")
    assert rerun.severity is lr.Severity.WARNING and rerun.evidence["relative_difference"] > 0.01


def test_functional_dropout_forced_on_is_seen_by_rerunning_validation(tmp_path):
    check = fit(tmp_path, AlwaysDropout(mlp()))
    assert codes(check) == ["train-eval-mode"]
    f = check.findings[0]
    assert f.evidence["kind"] == "random-validation" and f.evidence["dropout_calls"] == 2
    assert f"{f.evidence['relative_difference']:.3g}" in f.message and "training=self.training" in f.message


def test_sampling_model_is_info_only(tmp_path):
    class Sampler(Classifier):
        def forward(self, x):
            h = self.net(x)
            return h + 0.1 * torch.randn_like(h)

    check = fit(tmp_path, Sampler(mlp()))
    assert codes(check) == ["train-eval-mode"] and codes(check, "info") == ["train-eval-mode"]


def test_eval_mode_during_training(tmp_path):
    check = fit(tmp_path, EvalInTraining(cnn(dropout=0.3)), image_blobs())
    assert codes(check) == ["train-eval-mode"]
    f = check.findings[0]
    assert f.evidence["kind"] == "eval-in-training" and f.evidence["modules"] == ["net.1", "net.4", "net.8"]


@pytest.mark.parametrize("accumulate", [1, 2])
def test_manual_loop_without_zero_grad(tmp_path, accumulate):
    check = fit(tmp_path, Manual(zero_grad=False, accumulate=accumulate), max_epochs=2)
    assert codes(check) == ["grad-not-zeroed"]
    f = check.findings[0]
    assert f.evidence["count"] == 6 and "net.0.weight" in f.message


def test_automatic_optimisation_with_a_no_op_zero_grad(tmp_path):
    class NoZeroGrad(Classifier):
        def optimizer_zero_grad(self, epoch, batch_idx, optimizer):
            pass

    assert codes(fit(tmp_path / "bad", NoZeroGrad(mlp()))) == ["grad-not-zeroed"]
    check = fit(tmp_path / "acc", Classifier(mlp()), accumulate_grad_batches=3, max_epochs=3)
    assert check.findings == [] and check.figures["grad_steps_watched"] >= 4


def test_bias_before_batchnorm_and_output_without_bias(tmp_path):
    net = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(32, 16),  # Linear -> ReLU -> BatchNorm: not directly, no finding
        nn.ReLU(),
        nn.BatchNorm1d(16),
        nn.Linear(16, 4, bias=False),
    )
    check = fit(tmp_path, Classifier(net), image_blobs())
    assert codes(check) == ["bias-before-norm", "output-no-bias"]
    assert codes(check, "info") == codes(check)
    assert finding(check, "bias-before-norm").evidence == {"layer": "net.0", "norm": "net.1"}
    assert finding(check, "output-no-bias").evidence["layer"] == "net.8"


class SoftmaxOut(Classifier):
    def forward(self, x):
        return self.net(x).softmax(-1)


def test_softmax_before_loss_only_without_loss_at_init(tmp_path):
    check = fit(tmp_path / "alone", SoftmaxOut(mlp()))
    assert codes(check) == ["softmax-before-loss"] and check.findings[0].severity is lr.Severity.ERROR
    check = fit(tmp_path / "both", SoftmaxOut(mlp()), extra=[lr.LossAtInitCheck()])
    assert check.findings == []


def test_resumed_run_neither_repeats_nor_loses_findings(tmp_path):
    first = fit(tmp_path / "a", HeadOnlyOptimizer(mlp()))
    resumed = ModelLintCheck()
    resumed.load_state_dict(first.state_dict())
    fit(tmp_path / "b", HeadOnlyOptimizer(mlp()), check=resumed)
    assert codes(resumed) == ["params-not-updating"]


def test_static_check_without_trainer():
    torch.manual_seed(0)
    x, y = blobs()
    check = ModelLintCheck()
    check.static_check(None, HeadOnlyOptimizer(mlp()), (x[:32], y[:32]))
    assert codes(check) == ["params-not-updating"]
    model = AlwaysDropout(cnn(dropout=0.3))
    model.eval()  # left in eval: preflight judges the model as fit would train it
    xi, yi = image_blobs()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    check = ModelLintCheck()
    check.static_check(None, model, (xi[:32], yi[:32]))
    assert codes(check) == ["train-eval-mode", "train-eval-mode"]
    assert finding(check, "train-eval-mode", "eval-in-training").evidence["modules"] == [
        "net.1",
        "net.4",
        "net.8",
    ]
    assert finding(check, "train-eval-mode", "random-validation").evidence["dropout_calls"] == 2
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not any(m.training for m in model.modules())


def test_configure_optimizers_that_needs_a_trainer_is_noted():
    class NeedsTrainer(Classifier):
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1 / self.trainer.max_steps)

    x, y = blobs()
    check = ModelLintCheck()
    check.static_check(None, NeedsTrainer(mlp()), (x[:32], y[:32]))
    assert check.findings == [] and "configure_optimizers" in check.figures["notes"][0]


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="steps"):
        ModelLintCheck(steps=1)
    with pytest.raises(TypeError, match="step_fn"):
        ModelLintCheck(step_fn=3)
    with pytest.raises(TypeError, match="get_input"):
        ModelLintCheck(get_input="x")


def test_the_run_is_bit_identical(tmp_path):
    def run(path, callbacks):
        L.seed_everything(3, verbose=False)
        model = Classifier(cnn(dropout=0.5))
        train, val = loaders(*image_blobs())
        trainer(path, callbacks, logger="csv", max_epochs=2, val_check_interval=3).fit(model, train, val)
        with open(path / "run" / "version_0" / "metrics.csv") as fh:
            return model.state_dict(), list(csv.DictReader(fh)), torch.get_rng_state()

    w0, m0, r0 = run(tmp_path / "plain", [])
    check = ModelLintCheck()
    w1, m1, r1 = run(tmp_path / "lint", [check])
    assert check.findings == [] and check.figures["grad_steps_watched"] == 10
    assert all(torch.equal(w0[k], w1[k]) for k in w0) and m0 == m1 and torch.equal(r0, r1)


class AuxHead(Classifier):
    """A second head whose loss is added to the main one (deep supervision, auxiliary losses)."""

    def __init__(self):
        super().__init__(mlp())
        self.aux = nn.Linear(16, 4)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y) + 0.3 * F.cross_entropy(self.aux(x), y)


def test_without_a_trainer_an_auxiliary_loss_trains_its_head():
    # the gradient-flow probe must back-propagate what training does (the step's whole loss), not
    # only the first loss call: the auxiliary head was reported as getting no gradient
    x, y = blobs()
    check = ModelLintCheck()
    check.static_check(None, AuxHead(), (x[:32], y[:32]))
    assert codes(check, "warning") == [] and check.figures["grad_steps_watched"] == 10


def test_a_copy_made_while_the_gradient_watch_is_on_does_not_copy_the_watch():
    """Probes copy the model during the first steps, while the watch's forward pre-hooks are on
    every module: the copy must neither fail on the watch's tensors nor carry its hooks."""
    from lightning_recipe._probe import copy_module
    from lightning_recipe.checks.model_lint.grad_watch import GradWatch

    model = Classifier(mlp())
    opt = torch.optim.Adam(model.parameters())
    watch = GradWatch(model, [opt])
    out = model.net(torch.randn(4, 16))
    watch.bad = out  # a non-leaf tensor the watch might hold
    clone = copy_module(model)
    assert all(not m._forward_pre_hooks for m in clone.modules())
    watch.close()
    assert all(not m._forward_pre_hooks for m in model.modules())
