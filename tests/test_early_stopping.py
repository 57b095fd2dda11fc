"""RecipeEarlyStopping: drop-in for Lightning's EarlyStopping, restores the best weights in every
case, stops on NaN and divergence, says why, and resumes from a checkpoint unchanged."""

import math

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.callbacks.early_stopping import EarlyStoppingReason
from lightning.pytorch.utilities.exceptions import MisconfigurationException

import lightning_recipe as lr
from lightning_recipe.control.early_stopping import RecipeEarlyStopping
from models import Classifier, blobs, loaders, mlp, trainer

# measured on this data (lr 1e-2, 12 epochs): val_loss is best at epoch 3 (0.2765), then rises slowly
BEST_EPOCH = 3


def data():
    x, y = blobs(n=128, seed=0)
    x = x + 1.2 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    return loaders(x, y, batch_size=16, shuffle=False)


def fit(tmp_path, callbacks, model=None, epochs=12, ckpt_path=None, logger=None, **kw):
    L.seed_everything(0, verbose=False)
    model = model or Classifier(mlp(hidden=64), lr=1e-2)
    train, val = data()
    t = trainer(tmp_path, callbacks, logger=logger, max_epochs=epochs, **kw)
    t.fit(model, train, val, ckpt_path=ckpt_path)
    return t, model, val


def val_loss(t, model, val):
    return t.validate(model, val, verbose=False)[0]["val_loss"]


def codes(cb, severity=None):
    return [f.code for f in cb.findings if severity is None or f.severity.value == severity]


def test_drop_in_equivalence_with_lightning_early_stopping(tmp_path):
    theirs = EarlyStopping("val_loss", patience=3)
    _, m1, _ = fit(tmp_path / "a", [theirs], logger="csv")
    ours = RecipeEarlyStopping("val_loss", patience=3, restore_best_weights=False)
    _, m2, _ = fit(tmp_path / "b", [ours], logger="csv")
    assert theirs.stopped_epoch == ours.stopped_epoch == BEST_EPOCH + 3
    assert theirs.wait_count == ours.wait_count == 3
    assert torch.equal(theirs.best_score, ours.best_score)
    assert theirs.stopping_reason is ours.stopping_reason is EarlyStoppingReason.PATIENCE_EXHAUSTED
    assert ours.state_key == theirs.state_key == "EarlyStopping{'monitor': 'val_loss', 'mode': 'min'}"
    assert set(theirs.state_dict()) <= set(ours.state_dict())
    for a, b in zip(m1.state_dict().values(), m2.state_dict().values()):
        assert torch.equal(a, b)  # nothing but the verdict differs (restore off)
    read = (tmp_path / "a" / "run" / "version_0" / "metrics.csv").read_text()
    assert read == (tmp_path / "b" / "run" / "version_0" / "metrics.csv").read_text()


def test_plateau_stops_and_restores_the_best_weights(tmp_path):
    es = RecipeEarlyStopping("val_loss", patience=3)
    t, model, val = fit(tmp_path, [es])
    assert es.stopped_epoch == BEST_EPOCH + 3 and es.best_epoch == BEST_EPOCH
    assert es.restored_epoch == BEST_EPOCH
    # recompute: the model now scores the best epoch's value, not the last one
    assert val_loss(t, model, val) == pytest.approx(float(es.best_score), rel=1e-6)
    assert es.figures["last_value"] > float(es.best_score) + 0.02
    f = es.findings[-1]
    assert f.code == "early-stopped" and f.severity is lr.Severity.INFO
    assert f.evidence["cause"] == "patience" and f.evidence["restored_epoch"] == BEST_EPOCH
    assert f"patience=3; best {float(es.best_score):.4g} at epoch {BEST_EPOCH}" in f.message
    assert f"from epoch {BEST_EPOCH}" in f.message


def test_restores_best_weights_when_running_to_max_epochs(tmp_path):
    es = RecipeEarlyStopping("val_loss", patience=50)
    t, model, val = fit(tmp_path, [es], epochs=8)
    assert es.stopped_epoch == 0 and es.stop_cause is None  # it never stopped early (Keras: no restore)
    assert es.restored_epoch == BEST_EPOCH
    assert val_loss(t, model, val) == pytest.approx(float(es.best_score), rel=1e-6)
    f = es.findings[-1]
    assert f.evidence["cause"] == "max_epochs" and "ran to max_epochs=8" in f.message


