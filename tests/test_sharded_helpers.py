"""lightning_recipe._sharded without a process group: nothing sharded means no collective and no
change of behaviour (the 2-process FSDP2 runs are in tests/test_sharded.py)."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from lightning_recipe import _probe, _sharded
from models import mlp


class NoCollectives:
    """A strategy that fails the test if anything calls a collective on it."""

    model = None  # read to find the module that owns the parameters

    def __getattr__(self, name):
        raise AssertionError(f"collective or strategy call {name!r} on an unsharded model")


def test_unsharded_model_is_left_alone():
    net = mlp()
    trainer = SimpleNamespace(strategy=NoCollectives(), global_step=0, callbacks=[])
    assert _sharded.kind(net) is None
    assert not _sharded.gather_point(trainer, net)
    with _sharded.gathered(trainer, net, need=True):
        clone = _probe.copy_module(net)
    assert not _sharded.is_gathered(net)
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), clone.parameters()))
    p = next(net.parameters())
    assert _sharded.local(p) is p and _sharded.full(p) is p and _sharded.shards(p, None) == 1
    norms = torch.tensor([3.0, 4.0])
    assert torch.equal(_sharded.share(norms, [p, p], None), torch.tensor([9.0, 16.0]))
    assert _sharded.plain_type(net[0]) is nn.Linear


def test_local_state_round_trip_and_ema():
    net = mlp()
    kept = {k: v.clone() for k, v in _sharded.local_state(net).items()}
    ema = _sharded.ema_update_local(None, net, 0.5)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    ema = _sharded.ema_update_local(ema, net, 0.5)
    assert torch.allclose(ema["0.weight"], kept["0.weight"] + 0.5)
    _sharded.restore_local_state(net, kept)
    assert torch.equal(net[0].weight, kept["0.weight"])
    assert _sharded.full_state(net).keys() == net.state_dict().keys()


def test_copy_budget_from_environment(monkeypatch):
    monkeypatch.setenv(_sharded.ENV_BUDGET, "12.5")
    assert _sharded.copy_budget_mb() == 12.5
    monkeypatch.setenv(_sharded.ENV_BUDGET, "lots")
    assert _sharded.copy_budget_mb() == _sharded.DEFAULT_COPY_BUDGET_MB


@pytest.mark.parametrize("name", ["ModelParallelStrategy", "FSDPStrategy", "DeepSpeedStrategy"])
def test_sharded_strategy_by_name(name):
    strategy = type(name, (), {})()
    assert _sharded.sharded_strategy(SimpleNamespace(strategy=strategy))
    assert not _sharded.sharded_strategy(SimpleNamespace(strategy=type("DDPStrategy", (), {})()))
