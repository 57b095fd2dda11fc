"""PredictionDynamicsMonitor: flags late flipping with an LR far too high, stays quiet otherwise."""

import csv
import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

import lightning_recipe as lr
import lightning_recipe.monitors.prediction_dynamics as pd_module
from lightning_recipe._probe import LossCall
from lightning_recipe.monitors.prediction_dynamics import PredictionDynamicsMonitor, read_predictions
from models import (
    Classifier,
    GRUNet,
    ManualClassifier,
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

TAG = "recipe/prediction_dynamics"


def fit(tmp_path, model, x, y, monitor, *, logger="tb", epochs=8, seed=0, dict_keys=None, **kw):
    train, val = loaders(x, y, dict_keys=dict_keys)
    L.seed_everything(seed, verbose=False)
    t = trainer(tmp_path, [monitor], logger=logger, max_epochs=epochs, **kw)
    t.fit(model, train, val)
    return t


def codes(monitor, severity=None):
    return [f.code for f in monitor.findings if severity is None or f.severity.value == severity]


def test_sgd_learning_rate_far_too_high_is_flagged(tmp_path):
    x, y = image_blobs(n=512)
    mon = PredictionDynamicsMonitor(every_n_steps=4)
    with pytest.warns(lr.RecipeWarning, match=r"\[prediction-instability\]"):
        t = fit(tmp_path, Classifier(cnn(), lr=10.0, optimizer="sgd"), x, y, mon)
    assert codes(mon) == ["prediction-instability"]
    f = mon.findings[0]
    assert f.severity.value == "warning"
    assert f.step >= t.estimated_stepping_batches / 2  # late, as defined
    above = [r for r in f.evidence["flip_rates"] if r > mon.flip_threshold]
    assert len(above) >= mon.patience and f.evidence["logs_above"] == len(above)
    assert f"{f.evidence['flip_rates'][-1]:.0%}" in f.message


@pytest.mark.parametrize("kind", ["cnn", "mlp-dict", "gru", "transformer"])
def test_healthy_models_are_silent_although_they_flip_early(tmp_path, kind):
    if kind == "cnn":
        (x, y), model = image_blobs(n=512), Classifier(cnn(), lr=0.1, optimizer="sgd")
    elif kind == "mlp-dict":
        (x, y), model = blobs(n=512), Classifier(mlp(), x_key="features", y_key="label")
    elif kind == "gru":
        (x, y), model = token_blobs(n=512), Classifier(GRUNet())
    else:
        (x, y), model = token_blobs(n=512), Classifier(TinyTransformer(), lr=3e-3)
    mon = PredictionDynamicsMonitor(every_n_steps=4)
    keys = ("features", "label") if kind == "mlp-dict" else None
    fit(tmp_path, model, x, y, mon, logger=None, dict_keys=keys)
    assert codes(mon) == []
    rates = [r for _, r in mon._flips]
    assert max(rates[:3]) > mon.flip_threshold  # early flipping is normal and must not count
    assert mon.figures["max_late_flip_level"] <= 0.1
    assert mon.figures["accuracy"] >= 0.9


def test_tensorboard_holds_the_image_and_the_real_accuracy(tmp_path):
    x, y = blobs(n=256)
    model = Classifier(mlp())
    mon = PredictionDynamicsMonitor(every_n_steps=2, num_examples=16)
    t = fit(tmp_path, model, x, y, mon, epochs=2)
    assert mon._batch[0].shape == (16, 16)  # only the followed examples are kept
    acc = accumulator(t.logger.log_dir)
    tags = acc.Tags()
    assert TAG in tags["images"]
    image = acc.Images(TAG)[-1]
    assert image.height >= 16 and image.width > image.height / 4
    for name in ("flips", "accuracy", "true_class_prob"):
        assert f"{TAG}/{name}" in tags["scalars"], name
    steps = [e.step for e in acc.Scalars(f"{TAG}/accuracy")]
    assert steps[0] == 0 and steps == sorted(steps) and len(steps) == len(mon._steps)
    # the logged accuracy / probability are those of the final model on the first 16 val examples
    model.eval()
    with torch.no_grad():
        probs = model(x[:16]).softmax(-1)
    expected_acc = float((probs.argmax(-1) == y[:16]).float().mean())
    expected_p = float(probs.gather(1, y[:16, None]).mean())
    assert acc.Scalars(f"{TAG}/accuracy")[-1].value == pytest.approx(expected_acc, abs=1e-6)
    assert acc.Scalars(f"{TAG}/true_class_prob")[-1].value == pytest.approx(expected_p, abs=1e-5)
    flips = [e.value for e in acc.Scalars(f"{TAG}/flips")]
    assert any(v > 0 for v in flips) and all(v == int(v) and 0 <= v <= 16 for v in flips)


def test_it_works_only_on_logging_steps(tmp_path, monkeypatch):
    calls = []
    original = pd_module.copy_module
    monkeypatch.setattr(pd_module, "copy_module", lambda *a, **k: calls.append(1) or original(*a, **k))
    x, y = blobs(n=256)  # 6 steps per epoch
    mon = PredictionDynamicsMonitor(every_n_steps=5)
    fit(tmp_path, Classifier(mlp()), x, y, mon, logger=None, epochs=3)
    assert list(mon._steps) == [0, 5, 10, 15]
    assert len(calls) == 4


class CountingDataset(Dataset):
    def __init__(self, x, y):
        self.x, self.y, self.reads = x, y, 0

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        self.reads += 1
        return self.x[i], self.y[i]


def fit_for_identity(tmp_path, callbacks):
    L.seed_everything(123, verbose=False)
    x, y = image_blobs(n=256)
    train_set, val_set = CountingDataset(x[64:], y[64:]), CountingDataset(x[:64], y[:64])
    model = Classifier(cnn())
    t = trainer(tmp_path, callbacks, logger="csv", max_epochs=2)
    t.fit(model, DataLoader(train_set, batch_size=32, shuffle=True), DataLoader(val_set, batch_size=32))
    with open(tmp_path / "run" / "version_0" / "metrics.csv") as fh:
        rows = [{k: v for k, v in r.items() if not k.startswith("recipe/")} for r in csv.DictReader(fh)]
    rows = [r for r in rows if any(v for k, v in r.items() if k not in ("epoch", "step"))]
    reads = (train_set.reads, val_set.reads)
    return model.state_dict(), rows, torch.get_rng_state(), reads


def test_the_run_is_bit_identical_and_no_dataloader_is_iterated(tmp_path):
    w0, m0, r0, reads0 = fit_for_identity(tmp_path / "plain", [])
    mon = PredictionDynamicsMonitor(every_n_steps=1)
    w1, m1, r1, reads1 = fit_for_identity(tmp_path / "monitor", [mon])
    assert len(mon._steps) > 5  # it really evaluated, with dropout and BatchNorm in the model
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k
    assert m0 == m1
    assert torch.equal(r0, r1)
    assert reads0 == reads1


def test_resume_continues_the_history(tmp_path):
    x, y = blobs(n=256)  # 6 steps per epoch
    train, val = loaders(x, y)
    L.seed_everything(0, verbose=False)
    first = PredictionDynamicsMonitor(every_n_steps=2)
    t = trainer(tmp_path, [first], logger=None, max_steps=6, max_epochs=5)
    t.fit(Classifier(mlp()), train, val)
    ckpt = tmp_path / "a.ckpt"
    t.save_checkpoint(ckpt)
    second = PredictionDynamicsMonitor(every_n_steps=2)
    t2 = trainer(tmp_path, [second], logger=None, max_steps=18, max_epochs=5)
    t2.fit(Classifier(mlp()), train, val, ckpt_path=str(ckpt))
    assert list(first._steps) == [0, 2, 4, 6]
    # Lightning skips the sanity check on a restart: the batch is fixed again at the first
    # validation (end of the epoch at step 12), found to be the same one, and the history goes on
    assert list(second._steps) == [0, 2, 4, 6, 14, 16, 18]
    assert list(second._values)[:4] == list(first._values)
    assert [s for s, _ in second._flips] == [2, 4, 6, 14, 16, 18]
    assert second._signature == first._signature


def test_state_dict_round_trip():
    mon = PredictionDynamicsMonitor(max_history=3, window=3)
    mon._kind = "classification"
    for step in range(5):
        mon._steps.append(step)
        mon._values.append([0.1 * step, 0.5])
        mon._wrong.append([True, False])
        mon._flips.append((step, 0.5))
    mon._preds, mon._best_acc, mon._logs_since_best = [1.0, 2.0], 0.5, 2
    state = mon.state_dict()
    other = PredictionDynamicsMonitor(max_history=3, window=3)
    other.load_state_dict(state)
    assert other.state_dict() == state
    assert list(other._steps) == [2, 3, 4]


def test_no_validation_data_is_an_info_skip(tmp_path):
    x, y = blobs(n=128)
    train, _ = loaders(x, y)
    mon = PredictionDynamicsMonitor()
    L.seed_everything(0, verbose=False)
    trainer(tmp_path, [mon], logger=None, max_steps=3).fit(Classifier(mlp()), train)
    assert codes(mon) == ["check-skipped"] and "validation" in mon.findings[0].message


def test_manual_optimisation_needs_step_fn(tmp_path):
    x, y = blobs(n=128)
    mon = PredictionDynamicsMonitor(every_n_steps=1)
    fit(tmp_path / "a", ManualClassifier(mlp()), x, y, mon, logger=None, epochs=1)
    assert codes(mon) == ["check-skipped"] and "step_fn" in mon.findings[0].message
    step_fn = lambda model, batch: F.cross_entropy(model(batch[0]), batch[1])  # noqa: E731
    mon = PredictionDynamicsMonitor(every_n_steps=1, step_fn=step_fn)
    fit(tmp_path / "b", ManualClassifier(mlp()), x, y, mon, logger=None, epochs=1)
    assert codes(mon) == [] and len(mon._steps) > 2


class Regressor(Classifier):
    def __init__(self):
        super().__init__(mlp(d=16, classes=1), loss="mse")

    def forward(self, x):
        return self.net(x).squeeze(-1)


def test_regression_logs_the_normalised_error(tmp_path):
    x, _ = blobs(n=256)
    y = x[:, 0] * 3.0 + 1.0
    mon = PredictionDynamicsMonitor(every_n_steps=2)
    model = Regressor()
    t = fit(tmp_path, model, x, y, mon, epochs=3)
    acc = accumulator(t.logger.log_dir)
    errors = [e.value for e in acc.Scalars(f"{TAG}/error")]
    assert TAG in acc.Tags()["images"] and f"{TAG}/flips" not in acc.Tags()["scalars"]
    assert errors[-1] < 0.8 * errors[0]  # the model learns: its normalised error falls
    with torch.no_grad():
        expected = float(((model.eval()(x[:32]) - y[:32]).abs() / y[:32].std()).mean())
    assert errors[-1] == pytest.approx(expected, rel=1e-5)
    assert codes(mon) == [] and mon.figures["kind"] == "regression"


def test_read_predictions_per_example():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 3.0], [0.0, 1.0, 0.0]])
    target = torch.tensor([0, 1, -100])
    out = F.cross_entropy(logits, target)
    call = LossCall("cross_entropy", logits, target, {}, out, (logits, target))
    kind, packed = read_predictions(call, 32)
    probs = logits[:2].softmax(-1)
    assert kind == "classification" and packed.shape == (3, 2)  # the ignored row is left out
    assert torch.allclose(packed[0], probs[[0, 1], [0, 1]])
    assert packed[1].tolist() == [0.0, 1.0] and packed[2].tolist() == [0.0, 2.0]
    x = torch.tensor([2.0, -1.0])
    t = torch.tensor([1.0, 1.0])
    call = LossCall("binary_cross_entropy_with_logits", x, t, {}, x, (x, t))
    kind, packed = read_predictions(call, 32)
    assert packed[0].tolist() == pytest.approx([torch.sigmoid(x[0]).item(), torch.sigmoid(x[1]).item()])
    assert packed[1].tolist() == [0.0, 1.0]


