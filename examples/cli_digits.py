"""LightningCLI with the recipe suite configured in YAML (see cli_config.yaml beside this file).

python examples/cli_digits.py fit --config examples/cli_config.yaml
"""

from lightning.pytorch.cli import LightningCLI

from lightning_recipe.demo import DigitsCNN, DigitsDataModule


def main() -> None:
    LightningCLI(DigitsCNN, DigitsDataModule, save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
