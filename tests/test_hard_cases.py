"""The full suite (every callback, ``recipe_callbacks(monitor="val_loss")``) on unusual but
healthy setups: each fit completes, no diagnostic fails internally, nothing is reported louder
than info, the callbacks that cannot run say so once (``check-skipped``), and the ones that can
run really produce their measurements."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import lightning_recipe as lr
from hard_models import (
    CompiledInside,
    DataclassBatch,
    DictStep,
    FrozenBackbone,
    ListDataset,
    MetaTuple,
    Run,
    Sample,
    TinyGAN,
    backbone,
    collate_samples,
    fit_suite,
    gan_points,
    pl_classes,
    pretrained_backbone,
    split_loaders,
)
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
)
from models import trainer as make_trainer

#: every monitor's scalar output (a tag prefix) that a healthy run with validation data logs
OUTPUTS = {
    "update_ratio": "recipe/update_ratio_summary/median",
    "gradients": "recipe/grad_norm/",
    "activations": "recipe/activation_stats/",
    "loss_curve": "recipe/loss/train",
    "train_val": "recipe/train_val_gap/",
    "input_independent": "recipe/input_independent/real_loss",
    "prediction_dynamics": "recipe/prediction_dynamics/accuracy",
    "ensemble": "recipe/ensemble/single/loss",
    "data": "recipe/data/mean",
}
#: the one-shot checks and the figure each one records when it really measured
CHECK_FIGURES = {
    "DataInspectionCheck": "input_dtype",
    "LossAtInitCheck": "loss",
    "BatchIndependenceCheck": "max_leak",
    "GradientCheck": "max_relative_error",
    "OverfitBatchCheck": "best_loss",
    "ModelLintCheck": "trainable_params",
}
NEEDS_STEP_FN = {"LossAtInitCheck", "BatchIndependenceCheck", "GradientCheck", "OverfitBatchCheck"}
NEEDS_STEP_FN |= {"FutureLeakCheck", "PaddingCheck", "RegularizationCheck"}  # they run the step too
NEEDS_INPUT = {"DataInspectionCheck", "BatchIndependenceCheck", "GradientCheck"}
NEEDS_INPUT |= {"FutureLeakCheck", "PaddingCheck"}  # the batch size comes from the input
NEEDS_INPUT |= {"TargetInInputCheck", "TrainValOverlapCheck"}  # they read the input
NEEDS_VALIDATION = {"RecipeEarlyStopping", "CheckpointEnsemble", "InputIndependentBaseline"}


def assert_healthy(run: Run, skipped: set[str], missing: set[str] = frozenset()) -> None:
    """The common verdict: no internal error, nothing louder than info, exactly the expected
    callbacks skipped (each saying so once), every other output really written."""
    assert run.internal_errors() == []
    assert run.loud() == []
    skips = Counter(f.source for f in run.findings if f.code == "check-skipped")
    assert set(skips) == skipped, {f.source: f.message for f in run.findings if f.code == "check-skipped"}
    assert all(n == 1 for src, n in skips.items() if src != "ModelLintCheck"), skips
    for source in skipped:
        for message in run.skips(source):
            assert message.startswith(f"{source} ") and not message.endswith(".."), message
    scalars = run.scalars()
    for name, tag in OUTPUTS.items():
        written = [t for t in scalars if t.startswith(tag)]
        if name in missing:
            assert written == [], (name, written)
        else:
            assert written, f"{name}: no {tag}* scalar"
            for t in written:
                steps = [s for s, _ in scalars[t]]
                assert len(steps) == len(set(steps)), f"{t} logged twice at one step: {steps}"
    images = run.images()
    for tag, source in (
        ("recipe/first_layer_filters", "FirstLayerFilterMonitor"),
        ("recipe/prediction_dynamics", "PredictionDynamicsMonitor"),
    ):
        assert (tag in images) == (source not in skipped), (tag, sorted(images))
    for check, figure in CHECK_FIGURES.items():
        cb = run.by_name(check)
        if check in skipped and check != "ModelLintCheck":
            assert figure not in cb.figures, (check, cb.figures)
        else:
            assert figure in cb.figures, (check, cb.figures)
    assert run.by_name("UpdateRatioMonitor").figures["parameters_measured"] > 0
    assert run.by_name("GradientMonitor").figures["logging_steps"] > 0
    assert run.by_name("ActivationMonitor").figures["logging_steps"] > 0


def mlp_data(batch_size: int = 16, **kw):
    x, y = blobs()
    return loaders(x, y, batch_size=batch_size, **kw)


def image_data(batch_size: int = 16):
    x, y = image_blobs()
    return loaders(x, y, batch_size=batch_size)


# ---------------------------------------------------------------------------- 1. mixed precision
def test_bf16_mixed_on_cpu(tmp_path):
    L.seed_everything(0, verbose=False)
    run = fit_suite(tmp_path, Classifier(cnn()), *image_data(), precision="bf16-mixed")
    assert run.trainer.precision == "bf16-mixed"
    assert_healthy(run, skipped=set())
    assert run.by_name("GradientCheck").figures["max_relative_error"] < 1e-4


def test_16_mixed_is_bf16_on_cpu_so_fp16_runs_with_a_grad_scaler_plugin(tmp_path):
    """Lightning turns ``precision="16-mixed"`` on CPU into bf16 (checked below); real fp16 autocast
    with a GradScaler runs on CPU through the precision plugin, which exercises the scaler path
    (gradients unscaled before ``on_before_optimizer_step``, the scaler's found-inf flags)."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    with pytest.warns(UserWarning, match="fp16 is not supported on CPU"):
        assert L.Trainer(accelerator="cpu", precision="16-mixed", logger=False).precision == "bf16-mixed"
    L.seed_everything(0, verbose=False)
    plugin = MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu"))
    run = fit_suite(tmp_path, Classifier(cnn()), *image_data(), plugins=[plugin])
    assert run.trainer.precision == "16-mixed" and run.trainer.precision_plugin.scaler is not None
    assert_healthy(run, skipped=set())
    # the gradient monitor read unscaled gradients (scale 65536 would put them ~1e4)
    norms = [v for t, e in run.scalars().items() if t.startswith("recipe/grad_norm/") for _, v in e]
    assert 0 < max(norms) < 100


# ---------------------------------------------------------------------------- 2. accumulation
def test_gradient_accumulation(tmp_path):
    L.seed_everything(0, verbose=False)
    # 12 batches per epoch, 3 per optimizer step: 4 steps per epoch, logging every 4 steps
    run = fit_suite(tmp_path, Classifier(mlp()), *mlp_data(), accumulate_grad_batches=3)
    assert run.trainer.global_step == 24
    assert_healthy(run, skipped={"FirstLayerFilterMonitor"})
    scalars = run.scalars()
    # update ratio: once per optimizer step (every step for the first 10, then every 4th), never
    # once per batch
    ratio = run.by_name("UpdateRatioMonitor")
    measured = [s for s, _ in scalars["recipe/update_ratio_summary/median"]]
    assert measured == [s + 1 for s in range(24) if s < 10 or s % 4 == 0]
    assert ratio.snapshots_taken == len(measured)
    # model lint watched 10 optimizer steps (not 10 batches) and saw each cleared
    assert run.by_name("ModelLintCheck").figures["grad_steps_watched"] == 10
    # loss curve in the loss's own units (Lightning hands the callbacks loss / 3): the first
    # logging interval is exactly epoch 0, whose mean Lightning logs as train_loss_epoch
    curve = dict(scalars["recipe/loss/train"])
    epoch_means = [v for _, v in scalars["train_loss_epoch"]]
    assert curve[4] == pytest.approx(epoch_means[0], rel=1e-4)
    assert run.by_name("LossCurveMonitor").figures["initial_loss"] == pytest.approx(
        run.by_name("LossAtInitCheck").figures["loss"], rel=0.25
    )


# ---------------------------------------------------------------------------- 3. manual optimisation
def test_manual_optimization_one_optimizer(tmp_path):
    L.seed_everything(0, verbose=False)
    run = fit_suite(tmp_path, ManualClassifier(mlp()), *mlp_data())
    skipped = NEEDS_STEP_FN | {
        "PredictionDynamicsMonitor",
        "InputIndependentBaseline",
        "FirstLayerFilterMonitor",
    }
    assert_healthy(run, skipped, missing={"input_independent", "prediction_dynamics"})
    for source in NEEDS_STEP_FN:
        assert "step_fn" in run.skips(source)[0]
    assert run.by_name("UpdateRatioMonitor").figures["parameters_measured"] == 6


def test_manual_optimization_with_step_fn_runs_every_check(tmp_path):
    L.seed_everything(0, verbose=False)

    def step_fn(model, batch):
        x, y = batch
        return torch.nn.functional.cross_entropy(model(x), y)

    run = fit_suite(tmp_path, ManualClassifier(mlp()), *mlp_data(), suite={"step_fn": step_fn})
    assert_healthy(run, skipped={"FirstLayerFilterMonitor"})


def gan_loaders():
    points = gan_points()
    train = DataLoader(TensorDataset(points[64:]), batch_size=16, shuffle=True)
    val = DataLoader(TensorDataset(points[:64]), batch_size=16)
    return train, val


def test_gan_two_optimizers_manual(tmp_path):
    L.seed_everything(0, verbose=False)
    # 12 batches per epoch, two optimizer steps per batch: 2 epochs
    run = fit_suite(tmp_path, TinyGAN(), *gan_loaders(), max_steps=48)
    assert run.trainer.global_step == 48
    skipped = NEEDS_STEP_FN | {
        "PredictionDynamicsMonitor",
        "InputIndependentBaseline",
        "FirstLayerFilterMonitor",
        "LossCurveMonitor",  # training_step returns None: no loss to read
        "TrainValGapMonitor",  # no train/val pair of metrics
    }  # LabelNoiseMonitor: binary cross-entropy has no pair of classes among others (not applicable, no skip)
    assert_healthy(
        run, skipped, missing={"input_independent", "prediction_dynamics", "loss_curve", "train_val"}
    )
    # both optimizers' parameters are measured, and both networks' gradients and activations
    scalars = run.scalars()
    names = [n for n, _ in TinyGAN().named_parameters()]
    assert {f"recipe/update_ratio/{n}" for n in names} <= set(scalars)
    for net in ("generator", "discriminator"):
        assert any(t.startswith(f"recipe/grad_norm/{net}.") for t in scalars)
        assert any(t.startswith(f"recipe/activation_stats/{net}.") for t in scalars)
    # the sampling validation_step is an info, not a train-eval-mode warning
    lint = [f for f in run.findings if f.source == "ModelLintCheck"]
    assert all(f.severity.value == "info" for f in lint)


# ---------------------------------------------------------------------------- 4. torch.compile
@pytest.mark.slow
def test_compiled_submodule(tmp_path):
    """``self.net = torch.compile(net)``: the checks deep-copy the module (the compiled wrapper
    with it) and run the user's step on the copy. ``aot_eager`` is the real dynamo + autograd
    capture without the C++ code generation (inductor takes ~13 s per graph on this CPU)."""
    torch._dynamo.reset()
    L.seed_everything(0, verbose=False)
    run = fit_suite(tmp_path, CompiledInside(cnn(), backend="aot_eager"), *image_data())
    assert_healthy(run, skipped=set())


@pytest.mark.slow
def test_compiled_whole_lightning_module(tmp_path):
    """``trainer.fit(torch.compile(model))``: Lightning unwraps it and compiles ``training_step``
    and ``validation_step``. Skipped where that fails without the suite too."""
    torch._dynamo.reset()
    L.seed_everything(0, verbose=False)
    plain = L.Trainer(
        accelerator="cpu", logger=False, max_steps=2, enable_progress_bar=False, enable_checkpointing=False
    )
    try:
        plain.fit(torch.compile(Classifier(cnn()), backend="aot_eager"), *image_data())
    except Exception as exc:
        pytest.skip(f"torch.compile of a whole LightningModule fails without the suite: {type(exc).__name__}")
    torch._dynamo.reset()
    L.seed_everything(0, verbose=False)
    run = fit_suite(tmp_path, torch.compile(Classifier(cnn()), backend="aot_eager"), *image_data())
    assert_healthy(run, skipped=set())


class _QuietStep(Classifier):
    """Logs nothing in ``training_step`` (``self.log`` there breaks Lightning's whole-module
    compile on this torch, see above); validation logs ``val_loss`` as usual."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", torch.nn.functional.cross_entropy(self(x), y))


@pytest.mark.slow
def test_compiled_whole_module_probes_run_on_the_copy(tmp_path):
    """``trainer.fit(torch.compile(model))``: the checks' probes must run the copy, not the real
    model (no false ``overfit-batch-failed``, the run bit-identical with and without the suite)."""

    def final(callbacks):
        torch._dynamo.reset()
        L.seed_everything(0, verbose=False)
        model = torch.compile(_QuietStep(cnn(dropout=0.0)), backend="aot_eager")
        t = make_trainer(tmp_path, callbacks, logger=None, max_steps=24, max_epochs=100, limit_val_batches=2)
        t.fit(model, *image_data())
        return t, model._orig_mod.state_dict()

    _, plain = final([])
    suite = lr.recipe_callbacks(
        monitor="val_loss", verbose=False, early_stopping={"restore_best_weights": False}
    )
    t, with_suite = final(suite)
    loud = [f"{f.source} {f.code}: {f.message}" for f in lr.findings(t) if f.severity.value != "info"]
    assert loud == []
    for k in plain:
        assert torch.equal(plain[k], with_suite[k]), k


# ---------------------------------------------------------------------------- 5. no conv layer
def test_mlp_only_first_layer_filters_skip_once(tmp_path):
    L.seed_everything(0, verbose=False)
    run = fit_suite(tmp_path, Classifier(mlp()), *mlp_data())
    assert_healthy(run, skipped={"FirstLayerFilterMonitor"})
    mine = [f for f in run.findings if f.source == "FirstLayerFilterMonitor"]
    assert [f.code for f in mine] == ["check-skipped"]
    assert "no Conv1d/Conv2d" in mine[0].message
    assert not any(t.startswith("recipe/first_layer_filters") for t in [*run.scalars(), *run.images()])


# ---------------------------------------------------------------------------- 6. frozen backbone
def test_frozen_backbone_in_eval_mode(tmp_path):
    L.seed_everything(0, verbose=False)
    x, y = image_blobs()
    net = backbone()
    net[0] = torch.nn.Conv2d(1, 8, 5, padding=2, bias=False)  # big enough to be judged when trained
    model = FrozenBackbone(pretrained_backbone(x, y, net))
    frozen = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    run = fit_suite(tmp_path, model, *loaders(x, y, batch_size=16))
    assert_healthy(run, skipped=set())
    # nothing touched the frozen part: weights and BatchNorm statistics as they were
    for k, v in model.backbone.state_dict().items():
        assert torch.equal(v, frozen[k]), k
    assert not model.backbone.training
    # only the head is measured and charted
    scalars = run.scalars()
    assert run.by_name("UpdateRatioMonitor").figures["parameters_measured"] == 4
    assert not any(t.startswith("recipe/grad_norm/backbone") for t in scalars)
    # the frozen first conv is shown, but "still as noisy as at init" would be a false statement
    filters = run.by_name("FirstLayerFilterMonitor")
    assert filters.figures["layer"] == "backbone.0" and not filters.figures["judged"]
    assert "frozen" in filters.figures["note"]


# ---------------------------------------------------------------------------- 7. dict from the step
def test_training_step_returns_a_dict(tmp_path):
    L.seed_everything(0, verbose=False)
    run = fit_suite(tmp_path, DictStep(mlp()), *mlp_data())
    assert_healthy(run, skipped={"FirstLayerFilterMonitor"})
    assert run.by_name("LossAtInitCheck").figures["loss"] == pytest.approx(1.386, rel=0.2)


# ---------------------------------------------------------------------------- 8. batch layouts
def test_dict_batches_with_unusual_keys_and_getters(tmp_path):
    L.seed_everything(0, verbose=False)
    train, val = mlp_data(dict_keys=("feats_in", "answer"))
    model = Classifier(mlp(), x_key="feats_in", y_key="answer")
    suite = {"get_input": lambda b: b["feats_in"], "get_target": lambda b: b["answer"]}
    run = fit_suite(tmp_path, model, train, val, suite=suite)
    assert_healthy(run, skipped={"FirstLayerFilterMonitor"})


def test_dict_batches_with_unusual_keys_without_getters(tmp_path):
    L.seed_everything(0, verbose=False)
    train, val = mlp_data(dict_keys=("feats_in", "answer"))
    run = fit_suite(tmp_path, Classifier(mlp(), x_key="feats_in", y_key="answer"), train, val)
    # no key names the input: the float tensor is read as the input, so every reader measures
    assert_healthy(run, skipped={"FirstLayerFilterMonitor"})


def test_tuple_with_a_metadata_dict_first(tmp_path):
    L.seed_everything(0, verbose=False)
    x, y = blobs()

    def item(offset):
        return lambda i: (
            {"id": torch.tensor(i + offset), "path": f"file{i + offset}.npy"},
            x[i + offset],
            y[i + offset],
        )

    train, val = split_loaders(ListDataset(len(x) - 64, item(64)), ListDataset(64, item(0)))
    run = fit_suite(tmp_path, MetaTuple(mlp()), train, val)
    # the metadata dict holds no float tensor: (meta, x, y) is read as (x, y)
    assert_healthy(run, skipped={"FirstLayerFilterMonitor"})


def test_custom_dataclass_batch(tmp_path):
    L.seed_everything(0, verbose=False)
    x, y = image_blobs()
    train, val = split_loaders(
        ListDataset(len(x) - 64, lambda i: Sample(x[i + 64], y[i + 64])),
        ListDataset(64, lambda i: Sample(x[i], y[i])),
        collate=collate_samples,
    )
    run = fit_suite(tmp_path, DataclassBatch(cnn()), train, val)
    assert_healthy(run, skipped=set())


# ---------------------------------------------------------------------------- 9. sequences
@pytest.mark.parametrize("net,lr", [(GRUNet, 1e-2), (TinyTransformer, 3e-3)], ids=["gru", "transformer"])
def test_sequence_models_on_token_ids(tmp_path, net, lr):
    L.seed_everything(0, verbose=False)
    x, y = token_blobs()
    run = fit_suite(tmp_path, Classifier(net(), lr=lr), *loaders(x, y, batch_size=16))
    # token ids are shown (label histogram), not judged as feature scales: no recipe/data scalars
    assert_healthy(run, skipped={"FirstLayerFilterMonitor"}, missing={"data"})
    assert run.by_name("DataInspectionCheck").figures["input_dtype"] == "int64"


# ---------------------------------------------------------------------------- 10. no validation
@pytest.mark.parametrize("how", ["no_val_dataloader", "limit_val_batches_0"])
def test_validation_step_without_validation(tmp_path, how):
    L.seed_everything(0, verbose=False)
    train, val = mlp_data()
    if how == "no_val_dataloader":
        run = fit_suite(tmp_path, Classifier(mlp()), train)
    else:
        run = fit_suite(tmp_path, Classifier(mlp()), train, val, limit_val_batches=0)
    assert run.trainer.global_step == 24
    skipped = NEEDS_VALIDATION | {"PredictionDynamicsMonitor", "FirstLayerFilterMonitor"}
    assert_healthy(
        run, skipped, missing={"input_independent", "prediction_dynamics", "ensemble", "train_val"}
    )
    stop = run.by_name("RecipeEarlyStopping")
    assert "val_loss" in run.skips("RecipeEarlyStopping")[0]
    assert stop.figures["stop_cause"] == "max_steps"
    verdict = next(f for f in stop.findings if f.code == "early-stopped")
    assert "improved" not in verdict.message and "never" in verdict.message


def test_misspelled_monitor_still_raises_like_lightning(tmp_path):
    """Only a fit without validation is let off: a metric missing after a validation run is a typo,
    and Lightning's strict EarlyStopping error stands."""
    L.seed_everything(0, verbose=False)
    callbacks = lr.recipe_callbacks(monitor="val_los", print_report=False)
    t = make_trainer(tmp_path, callbacks, logger=None, max_steps=24, max_epochs=100, limit_val_batches=2)
    with pytest.raises(RuntimeError, match="val_los"):
        t.fit(Classifier(mlp()), *mlp_data())


# ---------------------------------------------------------------------------- 11. checkpointing
def test_model_checkpoint_and_max_steps_mid_epoch(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    L.seed_everything(0, verbose=False)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val_loss", save_last=True)
    run = fit_suite(
        tmp_path,
        Classifier(mlp()),
        *mlp_data(),
        extra_callbacks=[ckpt],
        enable_checkpointing=True,
        max_steps=17,
    )
    assert run.trainer.global_step == 17  # 12 batches per epoch: stopped inside the second epoch
    assert_healthy(run, skipped={"FirstLayerFilterMonitor"})
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert {cb.state_key for cb in run.callbacks} <= set(saved["callbacks"])


# ---------------------------------------------------------------------------- 12. pytorch_lightning
def test_standalone_pytorch_lightning_package(tmp_path):
    pytest.importorskip("pytorch_lightning")
    module_cls, make_trainer = pl_classes()
    L.seed_everything(0, verbose=False)
    run = fit_suite(
        tmp_path,
        module_cls(mlp()),
        *mlp_data(),
        trainer_factory=make_trainer,
        log_every_n_steps=4,
    )
    assert type(run.trainer).__module__.startswith("pytorch_lightning")
    assert_healthy(run, skipped={"FirstLayerFilterMonitor"})
    assert (run.logdir / "recipe_report.json").is_file()


# ---------------------------------------------------------------------------- the run is unchanged
def _final_weights(tmp_path: Path, make, data, with_suite: bool, **kw):
    L.seed_everything(123, verbose=False)
    model = make()
    callbacks = (
        lr.recipe_callbacks(
            monitor="val_loss", print_report=False, early_stopping={"restore_best_weights": False}
        )
        if with_suite
        else []
    )
    t = make_trainer(
        tmp_path,
        callbacks,
        logger=None,
        max_steps=24,
        max_epochs=100,
        log_every_n_steps=4,
        limit_val_batches=2,
        **kw,
    )
    t.fit(model, *data())
    return model.state_dict(), torch.get_rng_state()


@pytest.mark.parametrize(
    "case",
    [
        "bf16",
        "accumulate",
        "manual",
        "gan",
        "frozen",
        "no_validation",
        pytest.param("compiled_submodule", marks=pytest.mark.slow),
    ],
)
def test_hard_cases_stay_bit_identical(tmp_path, case):
    """The suite leaves the user's run unchanged on the hard cases too (weights and RNG state)."""
    make, data, kw = {
        "bf16": (lambda: Classifier(cnn()), image_data, {"precision": "bf16-mixed"}),
        "accumulate": (lambda: Classifier(mlp()), mlp_data, {"accumulate_grad_batches": 3}),
        "manual": (lambda: ManualClassifier(mlp()), mlp_data, {}),
        "gan": (TinyGAN, gan_loaders, {}),
        "frozen": (lambda: FrozenBackbone(backbone()), image_data, {}),
        "no_validation": (lambda: Classifier(mlp()), lambda: mlp_data()[:1], {}),
        "compiled_submodule": (lambda: CompiledInside(cnn(), "aot_eager"), image_data, {}),
    }[case]
    torch._dynamo.reset()
    w0, r0 = _final_weights(tmp_path / "plain", make, data, False, **kw)
    w1, r1 = _final_weights(tmp_path / "suite", make, data, True, **kw)
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k
    assert torch.equal(r0, r1)