def test_late_means_the_second_half_or_a_plateau():
    class FakeTrainer:
        estimated_stepping_batches = 100

    mon = PredictionDynamicsMonitor(patience=2, window=3)
    mon._flips.extend([(40, 0.5), (50, 0.5), (60, 0.5)])
    assert mon._late_flips(FakeTrainer()) is None  # step 40 is before half of 100
    mon._flips.append((70, 0.5))
    assert mon._late_flips(FakeTrainer()) == [0.5, 0.5, 0.5]
    FakeTrainer.estimated_stepping_batches = math.inf  # no planned length: wait for a plateau
    mon._logs_since_best = 2
    assert mon._late_flips(FakeTrainer()) is None
    mon._logs_since_best = 3
    assert mon._late_flips(FakeTrainer()) == [0.5, 0.5, 0.5]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"every_n_steps": 0}, "every_n_steps"),
        ({"num_examples": 0}, "num_examples"),
        ({"flip_threshold": 1.5}, "flip_threshold"),
        ({"flip_threshold": 0}, "flip_threshold"),
        ({"patience": 0}, "patience"),
        ({"patience": 4, "window": 3}, "window"),
        ({"late_fraction": 1.0}, "late_fraction"),
        ({"max_history": 3}, "max_history"),
        ({"num_examples": True}, "num_examples"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PredictionDynamicsMonitor(**kwargs)
    with pytest.raises(TypeError, match="step_fn"):
        PredictionDynamicsMonitor(step_fn=3)
    with pytest.raises(TypeError, match="get_input"):
        PredictionDynamicsMonitor(get_input="x")


def test_a_dict_with_unknown_keys_is_read_by_structure(tmp_path):
    x, y = blobs(n=128)
    model = Classifier(mlp(), x_key="pixels", y_key="digit")
    mon = PredictionDynamicsMonitor(every_n_steps=1)
    fit(tmp_path / "a", model, x, y, mon, logger=None, epochs=1, dict_keys=("pixels", "digit"))
    assert codes(mon) == [] and len(mon._steps) > 2
    mon = PredictionDynamicsMonitor(every_n_steps=1, get_input=lambda b: b["pixels"])
    fit(tmp_path / "b", model, x, y, mon, logger=None, epochs=1, dict_keys=("pixels", "digit"))
    assert codes(mon) == [] and len(mon._steps) > 2
