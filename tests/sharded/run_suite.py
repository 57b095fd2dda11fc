"""Run the recipe suite under 2-process sharded training and dump what each rank saw (for
tests/test_sharded.py).

Usage: python tests/sharded/run_suite.py OUT_DIR CONFIG_JSON

``cfg["strategy"]``: ``"fsdp2"`` (Lightning's ``ModelParallelStrategy(data_parallel_size=2,
tensor_parallel_size=1)`` with ``fully_shard`` in ``configure_model``; runs on CPU with gloo),
``"ddp"`` (the same model replicated, for comparison), ``"fsdp"`` (``FSDPStrategy``, CUDA only) or
``"deepspeed2"`` / ``"deepspeed3"`` (CUDA and deepspeed only). Each rank writes
OUT_DIR/rank{r}.json: findings, figures, final-weight checksum and the warnings it issued.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # this checkout's lightning_recipe

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

import lightning_recipe as lr
from models import Classifier, blobs, cnn, image_blobs, loaders


class Detached(nn.Module):
    """``net`` whose middle block gets no gradient: its output is detached."""

    def __init__(self, net: nn.Sequential) -> None:
        super().__init__()
        self.head, self.block, self.tail = net[:2], net[2:4], net[4:]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(self.block(self.head(x)).detach())


def mlp(d: int = 16, classes: int = 4, hidden: int = 32) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, classes)
    )


class ShardedClassifier(Classifier):
    """Classifier that shards its layers with FSDP2's ``fully_shard`` in ``configure_model``."""

    def __init__(
        self, *args: Any, shard: bool = True, mp: str | None = None, wrap: str = "layers", **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.shard, self.mp, self.wrap = shard, mp, wrap

    def configure_model(self) -> None:
        if not self.shard:
            return
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = self.device_mesh["data_parallel"]
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16) if self.mp == "bf16" else None
        kwargs: dict[str, Any] = {"mesh": mesh}
        if policy is not None:
            kwargs["mp_policy"] = policy
        if self.wrap == "layers":
            for m in self.net.modules():
                if isinstance(m, (nn.Linear, nn.Conv2d)):
                    fully_shard(m, **kwargs)
        fully_shard(self, **kwargs)  # "root": one FSDP group for the whole model


def strategy_of(name: str) -> Any:
    if name == "fsdp2":
        from lightning.pytorch.strategies import ModelParallelStrategy

        return ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    if name == "deepspeed2":
        return "deepspeed_stage_2"
    if name == "deepspeed3":
        return "deepspeed_stage_3"
    return name  # "ddp", "fsdp"


def check_helpers(model: nn.Module) -> dict[str, Any]:
    """lightning_recipe._sharded on the trained sharded model (every rank, same point): shards kept
    and rebuilt whole, a sharded EMA, gathered copies; max abs differences to the truth."""
    from lightning_recipe import _sharded

    truth = {n: _sharded.full(p.detach()).clone() for n, p in model.named_parameters()}
    kept = {n: t.clone() for n, t in _sharded.local_state(model).items()}
    whole = _sharded.full_state(model, kept)
    ema = _sharded.ema_update_local(None, model, 0.9)
    ema = _sharded.ema_update_local(ema, model, 0.9)  # same weights: the average stays put
    ema_whole = _sharded.full_state(model, ema)
    return {
        "kind": _sharded.kind(model),
        "state_diff": max(float((whole[n] - truth[n]).abs().max()) for n in truth),
        "ema_diff": max(float((ema_whole[n] - truth[n]).abs().max()) for n in truth),
        "local_fraction": sum(t.numel() for t in kept.values()) / sum(t.numel() for t in whole.values()),
    }


def ensemble_exports(trainer: Any, val: Any) -> dict[str, Any] | None:
    """What CheckpointEnsemble hands back after fit (every rank): the averaged model, the snapshot
    ensemble and the averaged checkpoint, evaluated on the whole validation set in this process."""
    ens = next((cb for cb in trainer.callbacks if type(cb).__name__ == "CheckpointEnsemble"), None)
    if ens is None or not ens.history:
        return None
    x = torch.cat([b[0] for b in val])
    y = torch.cat([b[1] for b in val])
    avg, snap = ens.averaged_model(), ens.ensemble()
    ckpt = (
        torch.load(ens.averaged_path, map_location="cpu", weights_only=False) if ens.averaged_path else None
    )
    with torch.no_grad():
        return {
            "averaged_loss": float(torch.nn.functional.cross_entropy(avg(x), y)),
            "ensemble_loss": float(torch.nn.functional.cross_entropy(snap(x), y)),
            "members": len(snap.recipe_members),
            "member_losses": [float(torch.nn.functional.cross_entropy(m(x), y)) for m in snap.recipe_members],
            "member_epochs": [s.epoch for s in ens._snapshots],
            "unsharded": not any(hasattr(p, "placements") for m in (avg, snap) for p in m.parameters()),
            "checkpoint_matches": ckpt is not None
            and all(torch.equal(ckpt["state_dict"][k], v) for k, v in avg.state_dict().items()),
        }


