"""The end-of-fit report (console, JSON, TensorBoard) and `lightning-recipe report`."""

import json
import subprocess
import sys

import pytest

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


def test_report_reads_a_run_that_is_still_going(tmp_path, capsys):
    """`lightning-recipe report` on a live run shows what was found so far (status running)."""
    from lightning.pytorch.callbacks import Callback

    seen = {}

    class PeekMidRun(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == 3:
                capsys.readouterr()
                seen["rc"] = main(["report", str(tmp_path), "--format", "json"])
                seen["json"] = json.loads(capsys.readouterr().out)
                main(["report", str(tmp_path)])
                seen["text"] = capsys.readouterr().out

    x, y = blobs()
    train, val = loaders(x, y)
    t = trainer(tmp_path, [*lr.recipe_callbacks(print_report=False), PeekMidRun()], max_steps=6)
    t.fit(Softmaxed(mlp()), train, val)
    assert seen["rc"] == 0 and seen["json"]["status"] == "running"
    assert "softmax-before-loss" in {f["code"] for f in seen["json"]["findings"]}
    assert "(run running)" in seen["text"] and "softmax-before-loss" in seen["text"]
    final = json.loads((tmp_path / "run" / "version_0" / "recipe_report.json").read_text())
    assert final["status"] == "finished" and final["global_step"] == 6


def test_report_formats(tmp_path, capsys):
    x, y = blobs()
    train, val = loaders(x, y)
    trainer(tmp_path, lr.recipe_callbacks(print_report=False), max_steps=3).fit(Softmaxed(mlp()), train, val)
    capsys.readouterr()
    assert main(["report", str(tmp_path), "--format", "markdown"]) == 0
    md = capsys.readouterr().out
    assert md.startswith("**lightning_recipe report**") and "| `softmax-before-loss` |" in md
    assert (
        main(["report", str(tmp_path / "run" / "version_0" / "recipe_report.json"), "--format", "json"]) == 0
    )
    assert json.loads(capsys.readouterr().out)["counts"]["error"] == 1


def test_failed_run_report_says_so(tmp_path):
    x, y = blobs()
    x[0, 0] = float("nan")
    train, _ = loaders(x, y, shuffle=False, val_fraction=0.0)
    t = trainer(tmp_path, lr.recipe_callbacks(on_error="raise", print_report=False), max_steps=3)
    try:
        t.fit(Classifier(mlp()), train)
    except lr.RecipeError:
        pass
    final = json.loads((tmp_path / "run" / "version_0" / "recipe_report.json").read_text())
    assert final["status"] == "failed" and final["counts"]["error"] >= 1


def test_an_unwritable_report_does_not_fail_the_fit(tmp_path):
    # the run itself writes nothing under default_root_dir (no logger, no checkpoints), so it
    # finishes; writing recipe_report.json there must not turn it into a crash at the very end
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    x, y = blobs()
    train, val = loaders(x, y)
    check = lr.DataInspectionCheck()
    t = trainer(tmp_path, [check], logger=None, max_steps=2, default_root_dir=str(blocker / "run"))
    with pytest.warns(UserWarning, match="could not write"):
        t.fit(Classifier(mlp()), train, val)
    assert t.global_step == 2 and t.state.finished


def test_fast_dev_run_prints_the_report_but_writes_no_file(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # fast_dev_run's dummy logger has no directory: the cwd was used
    x, y = blobs()
    train, val = loaders(x, y)
    t = trainer(tmp_path, lr.recipe_callbacks(), fast_dev_run=True)
    t.fit(Softmaxed(mlp()), train, val)
    out = capsys.readouterr().out
    assert "softmax-before-loss" in out and "not saved: fast_dev_run writes no files" in out
    assert list(tmp_path.rglob("recipe_report.json")) == []
    assert [f.code for f in lr.findings(t) if f.severity is lr.Severity.ERROR] == ["softmax-before-loss"]


def test_print_report_is_its_own_switch_and_leaves_early_stopping_verbose_alone(tmp_path, capsys):
    callbacks = lr.recipe_callbacks(monitor="val_loss", print_report=False, early_stopping={"verbose": True})
    stopper = next(cb for cb in callbacks if isinstance(cb, lr.RecipeEarlyStopping))
    assert stopper.verbose is True  # Lightning's flag, as the user set it
    assert all(cb.print_report is False for cb in callbacks)
    x, y = blobs()
    trainer(tmp_path, callbacks, max_steps=3).fit(Classifier(mlp()), *loaders(x, y))
    assert "lightning_recipe report" not in capsys.readouterr().out
    with pytest.warns(DeprecationWarning, match="print_report"):
        old = lr.recipe_callbacks(verbose=False)
    assert all(cb.print_report is False for cb in old)
    with pytest.raises(TypeError, match="`print_report` must be True or False"):
        lr.recipe_callbacks(print_report="no")
