"""The probe layer: every step signature Lightning accepts, the one loss reader, the
know-nothing reference, hooks attached and removed together."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_recipe._probe import (
    CHANCE,
    MEAN_PREDICTOR,
    HookSet,
    LossCapture,
    ProbeSkip,
    call_step,
    extract_loss,
    find_loss,
    know_nothing_loss,
)


class Steps(nn.Module):
    def training_step(self, batch):  # one argument, as Lightning allows
        return ("one", batch)

    def validation_step(self, batch, batch_idx, dataloader_idx):  # dataloader_idx without default
        return ("three", batch, batch_idx, dataloader_idx)

    def test_step(self, dataloader_iter):
        batch, batch_idx, dataloader_idx = next(dataloader_iter)
        return ("iter", batch, batch_idx, dataloader_idx)

    def predict_step(self, *args):
        return ("var", *args)


def test_call_step_accepts_every_lightning_signature():
    m = Steps()
    assert call_step(m, "training_step", "b", 4) == ("one", "b")
    assert call_step(m, "validation_step", "b", 4) == ("three", "b", 4, 0)
    assert call_step(m, "test_step", "b", 2) == ("iter", "b", 2, 0)
    assert call_step(m, "predict_step", "b", 1) == ("var", "b", 1)
    with pytest.raises(ValueError, match="`hook` must be one of"):
        call_step(m, "forward", "b")
    with pytest.raises(ProbeSkip, match="no validation_step"):
        call_step(nn.Linear(1, 1), "validation_step", "b")


def test_find_loss_reads_tensor_dict_and_attribute_and_none():
    loss = torch.tensor(1.5)
    assert find_loss(loss) is loss
    assert find_loss({"loss": loss, "log": 1}) is loss
    assert find_loss(SimpleNamespace(loss=loss, logits=None)) is loss  # Hugging Face style output
    assert find_loss(None) is None and find_loss({"x": 1}) is None
    assert extract_loss(None) is None
    with pytest.raises(ProbeSkip, match="without a tensor under 'loss'"):
        extract_loss({"x": 1})


def test_know_nothing_reference_for_classification_and_regression():
    with LossCapture() as cap:
        F.cross_entropy(torch.randn(8, 10), torch.randint(0, 10, (8,)))
        F.mse_loss(torch.randn(8, 1), torch.full((8, 1), 3.0))
    ce, mse = cap.calls
    loss, kind = know_nothing_loss(ce)
    assert kind == CHANCE and loss.item() == pytest.approx(torch.log(torch.tensor(10.0)).item())
    loss, kind = know_nothing_loss(mse)
    assert kind == MEAN_PREDICTOR and loss.item() == pytest.approx(0.0)


def test_hookset_removes_every_hook_it_attached():
    net = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    seen = []
    with HookSet() as hooks:
        for m in net:
            hooks.forward(m, lambda mod, args, out: seen.append(type(mod).__name__))
        hooks.forward(net, lambda mod, args: seen.append("pre"), pre=True)
        assert len(hooks) == 3
        net(torch.zeros(1, 2))
    assert seen == ["pre", "Linear", "ReLU"]
    net(torch.zeros(1, 2))
    assert len(seen) == 3 and not any(m._forward_hooks or m._forward_pre_hooks for m in net.modules())
