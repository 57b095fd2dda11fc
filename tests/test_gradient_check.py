"""GradientCheck: correct networks pass, wrong custom backwards are caught (cs231n's rules)."""

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lightning_recipe as lr
from lightning_recipe.checks.gradient_check import GradientCheck, relative_error
from models import (
    Classifier,
    GRUNet,
    ManualClassifier,
    TinyTransformer,
    blobs,
    cnn,
    image_blobs,
    loaders,
    mlp,
    token_blobs,
    trainer,
)


def first_batch(x, y, dict_keys=None):
    train, _ = loaders(x, y, dict_keys=dict_keys, shuffle=False)
    return next(iter(train))


def gradcheck(model, batch, **kw):
    check = GradientCheck(**kw)
    check.run_check(None, model, batch)  # trainer=None: the preflight path
    return check


def codes(check, severity=None):
    return [f.code for f in check.findings if severity is None or f.severity.value == severity]


# ---------------------------------------------------------------------------- custom backward
class SiLU(torch.autograd.Function):
    """x * sigmoid(x) with a selectable backward: "ok", "2x", "sign", "term" (forgets the
    x * sigmoid'(x) term of the product rule) or "slightly" (off by 0.1%)."""

    mode = "ok"

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * torch.sigmoid(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        s = torch.sigmoid(x)
        d = {
            "ok": s + x * s * (1 - s),
            "2x": 2 * (s + x * s * (1 - s)),
            "sign": -(s + x * s * (1 - s)),
            "term": s,
            "slightly": (s + x * s * (1 - s)) * 1.001,
        }[SiLU.mode]
        return grad * d


class CustomNet(nn.Module):
    def __init__(self, mode="ok"):
        super().__init__()
        self.mode = mode
        self.l1, self.l2, self.l3 = nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 4)

    def forward(self, x):
        SiLU.mode = self.mode
        h = torch.relu(self.l1(x))
        return self.l3(SiLU.apply(self.l2(h)))


def deep_mlp(depth=8):
    layers = [nn.Linear(16, 32), nn.ReLU()]
    for _ in range(depth - 2):
        layers += [nn.Linear(32, 32), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(32, 4))


