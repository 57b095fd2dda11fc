"""CheckpointEnsemble: single vs snapshot ensemble vs averaged weights, measured every validation
run, logged, handed back to the user, and without changing the user's run."""

import csv

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

import lightning_recipe as lr
from lightning_recipe.control.ensemble import CheckpointEnsemble
from lightning_recipe.demo import DigitsCNN, DigitsDataModule
from models import Classifier, accumulator, blobs, cnn, image_blobs, loaders, mlp, trainer

TAGS = [
    f"recipe/ensemble/{k}/{m}"
    for k in ("single", "snapshot_ensemble", "averaged")
    for m in ("loss", "accuracy")
]


def noisy_data(n=256):
    x, y = blobs(n=n, seed=0)
    x = x + 1.0 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    return loaders(x, y, batch_size=16, shuffle=False)


def fit_noisy(tmp_path, callbacks, epochs=8, model=None, ckpt_path=None, logger="tb", **kw):
    """A high constant SGD learning rate on noisy labels: the late epochs bounce around a plateau."""
    L.seed_everything(0, verbose=False)
    model = model or Classifier(mlp(hidden=64), lr=0.5, optimizer="sgd")
    train, val = noisy_data()
    t = trainer(tmp_path, callbacks, logger=logger, max_epochs=epochs, **kw)
    t.fit(model, train, val, ckpt_path=ckpt_path)
    return t, model, val


def validate(t, model, val):
    return t.validate(model, val, verbose=False)[0]


def test_noisy_late_phase_is_measured_logged_and_handed_back(tmp_path):
    ens = CheckpointEnsemble(num_snapshots=3)
    t, _, val = fit_noisy(tmp_path, [ens])
    assert len(ens.history) == 8  # every validation run
    last = ens.history[-1]
    assert last["members"] == 3 and last["member_epochs"] == [5, 6, 7]
    # the single model is the trainer's own validation number
    assert last["single_loss"] == pytest.approx(float(t.callback_metrics["val_loss"]), rel=1e-5)
    # measured on this bouncing plateau: both cheap ensembles beat the last weights
    assert last["snapshot_ensemble_loss"] < last["single_loss"]
    assert last["averaged_loss"] < last["single_loss"]
    # every tag holds one real value per validation run, equal to the history
    acc = accumulator(tmp_path / "run" / "version_0")
    for tag in TAGS:
        kind, metric = tag.split("/")[2:]
        values = [e.value for e in acc.Scalars(tag)]
        assert values == pytest.approx([h[f"{kind}_{metric}"] for h in ens.history], rel=1e-5), tag
    # what we hand back scores exactly what was reported
    assert validate(t, ens.averaged_model(), val)["val_loss"] == pytest.approx(
        last["averaged_loss"], rel=1e-5
    )
    assert validate(t, ens.ensemble(), val)["val_loss"] == pytest.approx(
        last["snapshot_ensemble_loss"], rel=1e-5
    )
    loaded = Classifier.load_from_checkpoint(ens.averaged_path, net=mlp(hidden=64))
    assert validate(t, loaded, val)["val_loss"] == pytest.approx(last["averaged_loss"], rel=1e-5)
    # the verdict states the measured numbers and the winner
    f = ens.findings[-1]
    assert f.code == "ensemble-evaluated" and f.severity is lr.Severity.INFO
    losses = {k: last[f"{k}_loss"] for k in ("single", "snapshot_ensemble", "averaged")}
    winner = min(losses, key=losses.get)  # measured: averaged 0.5686 vs ensemble 0.5693, single 0.590
    assert ens.figures["winner"] == winner != "single"
    phrase = {"averaged": "the averaged weights win", "snapshot_ensemble": "the snapshot ensemble wins"}
    assert phrase[winner] in f.message
    for key in ("single_loss", "snapshot_ensemble_loss", "averaged_loss"):
        assert f"{last[key]:.4g}" in f.message


