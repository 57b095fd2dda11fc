"""CheckpointEnsemble on an FSDP2-sharded model, in this process (``ModelParallelStrategy`` on one
CPU device: DTensor weights, a world of one): shards kept, members rebuilt whole, the same
numbers as Lightning's own validation, unsharded results handed back, and a skip with the memory
it would need beyond the budget. The 2-process runs against DDP are in tests/test_sharded.py."""

import os
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_recipe import _sharded
from lightning_recipe.control.ensemble import CheckpointEnsemble
from models import Classifier, blobs, loaders, mlp, trainer


class FullyShardedClassifier(Classifier):
    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for m in self.net.modules():
            if isinstance(m, nn.Linear):
                fully_shard(m, mesh=mesh)
        fully_shard(self, mesh=mesh)


@pytest.fixture
def process_group():
    """ModelParallelStrategy starts a (one-process) process group and writes MASTER_PORT & co.
    into ``os.environ``; leave neither behind (the 2-process tests' ranks inherit the environment,
    and a port the store of this process may still hold fails them with EADDRINUSE)."""
    saved = dict(os.environ)
    yield
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    os.environ.clear()
    os.environ.update(saved)


def fit_sharded(
    tmp_path,
    ens: CheckpointEnsemble,
    epochs: int = 2,
    extra: list | None = None,
    checkpointing: bool = False,
    ckpt_path: str | None = None,
) -> tuple[Any, Classifier, Any]:
    from lightning.pytorch.strategies import ModelParallelStrategy

    torch.manual_seed(0)
    x, y = blobs(n=128)
    train, val = loaders(x, y, batch_size=16, shuffle=False)
    model = FullyShardedClassifier(mlp(hidden=32), lr=1e-2)
    strategy = ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1)
    t = trainer(
        tmp_path,
        [ens, *(extra or [])],
        logger=None,
        max_epochs=epochs,
        strategy=strategy,
        enable_checkpointing=checkpointing,
    )
    t.fit(model, train, val, ckpt_path=ckpt_path)
    return t, model, val


def val_loss(model: nn.Module, val: Any) -> float:
    x = torch.cat([b[0] for b in val])
    y = torch.cat([b[1] for b in val])
    with torch.no_grad():
        return float(F.cross_entropy(model(x), y))


def test_sharded_snapshots_and_average_measure_and_hand_back_whole_models(tmp_path, process_group):
    ens = CheckpointEnsemble(num_snapshots=2, averaged_path=tmp_path / "avg.ckpt")
    t, model, val = fit_sharded(tmp_path, ens)
    assert _sharded.kind(model) == "dtensor"  # the user's model stays sharded
    assert [f.code for f in ens.findings] == ["ensemble-evaluated"]
    fig = ens.figures
    # the current member is the model Lightning validated
    assert fig["single_loss"] == pytest.approx(float(t.callback_metrics["val_loss"]), rel=1e-6)
    sharded = fig["sharded"]
    assert sharded["sharding"] == "dtensor" and sharded["unsharded_copies"] == 3
    # 3 copies (2 members + the average) were evaluated; 2 snapshots and the EMA were kept sharded
    assert sharded["evaluation_copies_mb"] == pytest.approx(3 * sharded["full_weights_mb"], rel=0.01)
    assert sharded["ema_shards_mb"] == pytest.approx(sharded["full_weights_mb"], rel=0.01)  # world of one
    # what is handed back is unsharded, built from whole tensors, and measures what was measured
    avg, snap = ens.averaged_model(), ens.ensemble()
    for m in (avg, snap):
        assert not any(_sharded.is_dtensor(p) for p in m.parameters())
    assert val_loss(avg, val) == pytest.approx(fig["averaged_loss"], rel=1e-5)
    assert val_loss(snap, val) == pytest.approx(fig["snapshot_ensemble_loss"], rel=1e-5)
    ckpt = torch.load(ens.averaged_path, map_location="cpu", weights_only=False)
    assert all(torch.equal(ckpt["state_dict"][k], v) for k, v in avg.state_dict().items())
    # the callback state holds no rank's shards: the snapshots were made whole at the end of fit
    state = ens.state_dict()
    assert state["sharded_snapshots"] == 0 and all(not s["sharded"] for s in state["snapshots"])


def test_sharded_ensemble_beyond_the_budget_says_what_it_needs(tmp_path, process_group, monkeypatch):
    monkeypatch.setenv(_sharded.ENV_BUDGET, "0.001")
    ens = CheckpointEnsemble(num_snapshots=3)
    fit_sharded(tmp_path, ens, epochs=1)
    (skip,) = [f for f in ens.findings if f.code == "check-skipped"]
    assert skip.evidence["why"] == "memory" and skip.evidence["unsharded_copies"] == 4
    assert skip.evidence["needed_mb"] == pytest.approx(4 * skip.evidence["full_weights_mb"], rel=0.01)
    assert "MB" in skip.message and _sharded.ENV_BUDGET in skip.message
    assert not ens.history and "ensemble-evaluated" not in {f.code for f in ens.findings}
    with pytest.raises(RuntimeError, match="no snapshot"):
        ens.ensemble()


@pytest.mark.parametrize(
    "kwargs",
    [{"evaluate": "fit_end"}, {"selection": "top"}, {"storage": "disk"}],
    ids=["fit_end", "top", "disk"],
)
def test_sharded_ensemble_modes(tmp_path, process_group, kwargs):
    ens = CheckpointEnsemble(num_snapshots=2, averaged_path=False, snapshot_dir=tmp_path / "snaps", **kwargs)
    t, _, val = fit_sharded(tmp_path, ens, epochs=3)
    assert [f.code for f in ens.findings] == ["ensemble-evaluated"]
    assert ens.figures["single_loss"] == pytest.approx(float(t.callback_metrics["val_loss"]), rel=1e-6)
    assert val_loss(ens.ensemble(), val) == pytest.approx(ens.figures["snapshot_ensemble_loss"], rel=1e-5)


def test_sharded_resume_restored_after_fit_start_keeps_evaluating(tmp_path, process_group):
    # ModelParallelStrategy restores the checkpoint after fit start: the average made there stays
    from lightning.pytorch.callbacks import ModelCheckpoint

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)
    first = CheckpointEnsemble(num_snapshots=2, averaged_path=False)
    fit_sharded(tmp_path / "a", first, epochs=1, extra=[ckpt], checkpointing=True)
    ens = CheckpointEnsemble(num_snapshots=2, averaged_path=False)
    t, _, _ = fit_sharded(tmp_path / "b", ens, epochs=2, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert {f.code for f in ens.findings} == {"ensemble-evaluated", "check-skipped"}
    (note,) = [f for f in ens.findings if f.code == "check-skipped"]
    assert "resumed from a sharded run" in note.message
    assert ens.history[-1]["step"] == t.global_step and len(ens.history) == 2
