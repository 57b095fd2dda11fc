"""Run the recipe suite under 2-process CPU DDP and dump what each rank saw (for tests/test_ddp.py).

Usage: python tests/ddp/run_suite.py OUT_DIR CONFIG_JSON
Each rank writes OUT_DIR/rank{r}.json: findings, figures, final-weight checksum, stop epoch, the
warnings it issued and what it printed. Rank zero alone may write TensorBoard events and the report.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # this checkout's lightning_recipe

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger

import lightning_recipe as lr
from models import Classifier, blobs, cnn, image_blobs, loaders, mlp


class NaNOnRank(torch.utils.data.Dataset):
    """Wraps a (x, y) dataset; on one DDP rank every x has a NaN in feature 1."""

    def __init__(self, base, rank: int) -> None:
        self.base, self.rank = base, rank

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i):
        x, y = self.base[i]
        if torch.distributed.is_initialized() and torch.distributed.get_rank() == self.rank:
            x = x.clone()
            x[1] = float("nan")
        return x, y


def build(cfg: dict):
    if cfg.get("model") == "cnn":
        x, y = image_blobs(n=cfg.get("n", 256))
        net = cnn()
    else:
        x, y = blobs(n=cfg.get("n", 256))
        net = mlp()
    x = x * cfg.get("scale", 1.0)
    model = Classifier(net, lr=cfg.get("lr", 1e-2), optimizer=cfg.get("optimizer", "adam"))
    train, val = loaders(x, y, batch_size=cfg.get("batch_size", 16), shuffle=cfg.get("shuffle", True))
    if "val_from_train" in cfg:  # validation samples that are also training samples
        k = cfg["val_from_train"]
        val = torch.utils.data.DataLoader(
            torch.utils.data.Subset(train.dataset, range(k)), batch_size=cfg.get("batch_size", 16)
        )
    if "nan_rank" in cfg:  # every training sample seen by that rank has a NaN feature
        train = torch.utils.data.DataLoader(
            NaNOnRank(train.dataset, cfg["nan_rank"]), batch_size=cfg.get("batch_size", 16), shuffle=True
        )
    return model, train, val


def main() -> None:
    out, cfg = Path(sys.argv[1]), json.loads(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    L.seed_everything(cfg.get("seed", 0), verbose=False)
    model, train, val = build(cfg)
    callbacks = lr.recipe_callbacks(**cfg.get("suite", {})) if cfg.get("suite", {}) is not None else []
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=cfg.get("strategy", "ddp"),
        max_epochs=cfg.get("epochs", 2),
        logger=TensorBoardLogger(str(out / "tb"), name="run"),
        callbacks=callbacks,
        log_every_n_steps=cfg.get("log_every_n_steps", 2),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        precision=cfg.get("precision", "32-true"),
        accumulate_grad_batches=cfg.get("accumulate", 1),
    )
    printed = io.StringIO()
    raised = None
    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(printed):
        warnings.simplefilter("always")
        try:
            trainer.fit(model, train, val)
        except lr.RecipeError as exc:
            raised = str(exc)
    rank = trainer.global_rank
    checksum = float(sum(p.detach().double().sum() for p in model.parameters()))
    result = {
        "rank": rank,
        "world_size": trainer.world_size,
        "findings": [f.to_dict() for f in lr.findings(trainer)],
        "figures": {
            type(cb).__name__: cb.figures for cb in trainer.callbacks if isinstance(cb, lr.RecipeCallback)
        },
        "recipe_warnings": [str(w.message) for w in caught if issubclass(w.category, lr.RecipeWarning)],
        "printed_report": "lightning_recipe report" in printed.getvalue(),
        "checksum": checksum,
        "global_step": trainer.global_step,
        "current_epoch": trainer.current_epoch,
        "should_stop": bool(trainer.should_stop),
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
