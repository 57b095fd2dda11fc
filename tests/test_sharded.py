"""The suite under sharded training: FSDP2 (``ModelParallelStrategy``, 2 CPU processes, gloo) sees
the whole model and gives the same figures and verdicts as DDP; ``FSDPStrategy`` and DeepSpeed on
two GPUs (skipped without them).

Each scenario runs ``tests/sharded/run_suite.py`` in a subprocess with a timeout (a hang fails
the test) and reads what every rank saw from the JSON files it writes; any ``internal-error``
finding on any rank fails the scenario, as in ``tests/test_ddp.py``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parent / "sharded" / "run_suite.py"
pytestmark = pytest.mark.slow

#: rendezvous variables an in-process test may leave in os.environ (never handed to the ranks)
_DIST_ENV = (
    "MASTER_ADDR",
    "MASTER_PORT",
    "WORLD_SIZE",
    "RANK",
    "LOCAL_RANK",
    "NODE_RANK",
    "LOCAL_WORLD_SIZE",
)
#: the suite as the scenarios run it: everything, early stopping on
SUITE = {"monitor": "val_loss"}
#: checks that run the model on an unsharded copy: none may skip under FSDP2
COPY_CHECKS = (
    "LossAtInitCheck",
    "BatchIndependenceCheck",
    "GradientCheck",
    "OverfitBatchCheck",
    "ModelLintCheck",
    "InputIndependentBaseline",
    "PredictionDynamicsMonitor",
    "CheckpointEnsemble",
)


def run(out: Path, cfg: dict, timeout: int = 300) -> dict[int, dict]:
    # a fresh rendezvous: never a MASTER_PORT/rank another test of this process left in the env
    env = {k: v for k, v in os.environ.items() if k not in _DIST_ENV}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(out), json.dumps(cfg)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    ranks = {
        r: json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1) if (out / f"rank{r}.json").exists()
    }
    assert proc.returncode == 0 and set(ranks) == {0, 1}, proc.stderr[-3000:]
    broken = [
        (r, f["message"]) for r, d in ranks.items() for f in d["findings"] if f["code"] == "internal-error"
    ]
    assert broken == [], broken
    return ranks


def codes(rank: dict, loud: bool = True) -> set[str]:
    return {f["code"] for f in rank["findings"] if not loud or f["severity"] != "info"}


def skipped(rank: dict) -> dict[str, str]:
    return {f["source"]: f["message"] for f in rank["findings"] if f["code"] == "check-skipped"}


@pytest.fixture(scope="module")
def healthy(tmp_path_factory):
    base = tmp_path_factory.mktemp("sharded")
    fsdp = run(base / "fsdp2", {"strategy": "fsdp2", "suite": SUITE, "check_helpers": True, "exports": True})
    ddp = run(base / "ddp", {"strategy": "ddp", "suite": SUITE, "exports": True})
    return fsdp, ddp, base


def histograms(out: Path) -> dict[str, tuple]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(next((out / "tb").rglob("events.out.tfevents.*")).parent), {"histograms": 0})
    acc.Reload()
    tags = [t for t in acc.Tags()["histograms"] if t.startswith(("recipe/weights/", "recipe/gradients/"))]
    return {t: tuple(round(v, 5) for v in _h(acc.Histograms(t)[-1].histogram_value)) for t in tags}


def _h(h) -> tuple:
    return h.num, h.min, h.max, h.sum


def test_fsdp2_healthy_is_quiet_and_nothing_is_blind(healthy):
    fsdp, _, _ = healthy
    for r in (0, 1):
        assert codes(fsdp[r]) == set(), fsdp[r]["findings"]
        blind = {k: v for k, v in skipped(fsdp[r]).items() if k in COPY_CHECKS or "Early" in k}
        assert blind == {}, blind
        figures = fsdp[r]["figures"]
        assert figures["UpdateRatioMonitor"]["parameters_measured"] == 6
        assert figures["GradientMonitor"]["logging_steps"] >= 3
        assert figures["OverfitBatchCheck"]["best_loss"] < 0.05
        assert figures["RecipeEarlyStopping"]["restored_epoch"] == 1


def test_fsdp2_measures_what_ddp_measures(healthy):
    fsdp, ddp, base = healthy
    # weight and gradient histograms are of the whole tensors, as under DDP
    whole, replicated = histograms(base / "fsdp2"), histograms(base / "ddp")
    assert len(whole) >= 9 and whole == replicated
    # FSDP2 with the suite trains exactly the weights of DDP with the suite, which are those of
    # DDP without it (tests/test_ddp.py): the gathers, copies and reshards change nothing
    assert fsdp[0]["checksum"] == fsdp[1]["checksum"] == ddp[0]["checksum"]
    for r in (0, 1):
        a, b = fsdp[r]["figures"], ddp[r]["figures"]
        ur, ur_ddp = a["UpdateRatioMonitor"]["median_ratio"], b["UpdateRatioMonitor"]["median_ratio"]
        assert ur == pytest.approx(ur_ddp, rel=1e-5)
        depth = a["GradientMonitor"]["depth_profile"]["opt0"]["ratio"]
        assert depth == pytest.approx(b["GradientMonitor"]["depth_profile"]["opt0"]["ratio"], rel=1e-5)
        for check, key in (("LossAtInitCheck", "loss"), ("OverfitBatchCheck", "best_loss")):
            assert a[check][key] == pytest.approx(b[check][key], rel=1e-4), (check, key)
        assert a["InputIndependentBaseline"]["gap"] == pytest.approx(
            b["InputIndependentBaseline"]["gap"], rel=1e-4
        )
    assert fsdp[0]["figures"]["UpdateRatioMonitor"] == fsdp[1]["figures"]["UpdateRatioMonitor"]
    assert codes(fsdp[0], loud=False) == codes(ddp[0], loud=False)


def verdict(rank: dict) -> dict:
    (found,) = [f for f in rank["findings"] if f["code"] == "ensemble-evaluated"]
    return found


def test_fsdp2_checkpoint_ensemble_measures_what_ddp_measures(healthy):
    fsdp, ddp, _ = healthy
    # the same verdict, in the same words and numbers, on both ranks
    assert verdict(fsdp[0]) == verdict(fsdp[1])
    ours, theirs = verdict(fsdp[0])["evidence"], verdict(ddp[0])["evidence"]
    assert ours["members"] == theirs["members"] >= 2 and ours["epoch"] == theirs["epoch"]
    for key in ("single", "snapshot_ensemble", "averaged"):
        for metric in ("loss", "accuracy"):
            assert ours[f"{key}_{metric}"] == pytest.approx(theirs[f"{key}_{metric}"], rel=1e-5), key
    # kept sharded between evaluations: each rank holds half of every snapshot and of the EMA
    for r in (0, 1):
        mem = fsdp[r]["figures"]["CheckpointEnsemble"]["sharded"]
        assert mem["ema_shards_mb"] == pytest.approx(mem["full_weights_mb"] / 2, rel=0.1)
        stored = ours["members"] - 1  # at the evaluation: the current model is not stored yet
        assert mem["snapshot_shards_mb"] == pytest.approx(stored * mem["full_weights_mb"] / 2, rel=0.1)
        # handed back unsharded, built from whole tensors: they measure what DDP's measure
        out, ref = fsdp[r]["exports"], ddp[r]["exports"]
        assert out["unsharded"] and out["checkpoint_matches"] and out["members"] == ref["members"]
        for key in ("averaged_loss", "ensemble_loss"):
            assert out[key] == pytest.approx(ref[key], rel=1e-5), key
        # ensemble() averages the members the last evaluation averaged, under both strategies
        for got, measured in ((out, ours), (ref, theirs)):
            assert got["ensemble_loss"] == pytest.approx(measured["snapshot_ensemble_loss"], rel=1e-5)
            assert got["averaged_loss"] == pytest.approx(measured["averaged_loss"], rel=1e-5)


def test_fsdp2_checkpoint_ensemble_beyond_the_budget_is_skipped_alike(tmp_path):
    # room for the one-shot checks' copy (1x the weights), not for the ensemble's 4 copies
    cfg = {
        "strategy": "fsdp2",
        "suite": SUITE,
        "epochs": 1,
        "env": {"LIGHTNING_RECIPE_SHARDED_COPY_MB": "0.015"},
    }
    ranks = run(tmp_path, cfg)
    skips = [skipped(ranks[r]) for r in (0, 1)]
    assert skips[0] == skips[1]
    message = skips[0]["CheckpointEnsemble"]
    assert "4 unsharded copies" in message and "MB" in message, message
    assert not any(k in COPY_CHECKS[:-1] for k in skips[0]), skips[0]  # the checks still ran
    for r in (0, 1):
        assert "ensemble-evaluated" not in codes(ranks[r], loud=False)


def test_sharded_states_and_ema_rebuild_whole_tensors(healthy):
    fsdp, _, _ = healthy
    for r in (0, 1):
        helpers = fsdp[r]["helpers"]
        assert helpers["kind"] == "dtensor"
        assert helpers["state_diff"] == 0.0 and helpers["ema_diff"] < 1e-6
        assert helpers["local_fraction"] == pytest.approx(0.5, abs=0.05)  # each rank keeps half


def test_fsdp2_too_low_learning_rate_same_verdict_as_ddp(tmp_path):
    cfg = {"lr": 1e-7, "epochs": 2, "suite": SUITE}
    # one FSDP2 group for the whole model (fully_shard on the root only): after validation it
    # stays unsharded, with whole tensors registered, until the next forward
    fsdp = run(tmp_path / "fsdp2", {**cfg, "strategy": "fsdp2", "wrap": "root"})
    ddp = run(tmp_path / "ddp", {**cfg, "strategy": "ddp"})
    for r in (0, 1):
        assert "update-ratio-low" in codes(fsdp[r])
        assert codes(fsdp[r]) == codes(ddp[r])
    assert fsdp[0]["figures"]["UpdateRatioMonitor"]["median_ratio"] == pytest.approx(
        ddp[0]["figures"]["UpdateRatioMonitor"]["median_ratio"], rel=1e-4
    )


def test_fsdp2_too_high_learning_rate_is_reported_on_every_rank(tmp_path):
    # with FSDP2's bf16 MixedPrecisionPolicy, as sharded users run it
    cfg = {"strategy": "fsdp2", "mp": "bf16", "optimizer": "sgd", "lr": 50.0, "epochs": 2, "suite": SUITE}
    ranks = run(tmp_path, cfg)
    assert codes(ranks[0]) == codes(ranks[1])
    assert codes(ranks[0]) & {"update-ratio-high", "loss-diverged", "non-finite-loss"}, ranks[0]["findings"]
    assert ranks[0]["stopped_epoch"] == ranks[1]["stopped_epoch"]
    assert ranks[0]["checksum"] == ranks[1]["checksum"] or ranks[0]["checksum"] != ranks[0]["checksum"]


def test_fsdp2_detached_block_same_verdict_as_ddp(tmp_path):
    cfg = {"detached": True, "epochs": 1, "suite": SUITE}
    fsdp = run(tmp_path / "fsdp2", {**cfg, "strategy": "fsdp2"})
    ddp = run(tmp_path / "ddp", {**cfg, "strategy": "ddp_find_unused_parameters_true"})
    for r in (0, 1):
        assert "params-not-updating" in codes(fsdp[r]), fsdp[r]["findings"]
        assert codes(fsdp[r]) == codes(ddp[r])


def test_fsdp2_cnn_resumes_from_sharded_checkpoint(tmp_path):
    cfg = {"strategy": "fsdp2", "model": "cnn", "suite": SUITE}
    first = run(tmp_path / "first", {**cfg, "epochs": 1, "ckpt_dir": str(tmp_path / "ckpt"), "exports": True})
    resumed = run(
        tmp_path / "resumed", {**cfg, "epochs": 2, "ckpt_path": str(tmp_path / "ckpt" / "last.ckpt")}
    )
    for ranks in (first, resumed):
        for r in (0, 1):
            assert codes(ranks[r]) == set(), ranks[r]["findings"]
            assert ranks[r]["figures"]["FirstLayerFilterMonitor"]["type"] == "Conv2d"
    assert resumed[0]["global_step"] == 2 * first[0]["global_step"]
    # BatchNorm statistics differ between FSDP2 ranks: the ensemble takes rank zero's, as a
    # distributed checkpoint does, so every rank hands back the same models
    assert first[0]["exports"] == first[1]["exports"] and first[0]["exports"]["unsharded"]
    for r in (0, 1):
        assert verdict(resumed[r])["evidence"]["step"] == resumed[r]["global_step"]
        # the shards were not in the checkpoint: said once, the ensemble starts again
        assert "resumed from a sharded run" in skipped(resumed[r])["CheckpointEnsemble"]
    assert resumed[0]["checksum"] == resumed[1]["checksum"]


# ---------------------------------------------------------------------------- GPU strategies
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")


@two_gpus
@pytest.mark.parametrize("strategy", ["fsdp", "deepspeed2", "deepspeed3"])
def test_gpu_sharded_strategies(tmp_path, strategy):
    if strategy.startswith("deepspeed") and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("deepspeed is not installed")
    ranks = run(tmp_path, {"strategy": strategy, "suite": SUITE, "epochs": 1}, timeout=600)
    for r in (0, 1):
        assert codes(ranks[r]) == set(), ranks[r]["findings"]
    assert ranks[0]["figures"]["UpdateRatioMonitor"] == ranks[1]["figures"]["UpdateRatioMonitor"]
    low = run(tmp_path / "low", {"strategy": strategy, "lr": 1e-7, "suite": SUITE, "epochs": 1}, timeout=600)
    assert "update-ratio-low" in codes(low[0]) and codes(low[0]) == codes(low[1])