class AlwaysDropout(nn.Module):
    """F.dropout(training=True) stays random in eval mode: only reseeding makes f a function."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(16, 32), nn.Linear(32, 4)

    def forward(self, x):
        return self.l2(F.dropout(torch.tanh(self.l1(x)), 0.5, training=True))


class StopGradient(nn.Module):
    """SimSiam-style stop-gradient: the target is the detached output of the same encoder."""

    def __init__(self):
        super().__init__()
        self.enc, self.pred, self.out = mlp(classes=8), nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x):
        z = self.enc(x)
        return self.out(self.pred(z) - z.detach())


class StraightThrough(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(16, 32), nn.Linear(32, 4)

    def forward(self, x):
        h = self.l1(x)
        return self.l2(h + (torch.round(h * 4) / 4 - h).detach())


class TeacherUnderNoGrad(nn.Module):
    def __init__(self):
        super().__init__()
        self.teacher, self.student = mlp(), mlp()

    def forward(self, x):
        with torch.no_grad():
            t = self.teacher(x)
        return self.student(x) + 0.5 * t


# ---------------------------------------------------------------------------- healthy
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("kind", ["relu", "tanh", "cnn", "deep8", "gru", "transformer", "dict", "dropout"])
def test_correct_networks_pass(seed, kind):
    torch.manual_seed(seed)
    keys = None
    if kind == "cnn":
        model, data = Classifier(cnn()), image_blobs(seed=seed)
    elif kind in ("gru", "transformer"):
        model, data = Classifier(GRUNet() if kind == "gru" else TinyTransformer()), token_blobs(seed=seed)
    else:
        net = {
            "relu": mlp(),
            "tanh": mlp(act=nn.Tanh),
            "deep8": deep_mlp(),
            "dict": mlp(),
            "dropout": AlwaysDropout(),
        }[kind]
        keys = ("features", "label") if kind == "dict" else None
        model, data = Classifier(net, x_key="features", y_key="label"), blobs(seed=seed)
    check = gradcheck(model, first_batch(*data, dict_keys=keys))
    assert codes(check) == []
    assert check.figures["max_relative_error"] < 1e-7
    assert check.figures["samples"] == 2 and check.figures["coordinates"] >= 3
    n_tensors = sum(1 for p in model.parameters()) + (kind not in ("gru", "transformer"))
    assert sum(len(v) for v in check.figures["relative_error"].values()) == n_tensors


@pytest.mark.parametrize("net", [StopGradient, StraightThrough, TeacherUnderNoGrad])
def test_stop_gradients_are_not_wrong_backwards(net):
    torch.manual_seed(0)
    check = gradcheck(Classifier(net()), first_batch(*blobs()))
    assert codes(check) == [] and check.figures["max_relative_error"] < 1e-7
    with torch.no_grad():  # the analytic pass patched no_grad for a moment: it is back
        assert not torch.is_grad_enabled()
    assert torch.ones(2, requires_grad=True).detach().grad_fn is None


def test_kinks_are_not_failures():
    """A step 1000x the default crosses ReLU kinks; those coordinates are retried and counted."""
    torch.manual_seed(0)
    check = gradcheck(Classifier(mlp()), first_batch(*blobs()), step_size=1e-2, coords_per_tensor=10)
    assert codes(check) == []
    assert check.figures["kinks"] > 0


def test_relative_error_definition():
    assert relative_error(0.0, 0.0) == 0.0
    assert relative_error(2.0, 1.0) == pytest.approx(0.5)
    assert relative_error(-1.0, 1.0) == pytest.approx(2.0)
    assert relative_error(1.0, 1.0 + 1e-9, allowance=1e-8) == 0.0


# ---------------------------------------------------------------------------- broken
@pytest.mark.parametrize("mode, low, high", [("2x", 0.49, 0.51), ("sign", 1.99, 2.01), ("term", 0.1, 3.0)])
def test_wrong_backward_is_an_error_located_between_layers(mode, low, high):
    torch.manual_seed(0)
    check = gradcheck(Classifier(CustomNet(mode)), first_batch(*blobs()))
    assert codes(check) == ["gradcheck-failed"]
    f = check.findings[0]
    assert f.severity is lr.Severity.ERROR
    worst = f.evidence["worst_relative_error"]
    assert low < max(worst.values()) < high
    assert set(worst) >= {"net.l2.weight", "net.l2.bias"} and "net.l3.weight" in f.evidence["passing"]
    assert f.evidence["faulty_backward_after"] == "net.l2.bias"
    assert f.evidence["faulty_backward_before"] == "net.l3.weight"
    assert "between 'net.l2.bias' and 'net.l3.weight'" in f.message
    assert check.figures["relative_error"]["net.l3"]["weight"] < 1e-7


def test_slightly_wrong_backward_is_suspicious():
    torch.manual_seed(0)
    check = gradcheck(Classifier(CustomNet("slightly")), first_batch(*blobs()))
    assert codes(check, "warning") == ["gradcheck-failed"]
    assert 1e-4 < check.findings[0].evidence["worst_coordinate"]["relative_error"] < 1e-2


def test_regularisation_does_not_hide_the_bug():
    class Regularised(Classifier):
        def training_step(self, batch, batch_idx):
            x, y = batch
            penalty = sum((p**2).sum() for p in self.parameters())
            return F.cross_entropy(self(x), y) + 1e3 * penalty

    torch.manual_seed(0)
    check = gradcheck(Regularised(CustomNet("2x")), first_batch(*blobs()))
    assert codes(check, "error") == ["gradcheck-failed"]
    assert check.figures["loss_fn"] == "cross_entropy"
    # on the total loss the penalty's gradient (2e3 * w) would drown the 2x error of the weights
    assert check.findings[0].evidence["worst_relative_error"]["net.l2.weight"] > 0.4


# ---------------------------------------------------------------------------- skips and budget
def test_model_that_cannot_run_in_float64_is_skipped():
    class Float32Inside(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = mlp()

        def forward(self, x):
            return self.net.float()(x.float())

    class MixedDtypes(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = mlp()

        def forward(self, x):
            return self.net(x) * torch.ones(4, dtype=torch.float32) @ torch.eye(4, dtype=torch.float32)

    batch = first_batch(*blobs())
    # .float() on the float64 copy gives float64, so this one is checked (and passes)
    check = gradcheck(Classifier(Float32Inside()), batch)
    assert codes(check) == [] and check.figures["max_relative_error"] < 1e-7
    check = gradcheck(Classifier(MixedDtypes()), batch)
    assert codes(check) == ["check-skipped"] and "float64" in check.findings[0].message


def test_irreproducible_step_is_skipped():
    class OwnGenerator(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = mlp()
            self.gen = torch.Generator().manual_seed(0)

        def forward(self, x):
            return self.net(x + 0.1 * torch.randn(x.shape, generator=self.gen, dtype=x.dtype))

    check = gradcheck(Classifier(OwnGenerator()), first_batch(*blobs()))
    assert codes(check) == ["check-skipped"] and "not reproducible" in check.findings[0].message


def test_manual_optimisation_and_unreadable_batches_are_skipped():
    x, y = blobs()
    check = gradcheck(ManualClassifier(CustomNet("2x")), first_batch(x, y))
    assert codes(check) == ["check-skipped"] and "step_fn" in check.findings[0].message
    step_fn = lambda m, b: F.cross_entropy(m(b[0]), b[1])  # noqa: E731
    check = gradcheck(ManualClassifier(CustomNet("2x")), first_batch(x, y), step_fn=step_fn)
    assert codes(check) == ["gradcheck-failed"]
    # no known key: the float tensor is the input (read by structure, no skip)
    check = gradcheck(Classifier(mlp(), x_key="pixels", y_key="digit"), {"pixels": x[:8], "digit": y[:8]})
    assert codes(check) == [] and "max_relative_error" in check.figures


def test_budget_cut_still_checks_every_tensor_along_a_projection():
    """With no time left for coordinates, the projection round (one direction through every
    tensor, two evaluations) still measures: a healthy model passes with the cut noted in the
    figures, and a wrong backward anywhere is still caught."""
    torch.manual_seed(0)
    check = gradcheck(Classifier(mlp()), first_batch(*blobs()), max_seconds=1e-9)
    assert codes(check) == []
    assert check.figures["coordinates"] == 0 and "net.0.weight" in check.figures["unchecked_tensors"]
    assert "budget ran out" in check.figures["budget"]
    assert check.figures["projection"]["relative_error"] < 1e-7
    assert check.figures["projection"]["tensors"] == 7  # the input and 6 parameter tensors
    batch = first_batch(*blobs())
    for mode, severity in (("2x", "error"), ("sign", "error"), ("slightly", "warning")):
        torch.manual_seed(0)
        check = gradcheck(Classifier(CustomNet(mode)), batch, max_seconds=1e-9)
        assert codes(check, severity) == ["gradcheck-failed"], (mode, check.findings)
        assert "every" in check.findings[0].message or "all" in check.findings[0].message


def test_in_place_op_on_an_input_statistic_checks_the_parameters():
    """A model that normalises its input in place (``std.clamp_(...)`` on a statistic of the
    batch) breaks autograd only when the check makes the input require a gradient: the check
    falls back to the parameters alone instead of failing."""

    class InPlaceScaler(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = mlp()

        def forward(self, x):
            std = x.std(dim=0, keepdim=True).sqrt()
            std.clamp_(min=1e-3)  # in place on sqrt's output, needed by its backward
            return self.net(x / std)

    check = gradcheck(Classifier(InPlaceScaler()), first_batch(*blobs()))
    assert codes(check) == [], check.findings
    assert "input" not in check.figures["relative_error"] and check.figures["max_relative_error"] < 1e-7


def test_bad_arguments_are_named():
    for kwargs, name in [
        ({"num_samples": 0}, "num_samples"),
        ({"coords_per_tensor": 0}, "coords_per_tensor"),
        ({"step_size": 0.5}, "step_size"),
        ({"warn_above": 0}, "warn_above"),
        ({"warn_above": 1e-2, "error_above": 1e-3}, "error_above"),
        ({"max_seconds": -1}, "max_seconds"),
        ({"seed": "a"}, "seed"),
    ]:
        with pytest.raises(ValueError, match=name):
            GradientCheck(**kwargs)
    with pytest.raises(TypeError, match="step_fn"):
        GradientCheck(step_fn=1)


# ---------------------------------------------------------------------------- in a fit
def fit(tmp_path, net, callbacks, steps=4):
    L.seed_everything(3, verbose=False)
    model = Classifier(net, lr=1e-2)
    train, val = loaders(*image_blobs() if isinstance(net[0], nn.Conv2d) else blobs())
    trainer(tmp_path, callbacks, logger=None, max_steps=steps).fit(model, train, val)
    return model.state_dict(), torch.get_rng_state()


def test_the_run_is_bit_identical_with_the_check(tmp_path):
    L.seed_everything(0, verbose=False)
    w0, r0 = fit(tmp_path / "plain", cnn(), [])
    check = GradientCheck()
    L.seed_everything(0, verbose=False)
    w1, r1 = fit(tmp_path / "check", cnn(), [check])
    assert codes(check) == [] and check.figures["coordinates"] > 0
    assert all(torch.equal(w0[k], w1[k]) for k in w0) and torch.equal(r0, r1)
    assert all(v.dtype != torch.float64 for v in w1.values())


def test_in_a_fit_a_wrong_backward_warns_and_can_raise(tmp_path):
    torch.manual_seed(0)
    train, val = loaders(*blobs())
    check = GradientCheck()
    with pytest.warns(lr.RecipeWarning, match=r"\[gradcheck-failed\]"):
        trainer(tmp_path / "a", [check], max_steps=2).fit(Classifier(CustomNet("sign")), train, val)
    assert codes(check) == ["gradcheck-failed"] and check.findings[0].step == 0
    with pytest.raises(lr.RecipeError, match="gradcheck-failed"):
        trainer(tmp_path / "b", [GradientCheck(on_error="raise")], max_steps=2).fit(
            Classifier(CustomNet("sign")), train, val
        )


def test_tied_max_pool_on_constant_background_is_not_a_failure(tmp_path):
    """Regression: digits have constant backgrounds, so neighbouring conv outputs tie exactly
    inside max-pool windows; without jittering the check point this read 0.13 on the input."""
    import lightning as L

    from lightning_recipe.demo import DigitsCNN, DigitsDataModule

    class Reinit(DigitsCNN):
        def __init__(self):
            super().__init__()
            self.features[0] = nn.Conv2d(1, 16, 3, padding=1, bias=False)
            self.head[4] = nn.Linear(64, 10)

    for seed in (0, 1):
        L.seed_everything(seed, verbose=False)
        check = GradientCheck()
        trainer(tmp_path / str(seed), [check], max_steps=1, logger=None).fit(
            Reinit(), DigitsDataModule(seed=0)
        )
        assert [f.code for f in check.findings] == [], check.findings


def test_does_not_queue_a_cuda_seed_over_the_users():
    # torch.manual_seed queues a CUDA seed while CUDA has not started; reseeding that way inside the
    # check replaced the user's seed_everything() seed for a GPU fit after a CPU preflight
    from torch.cuda import _lazy_seed_tracker

    torch.manual_seed(123)
    before = _lazy_seed_tracker.get_calls()
    check = gradcheck(Classifier(mlp()), first_batch(*blobs()))
    assert codes(check, "error") == [] and check.figures["evaluations"] > 2
    assert _lazy_seed_tracker.get_calls() == before


class GatherStep(Classifier):
    """Gathers outputs across processes in training_step (in-batch negatives from every GPU)."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        out, y = self.all_gather(self(x), sync_grads=True), self.all_gather(y)
        self.trainer.strategy.barrier()
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def test_copies_never_call_the_trainers_collectives(tmp_path):
    # the checks run the step on copies a data-dependent number of times per rank (time budget,
    # retries, steps to memorise): a collective reached from a copy would wait forever for the
    # ranks that made fewer calls. Only the real run may communicate.
    def fit(path, checks):
        calls = []

        def counted(name, fn):
            def wrapper(*args, **kwargs):
                calls.append(name)
                return fn(*args, **kwargs)

            return wrapper

        x, y = blobs()
        train, _ = loaders(x, y)
        t = trainer(path, checks, logger=None, max_steps=2)
        for name in ("all_gather", "barrier", "reduce", "broadcast"):
            setattr(t.strategy, name, counted(name, getattr(t.strategy, name)))
        t.fit(GatherStep(mlp()), train)
        return calls

    checks = [
        lr.LossAtInitCheck(),
        lr.BatchIndependenceCheck(),
        GradientCheck(),
        lr.OverfitBatchCheck(),
        lr.ModelLintCheck(),
    ]
    plain = fit(tmp_path / "plain", [])
    assert plain.count("all_gather") == 4 and plain.count("barrier") >= 2
    assert fit(tmp_path / "checked", checks) == plain
    assert all(f.code != "internal-error" for c in checks for f in c.findings)
    assert checks[3].figures["outcomes"][-1].endswith("memorised")


def test_a_float_target_made_inside_the_step_is_checked_in_float64():
    class OneVsRest(Classifier):
        def loss_fn(self, out, y):  # a float32 target built in the step met a float64 prediction
            return F.binary_cross_entropy(torch.sigmoid(out), F.one_hot(y, 4).float())

    check = gradcheck(OneVsRest(mlp()), first_batch(*blobs()))
    assert codes(check) == []
    assert check.figures["loss_fn"] == "binary_cross_entropy"
