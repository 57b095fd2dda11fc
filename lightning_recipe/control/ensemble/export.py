"""What is handed to the user: the snapshot ensemble as an instance of their LightningModule
class, a copy with given weights, and the averaged weights as a Lightning checkpoint."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_recipe import _sharded
from lightning_recipe._probe import copy_module
from lightning_recipe.control.ensemble.predictions import LOG_PROB, average, to_log_space
from lightning_recipe.control.ensemble.snapshots import Snapshot
from lightning_recipe.report import log_dir_of

#: the averaged checkpoint's file name under the log directory (``averaged_path=None``)
AVERAGED_FILE = "recipe_averaged.ckpt"


def user_copy(template: nn.Module, state: Mapping[str, Tensor]) -> nn.Module:
    """A copy of the user's module (its own class, ``log`` working, no trainer) with ``state``
    (whole tensors; a sharded ``template`` is copied unsharded from them, without communication)."""
    if _sharded.kind(template) is not None:
        with _sharded.adopted(template, state):
            clone = copy_module(template)
    else:
        clone = copy_module(template)
    for m in clone.modules():
        m.__dict__.pop("log", None)
        m.__dict__.pop("log_dict", None)
    # Lightning's forward redirection (DDP, FSDP, DeepSpeed) leaves the module's own ``forward``
    # bound on the instance; dropped, so a subclass's forward (the snapshot ensemble's) is used
    bound = clone.__dict__.get("forward")
    if getattr(bound, "__func__", None) is getattr(type(clone), "forward", None):
        del clone.__dict__["forward"]
    clone.load_state_dict(state)
    return clone


def snapshot_ensemble(template: nn.Module, snapshots: list[Snapshot], loss_name: str | None) -> nn.Module:
    """The user's class whose ``forward`` averages the snapshots' predictions (``loss_name``: the
    loss the predictions go to); the members are in ``.recipe_members``, the other weights are
    the newest snapshot's. In eval mode."""
    members = [user_copy(template, s.load()).eval() for s in snapshots]
    shell = user_copy(template, snapshots[-1].load())
    cls = type(shell)
    ens_cls = type(f"{cls.__name__}SnapshotEnsemble", (cls,), {"forward": _ensemble_forward})
    shell.__class__ = ens_cls
    shell.recipe_members = nn.ModuleList(members)
    shell.recipe_loss_name = loss_name
    return shell.eval()


def _ensemble_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    outs = [m(*args, **kwargs) for m in self.recipe_members]
    first = outs[0]
    if not isinstance(first, Tensor) or not first.is_floating_point():
        return _mean_structure(outs)
    name = getattr(self, "recipe_loss_name", None) or "mse_loss"
    if name in LOG_PROB:  # forward may return logits or log-probs: log_softmax reads both alike
        name = "cross_entropy"
    stacked = torch.stack([to_log_space(name, o) for o in outs])
    return average(name, stacked, list(range(len(outs))), first)


def _mean_structure(outs: list[Any]) -> Any:
    first = outs[0]
    if isinstance(first, Tensor):
        return (
            torch.stack([o.float() for o in outs]).mean(dim=0).to(first.dtype)
            if first.is_floating_point()
            else first
        )
    if isinstance(first, Mapping):
        return {k: _mean_structure([o[k] for o in outs]) for k in first}
    if isinstance(first, (list, tuple)):
        items = [_mean_structure([o[i] for o in outs]) for i in range(len(first))]
        return type(first)(items) if isinstance(first, list) else tuple(items)
    return first


def save_averaged(
    trainer: Any, module: nn.Module, state: dict[str, Tensor], path: str | os.PathLike | None
) -> str:
    """Write the averaged weights as a Lightning checkpoint to ``path`` (``None``: the log
    directory's ``recipe_averaged.ckpt``); returns where. Rank zero only: calls no collective."""
    path = os.fspath(path) if path is not None else os.path.join(log_dir_of(trainer), AVERAGED_FILE)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save(lightning_checkpoint(trainer, module, state), path)
    return path


def lightning_checkpoint(trainer: Any, module: nn.Module, state: dict[str, Tensor]) -> dict[str, Any]:
    """A weights-only Lightning checkpoint dict, as ``trainer.save_checkpoint(weights_only=True)``
    builds it, without the collective that call is under DDP."""
    root = type(trainer).__module__.split(".")[0]
    version = getattr(sys.modules.get(root), "__version__", None)
    if version is None:
        import lightning

        version = lightning.__version__
    ckpt: dict[str, Any] = {
        "epoch": int(trainer.current_epoch),
        "global_step": int(trainer.global_step),
        "pytorch-lightning_version": version,
        "state_dict": state,
        "recipe": {"averaged_weights": True},
    }
    hparams = getattr(module, "hparams", None)
    if hparams:
        name = getattr(module, "_hparams_name", None)
        if name is not None:
            ckpt[getattr(module, "CHECKPOINT_HYPER_PARAMS_NAME", "hparams_name")] = name
        ckpt[getattr(module, "CHECKPOINT_HYPER_PARAMS_KEY", "hyper_parameters")] = dict(hparams)
    return ckpt