def test_digits_demo_cnn_with_batchnorm(tmp_path):
    L.seed_everything(0, verbose=False)
    ens = CheckpointEnsemble(num_snapshots=2)
    t = trainer(tmp_path, [ens], max_epochs=3, log_every_n_steps=5)
    model, data = DigitsCNN(), DigitsDataModule()
    t.fit(model, data)
    assert [h["epoch"] for h in ens.history] == [0, 1, 2]
    acc = accumulator(tmp_path / "run" / "version_0")
    assert all(len(acc.Scalars(tag)) == 3 for tag in TAGS)
    last = ens.history[-1]
    assert 0.5 < last["averaged_accuracy"] <= 1 and 0.5 < last["snapshot_ensemble_accuracy"] <= 1
    # BatchNorm statistics were recomputed for the averaged weights from stashed training batches
    bn = next(m for m in ens._avg.module.modules() if isinstance(m, torch.nn.BatchNorm2d))
    live = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert not torch.allclose(bn.running_mean.cpu(), live.running_mean.cpu())
    loaded = DigitsCNN.load_from_checkpoint(ens.averaged_path)  # hparams travel: no arguments needed
    assert validate(t, loaded, data)["val_loss"] == pytest.approx(last["averaged_loss"], rel=1e-5)


def run_plain_or_not(tmp_path, callbacks):
    L.seed_everything(123, verbose=False)
    x, y = image_blobs()
    model = Classifier(cnn(), lr=1e-2)  # BatchNorm and dropout
    train, val = loaders(x, y)
    t = trainer(tmp_path, callbacks, logger="csv", max_epochs=3)
    t.fit(model, train, val)
    with open(tmp_path / "run" / "version_0" / "metrics.csv") as fh:
        rows = [{k: v for k, v in r.items() if not k.startswith("recipe/")} for r in csv.DictReader(fh)]
    rows = [r for r in rows if any(v for k, v in r.items() if k not in ("epoch", "step"))]
    return model.state_dict(), rows, t.optimizers[0].state_dict(), torch.get_rng_state()


@pytest.mark.parametrize("selection", ["last", "top"])
def test_the_users_run_stays_bit_identical(tmp_path, selection):
    w0, m0, o0, r0 = run_plain_or_not(tmp_path / "plain", [])
    ens = CheckpointEnsemble(num_snapshots=2, selection=selection)
    w1, m1, o1, r1 = run_plain_or_not(tmp_path / "ens", [ens])
    assert len(ens.history) == 3
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k
    assert m0 == m1 and torch.equal(r0, r1)
    for a, b in zip(o0["state"].values(), o1["state"].values()):
        for k in a:
            assert torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k])), k


def test_ensemble_forward_survives_lightnings_forward_redirection(tmp_path):
    # DDP, FSDP and DeepSpeed run training_step through the wrapper's forward and leave the module's
    # own forward bound on the instance, which a copy inherits: ensemble() must still average
    ens = CheckpointEnsemble(num_snapshots=2, averaged_path=False)
    _, model, val = fit_noisy(tmp_path, [ens], epochs=2, logger=None)
    model.forward = model.forward
    snap = ens.ensemble()
    x, y = torch.cat([b[0] for b in val]), torch.cat([b[1] for b in val])
    with torch.no_grad():
        loss = float(torch.nn.functional.cross_entropy(snap(x), y))
        newest = float(torch.nn.functional.cross_entropy(snap.recipe_members[-1](x), y))
    assert loss == pytest.approx(ens.figures["snapshot_ensemble_loss"], rel=1e-5)
    assert loss != pytest.approx(newest, rel=1e-3)


def test_top_selection_keeps_the_best_measured_snapshots(tmp_path):
    ens = CheckpointEnsemble(num_snapshots=3, selection="top")
    fit_noisy(tmp_path, [ens], logger=None)
    by_loss = sorted(ens.history, key=lambda h: h["single_loss"])[:3]
    assert sorted(s.epoch for s in ens._snapshots) == sorted(h["epoch"] for h in by_loss)
    assert sorted(ens.history[-1]["member_epochs"]) == sorted(h["epoch"] for h in by_loss)


