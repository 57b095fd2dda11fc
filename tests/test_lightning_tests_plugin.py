"""The plugin behind ``make lightning-tests`` (``clients/lightning_tests/recipe_inject.py``): it adds
the full suite to every Trainer a test builds and records, per test, the Trainers and every
``internal-error`` / ``check-skipped`` finding."""

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

TEST_FILE = """
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.demos.boring_classes import BoringModel


def test_fit(tmp_path):
    trainer = Trainer(default_root_dir=tmp_path, max_steps=3, limit_val_batches=2, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(BoringModel())
    names = [type(cb).__name__ for cb in trainer.callbacks]
    assert "LossAtInitCheck" in names and "UpdateRatioMonitor" in names


class AssertsGradMode(BoringModel):
    def training_step(self, batch, batch_idx):
        assert torch.is_grad_enabled(), "needs grad mode"
        return super().training_step(batch, batch_idx)


def test_step_that_asserts(tmp_path):
    Trainer(default_root_dir=tmp_path, max_steps=2, limit_val_batches=0, logger=False,
            enable_checkpointing=False, enable_progress_bar=False).fit(AssertsGradMode())
"""


def test_the_plugin_adds_the_suite_and_records_findings(pytester, monkeypatch):
    from lightning.pytorch import Trainer

    from lightning_recipe.callback import RecipeCallback

    init, report = Trainer.__init__, RecipeCallback.report
    out = pytester.path / "rows.jsonl"
    monkeypatch.setenv("RECIPE_INJECT_OUT", str(out))
    monkeypatch.syspath_prepend(str(ROOT / "clients" / "lightning_tests"))
    pytester.makepyfile(test_inner=TEST_FILE)
    result = pytester.runpytest_inprocess("-p", "recipe_inject", "-q", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)
    rows = {r["test"].split("::")[-1]: r for r in map(json.loads, out.read_text().splitlines())}
    assert rows["test_fit"]["trainers"] == 1 and rows["test_fit"]["internal_errors"] == []
    asserts = rows["test_step_that_asserts"]
    assert asserts["internal_errors"] == []
    assert any("raised AssertionError when the check ran it" in m for m in asserts["skipped"])
    # the session is over: Trainer and RecipeCallback are as they were for the rest of this run
    assert Trainer.__init__ is init and RecipeCallback.report is report
