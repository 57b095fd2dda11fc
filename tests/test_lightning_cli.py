"""Every callback is configurable from a LightningCLI YAML (class_path / init_args)."""

from pathlib import Path

import yaml
from lightning.pytorch.cli import LightningCLI

import lightning_recipe as lr
from lightning_recipe.demo import DigitsCNN, DigitsDataModule
from lightning_recipe.suite import SUITE

CONFIG = Path(__file__).resolve().parents[1] / "examples" / "cli_config.yaml"


def test_example_config_lists_every_callback():
    cfg = yaml.safe_load(CONFIG.read_text())
    paths = {cb["class_path"] for cb in cfg["trainer"]["callbacks"]}
    assert paths == {f"lightning_recipe.{cls.__name__}" for _, cls in SUITE}


def test_cli_builds_and_runs_every_callback(tmp_path):
    cfg = yaml.safe_load(CONFIG.read_text())
    cfg["trainer"].update(max_epochs=1, limit_train_batches=6, limit_val_batches=2, enable_progress_bar=False)
    cfg["trainer"]["logger"]["init_args"]["save_dir"] = str(tmp_path)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cli = LightningCLI(
        DigitsCNN,
        DigitsDataModule,
        args=["fit", "--config", str(path)],
        save_config_kwargs={"overwrite": True},
    )
    recipe = [cb for cb in cli.trainer.callbacks if isinstance(cb, lr.RecipeCallback)]
    assert len(recipe) == len(SUITE)
    by_name = {type(cb).__name__: cb for cb in recipe}
    assert by_name["LossAtInitCheck"].tolerance == 0.25
    assert by_name["RecipeEarlyStopping"].monitor == "val_loss"
    assert by_name["PredictionDynamicsMonitor"].num_examples == 32
    assert cli.trainer.global_step == 6
    assert not [f for f in lr.findings(cli.trainer) if f.severity is not lr.Severity.INFO]
    assert by_name["LossAtInitCheck"].figures["num_classes"] == 10
