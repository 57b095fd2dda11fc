"""Peak memory of the one-shot checks under FSDP2 (2 CPU processes, gloo).

Usage: python benchmarks/sharded_memory.py [HIDDEN] [LAYERS] [fsdp2|ddp]

Trains an MLP of ``LAYERS`` square ``HIDDEN``-wide Linear layers, each sharded with
``fully_shard`` (Lightning's ``ModelParallelStrategy``), for one batch, with and without the
one-shot checks, and prints per rank: the full weights (MB), the local shard (MB), and the peak
resident memory the checks added (the process's peak RSS after the first batch's checks minus the
peak before them; CPU tensors live in the process heap, so this is the checks' peak working set).
"""

from __future__ import annotations

import json
import resource
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_recipe as lr
from lightning_recipe import _sharded


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class Net(L.LightningModule):
    def __init__(self, hidden: int, layers: int, shard: bool = True) -> None:
        super().__init__()
        self.shard = shard
        blocks: list[nn.Module] = [nn.Linear(16, hidden), nn.ReLU()]
        for _ in range(layers):
            blocks += [nn.Linear(hidden, hidden), nn.ReLU()]
        self.net = nn.Sequential(*blocks, nn.Linear(hidden, 4))

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        if not self.shard:
            return
        mesh = self.device_mesh["data_parallel"]
        for m in self.net:
            if isinstance(m, nn.Linear):
                fully_shard(m, mesh=mesh)
        fully_shard(self, mesh=mesh)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


class Mark(L.Callback):
    def __init__(self, key: str, marks: dict) -> None:
        self.key, self.marks = key, marks

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0:
            self.marks[self.key] = peak_mb()


def main() -> None:
    hidden = int(sys.argv[1]) if len(sys.argv) > 1 else 1024
    layers = int(sys.argv[2]) if len(sys.argv) > 2 else 4
    shard = (sys.argv[3] if len(sys.argv) > 3 else "fsdp2") == "fsdp2"
    warnings.filterwarnings("ignore")
    L.seed_everything(0, verbose=False)
    x, y = torch.randn(64, 16), torch.randint(0, 4, (64,))
    marks: dict[str, float] = {}
    checks = [
        lr.LossAtInitCheck(),
        lr.BatchIndependenceCheck(),
        lr.GradientCheck(),
        lr.OverfitBatchCheck(),
    ]
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1) if shard else "ddp",
        max_steps=1,
        callbacks=[Mark("before", marks), *checks, Mark("after", marks)],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    model = Net(hidden, layers, shard)
    trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=16))
    info = _sharded.describe(model, trainer)
    skipped = [c.figures.get("skipped") for c in checks if c.figures.get("skipped")]
    print(
        json.dumps(
            {
                "strategy": "fsdp2" if shard else "ddp",
                "rank": trainer.global_rank,
                "full_weights_mb": round(info["full_weights_mb"], 1),
                "local_weights_mb": round(info["local_weights_mb"], 1),
                "checks_peak_extra_mb": round(marks["after"] - marks["before"], 1),
                "gathers": _sharded.stats.get("gathers"),
                "skipped": skipped,
            }
        )
    )


if __name__ == "__main__":
    main()