def main() -> None:
    out, cfg = Path(sys.argv[1]), json.loads(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    os.environ.update(cfg.get("env", {}))  # before the trainer: the ranks it starts inherit it
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    L.seed_everything(cfg.get("seed", 0), verbose=False)
    strategy = cfg.get("strategy", "fsdp2")
    if cfg.get("model") == "cnn":
        x, y = image_blobs(n=cfg.get("n", 256))
        net: nn.Module = cnn()
    else:
        x, y = blobs(n=cfg.get("n", 256))
        net = mlp()
    if cfg.get("detached"):
        net = Detached(net)
    model = ShardedClassifier(
        net,
        lr=cfg.get("lr", 1e-2),
        optimizer=cfg.get("optimizer", "adam"),
        shard=strategy == "fsdp2",
        mp=cfg.get("mp"),
        wrap=cfg.get("wrap", "layers"),
    )
    train, val = loaders(x, y, batch_size=cfg.get("batch_size", 16), shuffle=cfg.get("shuffle", True))
    suite = cfg.get("suite", {})
    callbacks = lr.recipe_callbacks(**suite) if suite is not None else []
    if cfg.get("ckpt_dir"):
        from lightning.pytorch.callbacks import ModelCheckpoint

        callbacks.append(ModelCheckpoint(dirpath=cfg["ckpt_dir"], save_last=True, save_top_k=0))
    gpu = strategy in ("fsdp", "deepspeed2", "deepspeed3")
    trainer = L.Trainer(
        accelerator="gpu" if gpu else "cpu",
        devices=2,
        strategy=strategy_of(strategy),
        max_epochs=cfg.get("epochs", 2),
        logger=TensorBoardLogger(str(out / "tb"), name="run"),
        callbacks=callbacks,
        log_every_n_steps=cfg.get("log_every_n_steps", 2),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=bool(cfg.get("ckpt_dir")),
        default_root_dir=str(out),
        precision=cfg.get("precision", "32-true"),
    )
    printed = io.StringIO()
    raised = None
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(printed):
        warnings.simplefilter("always")
        try:
            trainer.fit(model, train, val, ckpt_path=cfg.get("ckpt_path"))
        except lr.RecipeError as exc:
            raised = str(exc)
    rank = trainer.global_rank
    checksum = float(
        sum(
            (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().double().sum()
            for p in model.parameters()
        )
    )
    helpers = check_helpers(model) if cfg.get("check_helpers") else None
    exports = ensemble_exports(trainer, val) if cfg.get("exports") and raised is None else None
    result = {
        "helpers": helpers,
        "exports": exports,
        "rank": rank,
        "world_size": trainer.world_size,
        "seconds": time.perf_counter() - start,
        "findings": [f.to_dict() for f in lr.findings(trainer)],
        "figures": {
            type(cb).__name__: cb.figures for cb in trainer.callbacks if isinstance(cb, lr.RecipeCallback)
        },
        "recipe_warnings": [str(w.message) for w in caught if issubclass(w.category, lr.RecipeWarning)],
        "printed_report": "lightning_recipe report" in printed.getvalue(),
        "checksum": checksum,
        "global_step": trainer.global_step,
        "current_epoch": trainer.current_epoch,
        "raised": raised,
        "stopped_epoch": next(
            (cb.stopped_epoch for cb in trainer.callbacks if type(cb).__name__ == "RecipeEarlyStopping"), None
        ),
    }
    (out / f"rank{rank}.json").write_text(json.dumps(result, default=str))
    sys.stdout.write(printed.getvalue())
    if raised is None and torch.distributed.is_initialized():
        torch.distributed.barrier()


if __name__ == "__main__":
    main()
