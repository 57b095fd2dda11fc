"""The end-of-fit report (console, JSON, TensorBoard) and `lightning-recipe report`."""

import json
import subprocess
import sys

import lightning_recipe as lr
from lightning_recipe.cli import main
from models import Classifier, accumulator, blobs, loaders, mlp, trainer


class Softmaxed(Classifier):
    def forward(self, x):
        return self.net(x).softmax(-1)


def test_report_json_console_and_cli(tmp_path, capsys):
    x, y = blobs()
    train, val = loaders(x, y)
    t = trainer(tmp_path, lr.recipe_callbacks(), max_steps=3)
    t.fit(Softmaxed(mlp()), train, val)
    out = capsys.readouterr().out
    assert "lightning_recipe report: 1 error(s)" in out and "softmax-before-loss" in out
    run_dir = tmp_path / "run" / "version_0"
    report = json.loads((run_dir / "recipe_report.json").read_text())
    assert report["counts"]["error"] == 1
    assert report["findings"][0]["code"] == "softmax-before-loss"
    assert report["figures"]["LossAtInitCheck"]["num_classes"] == 4
    assert "DataInspectionCheck" in report["figures"]
    assert "recipe/report/text_summary" in accumulator(run_dir).Tags()["tensors"]

    assert main(["report", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "softmax-before-loss" in printed and "recipe_report.json" in printed
    assert main(["report", str(tmp_path / "nowhere")]) == 2


def test_console_script_is_installed(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_recipe", "report", str(tmp_path)], capture_output=True, text=True
    )
    assert proc.returncode == 2 and "no recipe_report.json" in proc.stderr
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_recipe", "--help"], capture_output=True, text=True
    )
    assert "demo" in proc.stdout and "report" in proc.stdout