def test_resume_keeps_snapshots_and_average(tmp_path):
    full = CheckpointEnsemble(num_snapshots=3)
    fit_noisy(tmp_path / "full", [full], epochs=6, logger=None)

    class Kill(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == 3:
                raise RuntimeError("killed")

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    with pytest.raises(RuntimeError, match="killed"):
        fit_noisy(
            tmp_path / "a",
            [CheckpointEnsemble(num_snapshots=3), ckpt, Kill()],
            epochs=6,
            logger=None,
            enable_checkpointing=True,
        )
    resumed = CheckpointEnsemble(num_snapshots=3, storage="disk", snapshot_dir=tmp_path / "snaps")
    fit_noisy(tmp_path / "b", [resumed], epochs=6, logger=None, ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert [h["epoch"] for h in resumed.history] == list(range(6))
    for a, b in zip(full.history, resumed.history):
        for key in ("single_loss", "snapshot_ensemble_loss", "averaged_loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-5), (a["epoch"], key)
    assert [s.epoch for s in resumed._snapshots] == [s.epoch for s in full._snapshots] == [3, 4, 5]
    assert all(s.state is None and s.path.startswith(str(tmp_path / "snaps")) for s in resumed._snapshots[1:])
    for a, b in zip(
        full.averaged_model().state_dict().values(), resumed.averaged_model().state_dict().values()
    ):
        assert torch.allclose(a, b, atol=1e-6)


class Regressor(Classifier):
    def __init__(self):
        super().__init__(
            mlp(d=16, classes=1, hidden=32), lr=0.05, optimizer="sgd", x_key="features", loss="mse"
        )

    def forward(self, x):
        return self.net(x).squeeze(-1)


def test_regression_with_dict_batches_averages_outputs(tmp_path):
    x, _ = blobs(n=192)
    y = x[:, 0] * 2 + 0.5 * torch.randn(192, generator=torch.Generator().manual_seed(0))
    train, val = loaders(x, y, dict_keys=("features", "y"), shuffle=False)
    ens = CheckpointEnsemble(num_snapshots=2)
    L.seed_everything(0, verbose=False)
    t = trainer(tmp_path, [ens], max_epochs=4)
    model = Regressor()
    t.fit(model, train, val)
    last = ens.history[-1]
    assert "single_accuracy" not in last and last["averaged_loss"] > 0
    acc = accumulator(tmp_path / "run" / "version_0")
    assert "recipe/ensemble/averaged/accuracy" not in acc.Tags()["scalars"]
    assert len(acc.Scalars("recipe/ensemble/snapshot_ensemble/loss")) == 4
    assert validate(t, ens.ensemble(), val)["val_loss"] == pytest.approx(
        last["snapshot_ensemble_loss"], rel=1e-5
    )


def test_fit_end_evaluation_runs_once(tmp_path):
    ens = CheckpointEnsemble(num_snapshots=2, evaluate="fit_end")
    t, _, _ = fit_noisy(tmp_path, [ens], epochs=4)
    assert len(ens.history) == 1 and ens.history[-1]["member_epochs"] == [2, 3]
    assert ens.history[-1]["single_loss"] == pytest.approx(float(t.callback_metrics["val_loss"]), rel=1e-5)
    acc = accumulator(tmp_path / "run" / "version_0")
    assert len(acc.Scalars("recipe/ensemble/averaged/loss")) == 1


class HandRolledLoss(Classifier):
    """No torch.nn.functional loss anywhere: the loss is a plain method of the module."""

    def loss_fn(self, out, y):
        return -(out.log_softmax(-1).gather(1, y[:, None])).mean()


def test_a_model_without_a_standard_loss_is_measured_through_its_step(tmp_path):
    """The step itself is the loss call (the forward output averaged, the loss recomputed by
    rerunning the step with it), so the callback measures instead of stepping aside."""
    ens = CheckpointEnsemble()
    fit_noisy(tmp_path, [ens], epochs=2, model=HandRolledLoss(mlp(hidden=64)), logger=None)
    assert "check-skipped" not in [f.code for f in ens.findings], [f.message for f in ens.findings]
    assert ens.figures


class OneArgumentValidationStep(Classifier):
    """``validation_step(self, batch)``: Lightning accepts a step without ``batch_idx``."""

    def validation_step(self, batch):
        x, y = self.split(batch)
        self.log("val_loss", self.loss_fn(self(x), y))


def test_one_argument_validation_step_goes_through_the_probe_layer(tmp_path, monkeypatch):
    from lightning_recipe import _probe
    from lightning_recipe._probe import steps as _probe_steps

    hooks = []
    call_step = _probe_steps.call_step

    def spy(module, hook, *args, **kwargs):
        hooks.append(hook)
        return call_step(module, hook, *args, **kwargs)

    monkeypatch.setattr(_probe_steps, "call_step", spy)
    ens = CheckpointEnsemble(num_snapshots=2)
    t, model, val = fit_noisy(tmp_path, [ens], epochs=2, model=OneArgumentValidationStep(mlp(hidden=64)))
    # the ensemble ran the one-argument validation_step (not the training_step) through _probe.call_step
    assert ens._use_training_step is False and set(hooks) == {"validation_step"}
    assert [f.code for f in ens.findings] == ["ensemble-evaluated"] and len(ens.history) == 2
    assert ens.history[-1]["single_loss"] == pytest.approx(float(t.callback_metrics["val_loss"]), rel=1e-5)
    # and the probe layer's own validation-step call takes it too
    batch = next(iter(val))
    assert _probe.call_validation_step(_probe.copy_module(model), batch, 3) is None


def test_capture_step_keeps_the_loss_calls_of_a_step_that_returns_no_loss():
    from lightning_recipe import _probe

    model = _probe.copy_module(Classifier(mlp(hidden=8)))
    x, y = blobs(n=8)
    result = _probe.capture_step(model, "validation_step", (x, y), 0)  # returns None, logs val_loss
    assert result.loss is None and [c.name for c in result.calls] == ["cross_entropy"]
    assert result.main_call is result.calls[0]
    fn = _probe.capture_step(model, "validation_step", (x, y), step_fn=lambda m, b: {"acc": 1.0})
    assert fn.loss is None and fn.calls == []  # step_fn replaces the hook


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="num_snapshots"):
        CheckpointEnsemble(num_snapshots=1)
    with pytest.raises(ValueError, match="selection"):
        CheckpointEnsemble(selection="best")
    with pytest.raises(ValueError, match=r"selection='top'.*evaluate='validation'"):
        CheckpointEnsemble(selection="top", evaluate="fit_end")
    with pytest.raises(ValueError, match="ema_decay"):
        CheckpointEnsemble(ema_decay=1.0)
    with pytest.raises(ValueError, match="storage"):
        CheckpointEnsemble(storage="gpu")
    with pytest.raises(ValueError, match="bn_batches"):
        CheckpointEnsemble(bn_batches=-1)
    with pytest.raises(TypeError, match="averaged_path"):
        CheckpointEnsemble(averaged_path=3)
    with pytest.raises(TypeError, match="step_fn"):
        CheckpointEnsemble(step_fn="loss")


@pytest.mark.parametrize("kind", ["cnn", "gru", "transformer", "dict"])
def test_healthy_models_get_only_info_findings(tmp_path, kind):
    from lightning_recipe.control.early_stopping import RecipeEarlyStopping
    from models import GRUNet, TinyTransformer, token_blobs

    L.seed_everything(0, verbose=False)
    if kind in ("gru", "transformer"):
        x, y = token_blobs(n=192)
        model = Classifier(GRUNet() if kind == "gru" else TinyTransformer(), lr=1e-2)
    elif kind == "cnn":
        x, y = image_blobs(n=192)
        model = Classifier(cnn(), lr=1e-2)
    else:
        x, y = blobs(n=192)
        model = Classifier(mlp(), lr=1e-2, x_key="features", y_key="label")
    train, val = loaders(x, y, dict_keys=("features", "label") if kind == "dict" else None)
    ens, es = CheckpointEnsemble(num_snapshots=2), RecipeEarlyStopping("val_loss")
    t = trainer(tmp_path, [ens, es], logger=None, max_epochs=3)
    t.fit(model, train, val)
    assert [f.code for f in ens.findings] == ["ensemble-evaluated"]
    assert [f.code for f in es.findings] == ["early-stopped"]
    assert len(ens.history) == 3 and ens.history[-1]["averaged_accuracy"] > 0.5
    # the model kept by early stopping scores what early stopping says
    assert validate(t, model, val)["val_loss"] == pytest.approx(float(es.best_score), rel=1e-5)
