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

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger

import lightning_recipe as lr
from models import Classifier, blobs, cnn, image_blobs, loaders, mlp


def build(cfg: dict):
    if cfg.get("model") == "cnn":
        x, y = image_blobs(n=cfg.get("n", 256))
        net = cnn()
    else:
        x, y = blobs(n=cfg.get("n", 256))
        net = mlp()
    if cfg.get("bug") == "nan_input":
        x[5, 1] = float("nan")
    model = Classifier(net, lr=cfg.get("lr", 1e-2), optimizer=cfg.get("optimizer", "adam"))
    train, val = loaders(x, y, batch_size=cfg.get("batch_size", 16))
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
    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(printed):
        warnings.simplefilter("always")
        trainer.fit(model, train, val)
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
    }
    (out / f"rank{rank}.json").write_text(json.dumps(result, default=str))
    sys.stdout.write(printed.getvalue())
    torch.distributed.barrier() if torch.distributed.is_initialized() else None


if __name__ == "__main__":
    main()
