"""A run killed and resumed from its checkpoint continues its charts and findings as if it had
never stopped: run A trains N epochs straight with the full suite; run B trains K < N epochs with
``ModelCheckpoint(save_last=True)``, then a new Trainer with new callbacks resumes it from
``last.ckpt`` to N epochs, logging into the same TensorBoard version directory.

Bit-identical weights are asserted only where plain Lightning gives them
(:func:`test_plain_lightning_resume_is_bit_identical_without_randomness`): Lightning does not
restore the global RNG state, so a shuffling DataLoader or dropout makes even a plain resumed run
differ from a straight one. The scenarios therefore use ``shuffle=False`` and no dropout.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

import lightning_recipe as lr
from lightning_recipe.checks.base import FirstBatchCheck
from lightning_recipe.checks.model_lint import ModelLintCheck
from lightning_recipe.report import load_report
from lightning_recipe.suite import SUITE
from models import Classifier, ManualClassifier, blobs, cnn, image_blobs, loaders, mlp

N, K = 6, 2  # epochs straight / before the interruption
BATCHES = 12  # per epoch (192 training samples, batches of 16)
LOG_EVERY = 5  # does not divide the epoch: the interruption falls inside a logging interval


class Broken(Classifier):
    """Inputs far from normalised, labels shuffled apart from the inputs, a layer that is used in
    ``forward`` but left out of the optimizer: findings both before and after the interruption."""

    def __init__(self) -> None:
        super().__init__(mlp(), lr=1e-2)
        self.extra = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.extra(self.net(x))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.net.parameters(), lr=self.lr)


def _scenario(name: str) -> tuple[Any, Any, bool]:
    """(model factory, (train, val) factory, has validation)."""
    if name == "slow_cnn":
        # a low learning rate: the 5x5 first-layer filters are still noisy at the interruption and at
        # the end, so FirstLayerFilterMonitor's end-of-training verdict exists on both sides
        model = lambda: Classifier(cnn5(dropout=0.0), lr=3e-4)  # noqa: E731
        return model, lambda: loaders(*image_blobs(), 16, shuffle=False), True
    if name == "broken_mlp":

        def data():
            x, y = blobs()
            y = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(1))]
            return loaders(x * 30, y, 16, shuffle=False)

        return Broken, data, True
    if name == "manual":
        return lambda: ManualClassifier(mlp()), lambda: loaders(*blobs(), 16, shuffle=False), True
    if name == "no_validation":
        return lambda: Classifier(mlp()), lambda: loaders(*blobs(), 16, shuffle=False), False
    raise ValueError(name)


SCENARIOS = ["slow_cnn", "broken_mlp", "manual", "no_validation"]


def cnn5(dropout: float = 0.0) -> nn.Module:
    """``models.cnn`` with a 5x5 first convolution, whose filters FirstLayerFilterMonitor judges
    (its end-of-training verdict is then part of what a resumed run must not repeat)."""
    net = cnn(dropout=dropout)
    net[0] = nn.Conv2d(1, 8, 5, padding=2, bias=False)
    return net


@dataclass
class Fit:
    trainer: Any
    callbacks: list
    model: Any
    root: Path

    @property
    def logdir(self) -> Path:
        return self.root / "run" / "version_0"


def fit(
    root: Path, name: str, epochs: int, ckpt_path: str | None = None, suite: bool = True, before: Any = None
) -> Fit:
    L.seed_everything(0, verbose=False)
    make_model, make_data, has_val = _scenario(name)
    model = make_model()
    train, val = make_data()
    callbacks = lr.recipe_callbacks(monitor="val_loss", print_report=False) if suite else []
    if before is not None:
        before(callbacks)
    t = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=epochs,
        logger=TensorBoardLogger(str(root), name="run", version=0),
        callbacks=[*callbacks, ModelCheckpoint(dirpath=str(root / "ckpt"), save_last=True, save_top_k=0)],
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=LOG_EVERY,
        limit_val_batches=2,
    )
    t.fit(model, train, val if has_val else None, ckpt_path=ckpt_path)
    return Fit(t, callbacks, model, root)


@dataclass
class Resumed:
    straight: Fit
    first: Fit
    resumed: Fit
    reruns: Counter


def _spy_one_shot(callbacks: list, reruns: Counter) -> None:
    """Count every call of the one-shot checks' measurements on the resumed run's callbacks."""
    for cb in callbacks:
        if isinstance(cb, FirstBatchCheck):
            method = "check"
        elif isinstance(cb, ModelLintCheck):
            method = "static_check"
        else:
            continue
        real = getattr(cb, method)

        def spy(*args: Any, _real: Any = real, _name: str = type(cb).__name__, **kwargs: Any) -> Any:
            reruns[_name] += 1
            return _real(*args, **kwargs)

        setattr(cb, method, spy)


_CACHE: dict[str, Resumed] = {}


@pytest.fixture(params=SCENARIOS)
def resumed(request, tmp_path_factory) -> Resumed:
    name = request.param
    if name not in _CACHE:
        root = tmp_path_factory.mktemp(name)
        straight = fit(root / "a", name, N)
        first = fit(root / "b", name, K)
        reruns: Counter = Counter()
        last = str(root / "b" / "ckpt" / "last.ckpt")
        again = fit(root / "b", name, N, ckpt_path=last, before=lambda cbs: _spy_one_shot(cbs, reruns))
        _CACHE[name] = Resumed(straight, first, again, reruns)
    return _CACHE[name]


# ---------------------------------------------------------------------------- the plain baseline
def test_plain_lightning_resume_is_bit_identical_without_randomness(tmp_path):
    a = fit(tmp_path / "a", "slow_cnn", N, suite=False)
    fit(tmp_path / "b", "slow_cnn", K, suite=False)
    b = fit(tmp_path / "b", "slow_cnn", N, ckpt_path=str(tmp_path / "b" / "ckpt" / "last.ckpt"), suite=False)
    for k, v in a.model.state_dict().items():
        assert torch.equal(v, b.model.state_dict()[k]), k


# ---------------------------------------------------------------------------- the resumed run
def test_final_weights_equal_the_straight_run(resumed):
    a, b = resumed.straight.model.state_dict(), resumed.resumed.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert resumed.resumed.trainer.global_step == resumed.straight.trainer.global_step


def test_one_shot_checks_do_not_run_again(resumed):
    assert resumed.first.trainer.global_step == K * BATCHES
    assert sum(resumed.reruns.values()) == 0, resumed.reruns
    steps = {f.step for f in lr.findings(resumed.resumed.trainer) if f.source.endswith("Check")}
    assert all(s <= K * BATCHES for s in steps)  # every check finding comes from before the interruption


def test_findings_are_those_of_the_straight_run(resumed):
    a = [(f.source, f.code, f.severity.value, f.step) for f in lr.findings(resumed.straight.trainer)]
    b = [(f.source, f.code, f.severity.value, f.step) for f in lr.findings(resumed.resumed.trainer)]
    assert Counter(b) == Counter(a)  # none duplicated, none lost, at the same steps
    messages_a = {(f.source, f.code, f.step): f.message for f in lr.findings(resumed.straight.trainer)}
    for f in lr.findings(resumed.resumed.trainer):
        assert f.message == messages_a[(f.source, f.code, f.step)]
    report = load_report(resumed.resumed.logdir)
    assert len(report["findings"]) == len(a)


@pytest.mark.parametrize("resumed", ["broken_mlp"], indirect=True)
def test_broken_run_has_findings_on_both_sides_of_the_interruption(resumed):
    steps = Counter(
        (f.code, f.step > K * BATCHES)
        for f in lr.findings(resumed.resumed.trainer)
        if f.severity.value != "info"
    )
    assert steps[("input-not-normalized", False)] == 1 and steps[("params-not-updating", False)] == 1
    # found after the interruption only because the validation-run counters and streaks continued
    assert steps[("input-independent", True)] == 1


def _comparable(state: Any, path: str = "") -> Any:
    """A state_dict with what legitimately differs between two runs left out: wall-clock
    timings, the per-run id and the file paths that contain the run's directory."""
    if isinstance(state, dict):
        return {
            k: _comparable(v, f"{path}/{k}")
            for k, v in state.items()
            if k not in ("seconds", "run_id", "averaged_checkpoint", "best_weights_path", "path")
        }
    if isinstance(state, (list, tuple)):
        return [_comparable(v, path) for v in state]
    return state


