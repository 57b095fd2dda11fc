"""Overhead of the lightning_recipe suite, as step-time ratios against a plain run.

    python benchmarks/overhead.py                 # reference CNN and wide MLP, every callback
    python benchmarks/overhead.py --model cnn --steps 300 --repeats 3 --json bench.json
    python benchmarks/overhead.py --sequence      # one-shot seconds of the sequence checks

Every configuration trains the same model on the same synthetic data for ``--steps`` steps in this
process, with the same Trainer settings (TensorBoard logger, ``log_every_n_steps=50``), and runs
are interleaved across ``--repeats`` rounds so drift on a busy machine hits all of them alike. A
step's time is the wall time between consecutive ``on_train_batch_start`` calls (data loading,
forward, backward, optimizer and every callback hook included). Reported per configuration:

* ``amortized``: mean step time over steps 1..N (logging steps included) / plain's -- the
  number the 5% target applies to;
* ``quiet``: median time of the steps where nothing is due (not a multiple of 50) / plain's --
  should be indistinguishable from 1.00 for every monitor;
* ``logging``: median time of the logging steps / plain's median step;
* ``one-shot``: extra seconds of step 0 (the preflight checks) over the median step.

``plain (again)`` runs the plain configuration a second time: its distance from 1.00 is the
noise of the measurement on this machine. Lightning itself costs about 17 us per callback per
step (its hook dispatch wraps every call in a profiler context), so the suite's 15 callbacks
cost about 0.25 ms a step before doing anything: 2.5% of a 10 ms step, under 1% of a 30 ms one.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_recipe as lr
from lightning_recipe.suite import SUITE

LOG_EVERY = 50
#: where the benchmark trains (``--accelerator``)
ACCELERATOR = "cpu"


class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.b1 = nn.BatchNorm2d(c)
        self.c2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.b2 = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.b2(self.c2(F.relu(self.b1(self.c1(x))))))


def resnet_cnn() -> nn.Module:
    """A small ResNet-style CNN for 3x16x16 inputs (about 0.2M parameters, 12 conv/BN layers)."""
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1, bias=False),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        Block(32),
        nn.Conv2d(32, 64, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        Block(64),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 10),
    )


def wide_mlp() -> nn.Module:
    """A wide MLP for 3x16x16 inputs flattened (about 2.1M parameters)."""
    return nn.Sequential(
        nn.Flatten(), nn.Linear(768, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10)
    )


class Net(L.LightningModule):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.net = resnet_cnn() if kind == "cnn" else wide_mlp()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        out = self(x)
        loss = F.cross_entropy(out, y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        out = self(x)
        self.log("val_loss", F.cross_entropy(out, y))
        self.log("val_acc", (out.argmax(1) == y).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def data(steps: int, batch: int = 64) -> tuple[DataLoader, DataLoader]:
    g = torch.Generator().manual_seed(0)
    n = steps * batch + 4 * batch
    y = torch.randint(0, 10, (n,), generator=g)
    x = torch.randn(n, 3, 16, 16, generator=g) * 0.5 + y.float().view(-1, 1, 1, 1) / 10
    # validation samples of their own (TrainValOverlapCheck flags a validation set cut from training)
    val_x, val_y = x[: 4 * batch], y[: 4 * batch]
    x, y = x[4 * batch :], y[4 * batch :]
    return (
        DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=True, generator=g),
        DataLoader(TensorDataset(val_x, val_y), batch_size=batch),
    )


class StepClock(Callback):
    """Records the time of every ``on_train_batch_start`` (put it first in the callback list)."""

    def __init__(self) -> None:
        self.starts: list[float] = []
        self.steps: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.starts.append(time.perf_counter())
        self.steps.append(trainer.global_step)

    def on_train_end(self, trainer, pl_module) -> None:
        self.starts.append(time.perf_counter())


def run(kind: str, callbacks: list[Callback], steps: int, logdir: Path) -> dict[str, Any]:
    L.seed_everything(0, verbose=False)
    clock = StepClock()
    train, val = data(steps)
    trainer = L.Trainer(
        max_steps=steps,
        accelerator=ACCELERATOR,
        devices=1,
        logger=TensorBoardLogger(str(logdir), name=kind),
        callbacks=[clock, *callbacks],
        log_every_n_steps=LOG_EVERY,
        limit_val_batches=4,
        val_check_interval=steps,
        num_sanity_val_steps=2,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(Net(kind), train, val)
    times = [b - a for a, b in zip(clock.starts, clock.starts[1:])]
    return {"times": times, "steps": clock.steps[: len(times)]}


def summarise(res: list[dict[str, Any]]) -> dict[str, float]:
    """Pool the repeats of one configuration."""
    quiet, logging, first, rest = [], [], [], []
    for r in res:
        for t, s in zip(r["times"], r["steps"]):
            if s == 0:
                first.append(t)
                continue
            rest.append(t)
            (logging if s % LOG_EVERY == 0 else quiet).append(t)
    return {
        "mean": statistics.fmean(rest),
        "quiet_median": statistics.median(quiet),
        "logging_median": statistics.median(logging) if logging else float("nan"),
        "first": statistics.fmean(first),
    }


def configurations(only: list[str] | None) -> dict[str, Any]:
    configs: dict[str, Any] = {
        "plain": lambda: [],
        "plain (again)": lambda: [],  # the noise floor: plain against itself
        "suite": lambda: lr.recipe_callbacks(print_report=False),
    }
    for name, _ in SUITE:
        configs[name] = lambda name=name: lr.recipe_callbacks(
            verbose=False, **{other: False for other, _ in SUITE if other != name}
        )
    if only:
        configs = {k: v for k, v in configs.items() if k in {"plain", "plain (again)", *only}}
    return configs


class CharTransformer(L.LightningModule):
    """A small char-level transformer LM (2 layers, d=64) with its causal mask."""

    def __init__(self, vocab: int = 64, d: int = 64, length: int = 256) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(length, d)
        layer = nn.TransformerEncoderLayer(d, 4, 4 * d, dropout=0.1, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(d, vocab)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch[0][:, :-1], batch[0][:, 1:]
        t = x.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(t)
        h = self.enc(self.tok(x) + self.pos(torch.arange(t)), mask=mask, is_causal=True)
        logits = self.head(h)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def sequence_one_shot(repeats: int = 3) -> dict[str, dict[int, float]]:
    """Seconds of the sequence checks (FutureLeakCheck, PaddingCheck) on the first batch of a
    small char transformer (batch 32), and of one plain training step, for 64 and 256 tokens."""
    out: dict[str, dict[int, float]] = {"training_step": {}, "future_leak": {}, "padding": {}}
    for length in (64, 256):
        model = CharTransformer()
        batch = (torch.randint(0, 64, (32, length + 1), generator=torch.Generator().manual_seed(0)),)
        timings: dict[str, list[float]] = {name: [] for name in out}
        for _ in range(repeats):
            start = time.perf_counter()
            model.training_step(batch, 0).backward()
            timings["training_step"].append(time.perf_counter() - start)
            model.zero_grad()
            for name, cls in (("future_leak", lr.FutureLeakCheck), ("padding", lr.PaddingCheck)):
                start = time.perf_counter()
                cls().run_check(None, model, batch)
                timings[name].append(time.perf_counter() - start)
        for name, values in timings.items():
            out[name][length] = statistics.median(values)
    print("\nsequence checks on a char transformer (2 layers, d=64, batch 32), seconds (median):")
    for name, row in out.items():
        print(f"{name:<14} " + "  ".join(f"T={t}: {v:.3f}" for t, v in row.items()))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["cnn", "mlp", "both"], default="both")
    parser.add_argument("--steps", type=int, default=201)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: least noise)")
    parser.add_argument("--accelerator", choices=["cpu", "gpu"], default="cpu", help="where to train")
    parser.add_argument("--only", nargs="*", help="callback names (suite.SUITE) to measure besides plain")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--logdir", type=Path, default=Path("/tmp/lightning_recipe_bench"))
    parser.add_argument(
        "--sequence", action="store_true", help="only time the sequence checks on a char transformer"
    )
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    global ACCELERATOR
    ACCELERATOR = args.accelerator
    if args.sequence:
        seq = sequence_one_shot(args.repeats)
        if args.json:
            args.json.write_text(json.dumps({"sequence_one_shot_s": seq}, indent=2))
        return 0
    kinds = ["cnn", "mlp"] if args.model == "both" else [args.model]
    out: dict[str, Any] = {"steps": args.steps, "repeats": args.repeats, "log_every_n_steps": LOG_EVERY}
    configs = configurations(args.only)
    for kind in kinds:
        raw: dict[str, list] = {name: [] for name in configs}
        run(kind, [], min(args.steps, 60), args.logdir)  # warm-up: allocator, kernels, imports
        for _ in range(args.repeats):
            for name, make in configs.items():
                raw[name].append(run(kind, make(), args.steps, args.logdir))
        stats = {name: summarise(r) for name, r in raw.items()}
        base = stats["plain"]
        table = {}
        for name, s in stats.items():
            table[name] = {
                "amortized": s["mean"] / base["mean"],
                "quiet": s["quiet_median"] / base["quiet_median"],
                "logging": s["logging_median"] / base["quiet_median"],
                "one_shot_s": max(0.0, s["first"] - base["first"]),
                "plain_step_ms": base["mean"] * 1000,
            }
        out[kind] = table
        print(f"\n{kind}: plain step {base['mean'] * 1000:.1f} ms (mean), ratios vs plain")
        print(f"{'config':<20} {'amortized':>9} {'quiet':>7} {'logging':>8} {'one-shot s':>10}")
        for name, row in table.items():
            print(
                f"{name:<20} {row['amortized']:>9.3f} {row['quiet']:>7.3f} {row['logging']:>8.2f} "
                f"{row['one_shot_s']:>10.2f}"
            )
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
