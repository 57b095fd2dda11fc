"""The suite under 2-process CPU DDP (gloo): no hang, rank-zero-only output, identical decisions,
a bit-identical run, rank-consistent raise, ddp_spawn.

Lightning's ``strategy="ddp"`` relaunches ``sys.argv``, so each scenario runs
``tests/ddp/run_suite.py`` in a subprocess (with a timeout: a hang fails the test) and reads what
every rank saw from the JSON files it writes.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "ddp" / "run_suite.py"
pytestmark = pytest.mark.slow


def run_ddp(
    out: Path, cfg: dict, timeout: int = 300, internal_error_expected: bool = False
) -> tuple[subprocess.CompletedProcess, dict[int, dict]]:
    """Run one scenario; fail if a diagnostic on any rank turned itself off (``internal-error``)."""
    # a fresh rendezvous: never a MASTER_PORT/rank another test of this process left in the env
    dist = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "LOCAL_WORLD_SIZE")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(out), json.dumps(cfg)],
        env={k: v for k, v in os.environ.items() if k not in dist},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    ranks = {}
    for r in (0, 1):
        f = out / f"rank{r}.json"
        if f.exists():
            ranks[r] = json.loads(f.read_text())
    if not internal_error_expected:
        broken = [
            (r, f["message"])
            for r, d in ranks.items()
            for f in d["findings"]
            if f["code"] == "internal-error"
        ]
        assert broken == [], broken
    return proc, ranks


def event_files(out: Path) -> list[Path]:
    return sorted((out / "tb").rglob("events.out.tfevents.*"))


@pytest.fixture(scope="module")
def healthy(tmp_path_factory):
    base = tmp_path_factory.mktemp("ddp")
    cfg = {"model": "cnn", "epochs": 2, "suite": {"monitor": "val_loss"}}
    suite = run_ddp(base / "suite", cfg)
    plain = run_ddp(base / "plain", {**cfg, "suite": None})
    return base, suite, plain


def test_full_suite_runs_without_hang_and_writes_once(healthy):
    base, (proc, ranks), _ = healthy
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert set(ranks) == {0, 1} and ranks[0]["world_size"] == 2
    assert len(event_files(base / "suite")) == 1  # rank zero's only
    assert len(list((base / "suite").rglob("recipe_report.json"))) == 1
    assert ranks[0]["printed_report"] and not ranks[1]["printed_report"]
    assert ranks[1]["recipe_warnings"] == []


def test_healthy_suite_is_silent_on_every_rank(healthy):
    _, (_, ranks), _ = healthy
    for r in (0, 1):
        loud = [f for f in ranks[r]["findings"] if f["severity"] != "info"]
        assert loud == [], (r, loud)


def test_ranks_agree_and_run_is_bit_identical(healthy):
    _, (_, suite), (proc, plain) = healthy
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert suite[0]["checksum"] == suite[1]["checksum"] == plain[0]["checksum"]
    assert suite[0]["global_step"] == suite[1]["global_step"] == plain[0]["global_step"]
    assert suite[0]["current_epoch"] == suite[1]["current_epoch"]
    ur0, ur1 = suite[0]["figures"]["UpdateRatioMonitor"], suite[1]["figures"]["UpdateRatioMonitor"]
    assert ur0 == ur1  # update ratios are identical across ranks by construction (same weights)


def test_error_on_one_rank_stops_every_rank(tmp_path):
    proc, ranks = run_ddp(tmp_path, {"epochs": 1, "nan_rank": 1, "suite": {"on_error": "raise"}})
    assert set(ranks) == {0, 1}, proc.stderr[-3000:]
    assert ranks[1]["raised"].startswith("[bad-input]")
    assert "another rank" in ranks[0]["raised"]
    assert ranks[0]["global_step"] == ranks[1]["global_step"] == 0


def test_divergence_stop_is_identical_on_every_rank(tmp_path):
    cfg = {"epochs": 6, "optimizer": "sgd", "lr": 50.0, "suite": {"monitor": "val_loss"}}
    proc, ranks = run_ddp(tmp_path, cfg)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert ranks[0]["current_epoch"] == ranks[1]["current_epoch"] < 5
    assert ranks[0]["stopped_epoch"] == ranks[1]["stopped_epoch"]
    assert ranks[0]["checksum"] == ranks[1]["checksum"]  # same restored weights
    codes = {f["code"] for f in ranks[0]["findings"]}
    assert codes & {"loss-diverged", "non-finite-loss", "update-ratio-high"}


def test_ddp_spawn(tmp_path):
    proc, ranks = run_ddp(tmp_path, {"epochs": 1, "strategy": "ddp_spawn", "scale": 100.0, "suite": {}})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(event_files(tmp_path)) == 1
    report = json.loads(next(tmp_path.rglob("recipe_report.json")).read_text())
    assert report["world_size"] == 2 and "DataInspectionCheck" in report["figures"]
    assert "input-not-normalized" in {f["code"] for f in report["findings"]}
    assert ranks[0]["findings"] == report["findings"]  # findings(trainer) in the main process


def test_train_val_overlap_is_counted_across_ranks(tmp_path):
    """Each rank sees half the training and half the validation data: the 48 shared samples are
    found only when the fingerprints are gathered across ranks, and every rank counts them all."""
    proc, ranks = run_ddp(tmp_path, {"epochs": 1, "val_from_train": 48, "suite": {}})
    assert proc.returncode == 0, proc.stderr[-3000:]
    for r in (0, 1):
        hits = [f for f in ranks[r]["findings"] if f["code"] == "train-val-overlap"]
        assert [f["severity"] for f in hits] == ["warning"], (r, ranks[r]["findings"])
        assert hits[0]["evidence"]["shared"] == 48 and hits[0]["evidence"]["val_samples"] == 48
    assert ranks[1]["recipe_warnings"] == []
    assert ranks[0]["figures"]["ClassPriorCheck"]["labels"] == 192  # counts summed over ranks