def test_restore_can_be_turned_off_and_storage_can_be_disk_or_device(tmp_path):
    es = RecipeEarlyStopping("val_loss", patience=50, restore_best_weights=False)
    t, model, val = fit(tmp_path / "off", [es], epochs=8)
    assert (
        val_loss(t, model, val) > float(es.best_score) + 0.02
        and "kept the final weights" in es.findings[-1].message
    )
    disk = RecipeEarlyStopping("val_loss", patience=50, best_weights_storage="disk")
    t, model, val = fit(tmp_path / "disk", [disk], epochs=8)
    assert disk.state_dict()["best_weights"] is None and disk.state_dict()["best_weights_path"].endswith(
        ".pt"
    )
    assert (tmp_path / "disk" / "recipe_best_weights").is_dir()
    assert val_loss(t, model, val) == pytest.approx(float(disk.best_score), rel=1e-6)
    dev = RecipeEarlyStopping("val_loss", patience=50, best_weights_storage="device")
    t, model, val = fit(tmp_path / "dev", [dev], epochs=8)
    assert val_loss(t, model, val) == pytest.approx(float(dev.best_score), rel=1e-6)


def test_validation_twice_per_epoch_restores_the_weights_that_were_checked(tmp_path):
    es = RecipeEarlyStopping("val_loss", patience=50)  # checks at validation end, mid-epoch too
    t, model, val = fit(tmp_path, [es], epochs=4, val_check_interval=0.5)
    assert es._check_on_train_epoch_end is False and es.best_step % 3 == 0
    assert val_loss(t, model, val) == pytest.approx(float(es.best_score), rel=1e-6)


class NaNAfter(Classifier):
    """Healthy until ``step``, then the training loss is NaN (and the weights with it)."""

    def __init__(self, step):
        super().__init__(mlp(hidden=64), lr=1e-2)
        self.nan_step = step

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.global_step >= self.nan_step else loss


def test_stops_at_once_on_a_nan_training_loss_and_restores(tmp_path):
    es = RecipeEarlyStopping("val_loss", patience=50)
    with pytest.warns(lr.RecipeWarning, match=r"\[non-finite-loss\]"):
        t, model, val = fit(tmp_path, [es], model=NaNAfter(15), log_every_n_steps=1)
    assert t.global_step == 16  # 6 batches per epoch: stopped in epoch 2, right after the first NaN
    assert es.stop_cause == "non-finite-train-loss" and es.stopped_epoch == 2
    assert es.stopping_reason is EarlyStoppingReason.NON_FINITE_METRIC
    first = next(f for f in es.findings if f.code == "non-finite-loss")
    assert first.severity is lr.Severity.ERROR and first.evidence["step"] == 16 and "nan" in first.message
    assert all(torch.isfinite(p).all() for p in model.parameters())  # epoch 1's weights are back
    assert es.restored_epoch == 1
    assert val_loss(t, model, val) == pytest.approx(float(es.best_score), rel=1e-6)


class Scripted(Classifier):
    """Logs a scripted val_loss per epoch (to test the rules on exact numbers)."""

    def __init__(self, values):
        super().__init__(mlp(hidden=8), lr=1e-3)
        self.values = values

    def validation_step(self, batch, batch_idx):
        epoch = -1 if self.trainer.sanity_checking else self.current_epoch
        self.log("val_loss", torch.tensor(self.values[epoch]))


def test_stops_on_a_nan_monitored_value(tmp_path):
    es = RecipeEarlyStopping("val_loss", patience=50)
    with pytest.warns(
        lr.RecipeWarning, match=r"\[non-finite-loss\] The monitored val_loss is nan at epoch 2"
    ):
        fit(tmp_path, [es], model=Scripted({-1: 2.3, 0: 1.0, 1: 0.8, 2: math.nan, 3: 0.5}))
    assert es.stopped_epoch == 2 and es.stop_cause == "non-finite"
    assert codes(es) == ["non-finite-loss", "early-stopped"]
    assert "training was stopped" in es.findings[0].message
    assert es.restored_epoch == 1


def test_stops_on_divergence_against_the_value_before_training(tmp_path):
    # before training 2.3 (sanity check); 12.0 > 5 x 2.3: diverged, although the best was never beaten by 5x
    es = RecipeEarlyStopping("val_loss", patience=50)
    with pytest.warns(lr.RecipeWarning, match=r"\[loss-diverged\]"):
        fit(tmp_path / "a", [es], model=Scripted({-1: 2.3, 0: 1.0, 1: 0.9, 2: 12.0, 3: 0.5}))
    assert es.stopped_epoch == 2 and es.stop_cause == "diverged" and es.restored_epoch == 1
    f = es.findings[0]
    assert f.code == "loss-diverged" and f.evidence["reference"] == pytest.approx(2.3)
    assert f.evidence["ratio"] == pytest.approx(12.0 / 2.3, rel=1e-5) and "5.22x" in f.message
    # overfitting: from 0.02 up to 0.5 (25x the best) is not a divergence, patience handles it
    es = RecipeEarlyStopping("val_loss", patience=50)
    fit(tmp_path / "b", [es], model=Scripted({-1: 2.3, 0: 0.02, 1: 0.1, 2: 0.5, 3: 0.6}), epochs=4)
    assert es.stop_cause is None and codes(es) == ["early-stopped"]
    # mode="max" has no divergence rule
    es = RecipeEarlyStopping("val_loss", patience=50, mode="max")
    assert es.divergence_factor is None


