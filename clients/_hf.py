"""A LightningModule around a Hugging Face model, as the transformers + Lightning tutorials write
it: dict batches from the tokenizer's collator, ``outputs = model(**batch)``, ``outputs.loss``,
AdamW with a linear warm-up schedule stepped every step."""

from __future__ import annotations

from typing import Any


def module(model: Any, lr: float, warmup: int, total: int) -> Any:
    import lightning.pytorch as pl
    import torch
    from transformers import get_linear_schedule_with_warmup

    class HFModule(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, **inputs: Any) -> Any:
            return self.model(**inputs)

        def training_step(self, batch: dict, batch_idx: int) -> Any:
            outputs = self(**batch)
            self.log("train_loss", outputs.loss)
            return outputs.loss

        def validation_step(self, batch: dict, batch_idx: int) -> None:
            outputs = self(**batch)
            self.log("val_loss", outputs.loss, prog_bar=True)

        def configure_optimizers(self) -> Any:
            decay = ["bias", "LayerNorm.weight"]
            groups = [
                {
                    "params": [p for n, p in self.model.named_parameters() if not any(d in n for d in decay)],
                    "weight_decay": 0.01,
                },
                {
                    "params": [p for n, p in self.model.named_parameters() if any(d in n for d in decay)],
                    "weight_decay": 0.0,
                },
            ]
            opt = torch.optim.AdamW(groups, lr=lr)
            sched = get_linear_schedule_with_warmup(opt, num_warmup_steps=warmup, num_training_steps=total)
            return [opt], [{"scheduler": sched, "interval": "step", "frequency": 1}]

    return HFModule()


class DictDataset:
    """A list of dicts of tensors (what ``datasets`` + a collator hand a DataLoader)."""

    def __init__(self, columns: dict) -> None:
        self.columns = columns

    def __len__(self) -> int:
        return len(next(iter(self.columns.values())))

    def __getitem__(self, i: int) -> dict:
        return {k: v[i] for k, v in self.columns.items()}


def train(
    recipe: Any, model: Any, columns: dict, lr: float = 1e-3, epochs: int = 3, n_train: int = 320
) -> None:
    """Fit ``model`` (a Hugging Face model) the way the tutorials do, through :func:`module`, on
    ``columns`` (tensors with one row per sample): the first ``n_train`` rows train, the rest
    validate, batches of 32, ``epochs`` epochs with the suite ``recipe(monitor="val_loss")``."""
    import _harness
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    train_set = DictDataset({k: v[:n_train] for k, v in columns.items()})
    val_set = DictDataset({k: v[n_train:] for k, v in columns.items()})
    net = module(model, lr=lr, warmup=3, total=epochs * 6)
    trainer = pl.Trainer(
        **_harness.trainer_kwargs(_harness.workdir(), max_epochs=epochs), callbacks=recipe(monitor="val_loss")
    )
    trainer.fit(net, DataLoader(train_set, batch_size=32, shuffle=True), DataLoader(val_set, batch_size=32))