def _assert_same(a: Any, b: Any, path: str) -> None:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor), path
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), (path, set(a) ^ set(b))
        for k in a:
            _assert_same(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), (path, a, b)
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        # the loss curve adds the carried-over part of an interval on the host (float64) instead
        # of in one float32 device sum: equal to ~1e-7
        assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-6, abs=1e-12), path
    else:
        assert a == b, (path, a, b)


def test_every_callback_state_continues_instead_of_resetting(resumed):
    for a, b in zip(resumed.straight.callbacks, resumed.resumed.callbacks):
        assert type(a) is type(b)
        _assert_same(_comparable(a.state_dict()), _comparable(b.state_dict()), type(a).__name__)
    by_name = {type(cb).__name__: cb for cb in resumed.resumed.callbacks}
    stop = by_name["RecipeEarlyStopping"]
    straight = {type(cb).__name__: cb for cb in resumed.straight.callbacks}["RecipeEarlyStopping"]
    assert (stop.wait_count, stop.best_epoch, stop.stopped_epoch) == (
        straight.wait_count,
        straight.best_epoch,
        straight.stopped_epoch,
    )
    if resumed is not _CACHE.get("no_validation"):
        ensemble = by_name["CheckpointEnsemble"]
        straight_runs = resumed.straight.trainer.current_epoch  # early stopping may end it before N
        assert K < len(ensemble.history) == straight_runs
        assert len(ensemble._snapshots) == ensemble.num_snapshots
        assert by_name["InputIndependentBaseline"]._runs == straight_runs
    last = resumed.resumed.trainer.global_step
    for name in ("UpdateRatioMonitor", "ActivationMonitor", "GradientMonitor", "LossCurveMonitor"):
        assert by_name[name]._last_logged_step == (last // LOG_EVERY) * LOG_EVERY, name


def _events(logdir: Path) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """Every recipe/ scalar, histogram and image event of a run directory, all event files
    included and nothing purged (a restarted writer's steps are kept as written)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(
        str(logdir),
        size_guidance={"scalars": 0, "histograms": 0, "images": 0, "tensors": 0},
        purge_orphaned_data=False,
    )
    acc.Reload()
    tags = acc.Tags()
    out: dict[str, dict[str, list[tuple[int, float]]]] = {"scalars": {}, "histograms": {}, "images": {}}
    for tag in tags["scalars"]:
        if tag.startswith("recipe/"):
            out["scalars"][tag] = [(e.step, e.value) for e in acc.Scalars(tag)]
    for tag in tags["histograms"]:
        if tag.startswith("recipe/"):
            out["histograms"][tag] = [(e.step, e.histogram_value.sum) for e in acc.Histograms(tag)]
    for tag in tags["images"]:
        if tag.startswith("recipe/"):
            out["images"][tag] = [(e.step, 0.0) for e in acc.Images(tag)]
    return out


def test_tensorboard_steps_continue_without_repeats(resumed):
    # both halves of B wrote into the same version directory (two event files)
    assert len(list(resumed.resumed.logdir.glob("events.out.tfevents.*"))) == 2
    a, b = _events(resumed.straight.logdir), _events(resumed.resumed.logdir)
    interrupted = K * BATCHES
    for kind in a:
        assert a[kind].keys() == b[kind].keys(), (kind, set(a[kind]) ^ set(b[kind]))
        for tag, events in b[kind].items():
            steps = [s for s, _ in events]
            assert len(steps) == len(set(steps)), f"{tag} repeats steps {steps}"
            straight = dict(a[kind][tag])
            extra = set(steps) - set(straight)
            # the one point the straight run has no twin of: the interrupted run's last, partial
            # loss-curve interval, logged when its training ended
            assert extra <= ({interrupted} if tag.startswith(("recipe/loss/", "recipe/lr/")) else set()), (
                tag,
                sorted(extra),
            )
            assert set(straight) <= set(steps), (tag, sorted(set(straight) - set(steps)))
            if kind == "scalars":
                for step, value in events:
                    if step in straight:
                        assert value == pytest.approx(straight[step], rel=1e-5, abs=1e-7), (tag, step)


#: findings that sum up a finished fit: a resumed fit makes its own, so loading drops them
END_OF_FIT = ("ensemble-evaluated", "early-stopped", "noisy-filters")


def _end_of_fit(finding: dict) -> bool:
    evidence = finding.get("evidence") or {}
    return (
        finding["code"] in END_OF_FIT
        or bool(evidence.get("end_of_fit"))
        or evidence.get("why") == "no evaluation"
    )


def test_state_round_trips_through_load_state_dict(resumed):
    """What ``state_dict`` saves, ``load_state_dict`` reads back (a fresh callback loads it and
    saves the same, end-of-fit verdicts aside), and it survives a ``weights_only`` load."""
    overrides = {"early_stopping": {"monitor": "val_loss"}}
    for cb in resumed.resumed.callbacks:
        name = next(n for n, cls in SUITE if cls is type(cb))
        fresh = type(cb)(**overrides.get(name, {}))
        state = cb.state_dict()
        fresh.load_state_dict(state)
        expected = {**state, "findings": [f for f in state["findings"] if not _end_of_fit(f)]}
        _assert_same(_comparable(fresh.state_dict()), _comparable(expected), type(cb).__name__)
    blob = torch.load(resumed.resumed.root / "ckpt" / "last.ckpt", weights_only=True)
    assert {cb.state_key for cb in resumed.resumed.callbacks} <= set(blob["callbacks"])


def test_checkpoint_saved_after_fit_resumes_without_a_second_verdict(tmp_path):
    """``trainer.save_checkpoint`` after ``fit`` stores the end-of-fit verdicts (why training
    stopped, the ensemble comparison); continuing from it gives one of each, the new ones."""
    first = fit(tmp_path, "slow_cnn", K)
    path = tmp_path / "after_fit.ckpt"
    first.trainer.save_checkpoint(path)
    again = fit(tmp_path / "more", "slow_cnn", K + 1, ckpt_path=str(path))
    codes = Counter(f.code for f in lr.findings(again.trainer))
    assert codes["early-stopped"] == 1 and codes["ensemble-evaluated"] == 1 and codes["noisy-filters"] == 1
    assert {f.step for f in lr.findings(again.trainer) if f.code == "early-stopped"} == {(K + 1) * BATCHES}