def test_resume_from_a_checkpoint_behaves_the_same(tmp_path):
    full = RecipeEarlyStopping("val_loss", patience=4)
    _, model_full, _ = fit(tmp_path / "full", [full])

    class Kill(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == 5:
                raise RuntimeError("killed")  # as if the job died after epoch 4's checkpoint

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first = RecipeEarlyStopping("val_loss", patience=4)
    with pytest.raises(RuntimeError, match="killed"):
        fit(tmp_path / "killed", [first, ckpt, Kill()], enable_checkpointing=True)
    state = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)["callbacks"][full.state_key]
    assert (
        state["best_epoch"] == BEST_EPOCH and state["best_weights"] is not None and state["wait_count"] == 1
    )

    resumed = RecipeEarlyStopping("val_loss", patience=4)
    _, model_resumed, _ = fit(tmp_path / "resumed", [resumed], ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    for attr in ("stopped_epoch", "wait_count", "best_epoch", "restored_epoch", "stop_cause"):
        assert getattr(resumed, attr) == getattr(full, attr), attr
    assert torch.equal(resumed.best_score, full.best_score)
    for a, b in zip(model_full.state_dict().values(), model_resumed.state_dict().values()):
        assert torch.equal(a, b)  # the weights of epoch 3, restored from the checkpoint's copy


def test_checkpoints_move_between_lightning_and_recipe_early_stopping(tmp_path):
    ref = RecipeEarlyStopping("val_loss", patience=3, restore_best_weights=False)
    fit(tmp_path / "ref", [ref])
    assert ref.stopped_epoch == BEST_EPOCH + 3
    # resumed after the best epoch: only a loaded best_score / wait_count stops at the same epoch
    for first, second, name in (
        (
            EarlyStopping("val_loss", patience=3),
            RecipeEarlyStopping("val_loss", patience=3),
            "theirs-to-ours",
        ),
        (
            RecipeEarlyStopping("val_loss", patience=3),
            EarlyStopping("val_loss", patience=3),
            "ours-to-theirs",
        ),
    ):
        ckpt = ModelCheckpoint(dirpath=tmp_path / name, save_last=True)
        fit(tmp_path / name / "a", [first, ckpt], epochs=BEST_EPOCH + 2, enable_checkpointing=True)
        fit(tmp_path / name / "b", [second], ckpt_path=tmp_path / name / "last.ckpt")
        assert second.stopped_epoch == ref.stopped_epoch, name
        assert second.wait_count == ref.wait_count and torch.equal(second.best_score, ref.best_score), name


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="best_weights_storage"):
        RecipeEarlyStopping("val_loss", best_weights_storage="gpu")
    with pytest.raises(ValueError, match="divergence_factor"):
        RecipeEarlyStopping("val_loss", divergence_factor=0.5)
    with pytest.raises(ValueError, match=r"divergence_factor.*mode='min'"):
        RecipeEarlyStopping("val_acc", mode="max", divergence_factor=3.0)
    with pytest.raises(ValueError, match="patience"):
        RecipeEarlyStopping("val_loss", patience=-1)
    with pytest.raises(TypeError, match="monitor"):
        RecipeEarlyStopping(None)
    with pytest.raises(TypeError, match="restore_best_weights"):
        RecipeEarlyStopping("val_loss", restore_best_weights="yes")
    with pytest.raises(ValueError, match="on_error"):
        RecipeEarlyStopping("val_loss", on_error="explode")
    with pytest.raises(MisconfigurationException, match="mode"):
        RecipeEarlyStopping("val_loss", mode="best")


def test_non_finite_training_loss_is_read_by_the_probe_layer():
    """``_non_finite_loss`` reads what the step returned with ``_probe.find_loss``."""
    from types import SimpleNamespace

    from lightning_recipe.control.early_stopping import _non_finite_loss

    nan = torch.tensor(float("nan"))
    assert _non_finite_loss(None) is None and _non_finite_loss({"acc": nan}) is None
    assert _non_finite_loss(torch.tensor(1.0)) is None
    assert _non_finite_loss({"loss": torch.tensor(2.0)}) is None
    assert all(math.isnan(_non_finite_loss(out)) for out in (nan, {"loss": nan}, SimpleNamespace(loss=nan)))
    assert _non_finite_loss({"loss": torch.tensor([1.0, float("inf")])}) == math.inf
