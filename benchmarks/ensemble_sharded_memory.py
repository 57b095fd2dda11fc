"""Memory of CheckpointEnsemble under FSDP2 vs DDP (2 CPU processes, gloo).

Usage: python benchmarks/ensemble_sharded_memory.py [HIDDEN] [LAYERS] [fsdp2|ddp] [on|off]

Trains an MLP of ``LAYERS`` square ``HIDDEN``-wide Linear layers (each sharded with
``fully_shard`` under FSDP2) for 3 epochs with a validation run after each, with or without
``CheckpointEnsemble(num_snapshots=3)``, and prints per rank: the full weights (MB), what the
ensemble keeps between evaluations (snapshots and EMA, MB), the unsharded copies an evaluation
holds (MB), the process's peak resident memory (MB; compare "on" with "off" for what the
ensemble added at its peak), and the wall time.
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.strategies import ModelParallelStrategy
from sharded_memory import Net as ShardedNet
from sharded_memory import peak_mb
from torch.utils.data import DataLoader, TensorDataset

from lightning_recipe import _sharded
from lightning_recipe.control.ensemble import CheckpointEnsemble

MB = 2**20
VERDICT_KEYS = ("single_loss", "snapshot_ensemble_loss", "averaged_loss")


class Net(ShardedNet):
    """``sharded_memory.Net`` with a validation step (the ensemble is evaluated on it) and SGD."""

    def validation_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("val_loss", loss, sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-2)


def kept_mb(ens: CheckpointEnsemble) -> float:
    """What the ensemble holds between evaluations, on this rank (before fit end)."""
    snaps = sum(sum(t.numel() * t.element_size() for t in (s.state or {}).values()) for s in ens._snapshots)
    if ens._ema is not None:
        avg = ens._ema.nbytes
    else:
        avg = sum(t.numel() * t.element_size() for t in ens._avg.module.state_dict().values())
    return (snaps + avg) / MB


class Probe(L.Callback):
    """Reads what the ensemble keeps right after the last validation run (before train end)."""

    def __init__(self, ens: CheckpointEnsemble | None, out: dict) -> None:
        self.ens, self.out = ens, out

    def on_validation_end(self, trainer, pl_module):
        if self.ens is not None and not trainer.sanity_checking:
            self.out["kept_between_evaluations_mb"] = round(kept_mb(self.ens), 1)


def main() -> None:
    hidden = int(sys.argv[1]) if len(sys.argv) > 1 else 2048
    layers = int(sys.argv[2]) if len(sys.argv) > 2 else 4
    shard = (sys.argv[3] if len(sys.argv) > 3 else "fsdp2") == "fsdp2"
    on = (sys.argv[4] if len(sys.argv) > 4 else "on") == "on"
    warnings.filterwarnings("ignore")
    L.seed_everything(0, verbose=False)
    x, y = torch.randn(128, 16), torch.randint(0, 4, (128,))
    out: dict = {}
    ens = CheckpointEnsemble(num_snapshots=3, averaged_path=False) if on else None
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1) if shard else "ddp",
        max_epochs=3,
        callbacks=[*([ens] if ens else []), Probe(ens, out)],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    model = Net(hidden, layers, shard)
    data = TensorDataset(x, y)
    start = time.perf_counter()
    trainer.fit(model, DataLoader(data, batch_size=16), DataLoader(data, batch_size=32))
    seconds = time.perf_counter() - start
    info = _sharded.describe(model, trainer)
    figures = ens.figures if ens is not None else {}
    print(
        json.dumps(
            {
                "strategy": "fsdp2" if shard else "ddp",
                "ensemble": on,
                "rank": trainer.global_rank,
                "full_weights_mb": round(info["full_weights_mb"], 1),
                "local_weights_mb": round(info["local_weights_mb"], 1),
                **out,
                "evaluation_copies_mb": figures.get("sharded", {}).get("evaluation_copies_mb"),
                "peak_rss_mb": round(peak_mb(), 1),
                "seconds": round(seconds, 1),
                "verdict": {k: figures.get(k) for k in VERDICT_KEYS},
            }
        )
    )


if __name__ == "__main__":
    main()
