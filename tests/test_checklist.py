"""The checklist (lightning_recipe.checklist): stages, statuses, key numbers and the console text,
from report dicts alone; the plugin's data without a server; the entry point TensorBoard finds."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_recipe.checklist import DIAGNOSTICS, STAGES, build, stage_of_code, to_text
from lightning_recipe.cli import main
from lightning_recipe.report import format_text

ROOT = Path(__file__).resolve().parents[1]


def finding(code, severity, source, message="measured something", step=0, **evidence):
    return {
        "code": code,
        "severity": severity,
        "message": message,
        "source": source,
        "step": step,
        "evidence": evidence,
    }


def report(findings=(), figures=None, status="finished"):
    return {
        "status": status,
        "global_step": 40,
        "epoch": 2,
        "findings": list(findings),
        "figures": figures or {},
    }


HEALTHY_FIGURES = {
    "DataInspectionCheck": {"mean": 0.01, "std": 1.0, "min": -0.8, "max": 1.9},
    "LossAtInitCheck": {"loss": 2.31, "chance": 2.3026},
    "OverfitBatchCheck": {"best_loss": 0.02, "samples": 20, "accuracy": 1.0},
    "UpdateRatioMonitor": {"median_ratio": 0.004},
    "ActivationMonitor": {"logging_steps": 3, "max_dead_fraction": {"layer": "head.3", "value": 0.2}},
    "BatchIndependenceCheck": {"max_leak": 0.0, "skipped": "no gradient on the input"},
}


def test_rows_follow_the_recipe_and_say_status_and_key_number():
    r = report(
        [
            finding("overfit-batch-failed", "error", "OverfitBatchCheck", "could not memorise 20 samples"),
            finding("dead-units", "warning", "ActivationMonitor", "100% of head.3 dead"),
            finding(
                "check-skipped",
                "info",
                "BatchIndependenceCheck",
                "did not chart",
                reason="no gradient on the input",
            ),
        ],
        HEALTHY_FIGURES,
    )
    cl = build(r)
    stages = [s.key for s in STAGES]
    assert stages == ["data", "skeleton", "overfit", "regularize", "tune", "juice"]
    order = [stages.index(row.stage) for row in cl.rows]
    assert order == sorted(order)  # rows come stage by stage
    rows = {row.name: row for row in cl.rows}
    assert set(DIAGNOSTICS) <= set(rows)  # every known diagnostic has a row, run or not
    assert rows["OverfitBatchCheck"].status == "error" and "0.02" in rows["OverfitBatchCheck"].key
    assert rows["OverfitBatchCheck"].problems[0]["try"]  # what to try, from the catalog
    assert rows["ActivationMonitor"].status == "warning" and "head.3 20%" in rows["ActivationMonitor"].key
    assert rows["ActivationMonitor"].series == ("recipe/activation_stats/head.3/dead_fraction",)
    assert rows["BatchIndependenceCheck"].status == "skipped"
    assert rows["BatchIndependenceCheck"].reason == "no gradient on the input"
    assert rows["DataInspectionCheck"].status == "ok" and "std 1" in rows["DataInspectionCheck"].key
    assert rows["LossAtInitCheck"].key == "loss at init 2.31 vs chance 2.303"
    assert rows["UpdateRatioMonitor"].stage == "tune" and "0.004" in rows["UpdateRatioMonitor"].key
    assert rows["GradientCheck"].status == "not-run" and "not among" in rows["GradientCheck"].reason
    assert rows["CheckpointEnsemble"].status == "not-run" and "monitor=" in rows["CheckpointEnsemble"].reason
    assert cl.counts == {"error": 1, "warning": 1, "info": 1}
    json.dumps(cl.to_dict(), allow_nan=False)


def test_a_running_report_marks_what_has_not_measured_yet_as_pending():
    cl = build(report([], {"LossAtInitCheck": {"loss": 2.3}, "TrainValGapMonitor": {}}, status="running"))
    rows = {row.name: row for row in cl.rows}
    assert cl.run_status == "running"
    assert rows["LossAtInitCheck"].status == "ok"
    assert rows["TrainValGapMonitor"].status == "pending"
    done = {r.name: r for r in build(report([], {"TrainValGapMonitor": {}})).rows}
    assert done["TrainValGapMonitor"].status == "not-run"


@pytest.mark.parametrize(
    ("source", "code", "stage"),
    [
        ("TrainValOverlapCheck", "train-val-overlap", "data"),
        ("LabelLeakCheck", "target-in-input", "data"),
        ("NoisyLabelMonitor", "label-noise", "data"),
        ("CausalMaskCheck", "future-leak", "skeleton"),
        ("PriorInitCheck", "class-prior-init", "skeleton"),
        ("PaddingCheck", "loss-includes-padding", "skeleton"),
        ("PenaltyCheck", "regularization-dominates", "regularize"),
        ("SomethingNewCheck", "a-code-nobody-knows", "skeleton"),
        ("SwaMonitor", "ensemble-collapse", "juice"),
    ],
)
def test_diagnostics_the_checklist_does_not_know_still_get_a_row(source, code, stage):
    cl = build(report([finding(code, "warning", source, "it went wrong", value=0.7)], {source: {"thing": 3}}))
    (row,) = [r for r in cl.rows if r.name == source]
    assert not row.known and row.stage == stage and row.status == "warning"
    assert row.key == "value 0.7" and row.problems[0]["code"] == code
    assert row.links  # at least the findings text


def test_unknown_callback_without_findings_is_placed_by_its_name_and_numbers():
    cl = build(report([], {"DuplicateSampleCheck": {"duplicates": 0, "pairs_checked": 400}, "Odd#2": {}}))
    rows = {r.name: r for r in cl.rows}
    assert rows["DuplicateSampleCheck"].stage == "data" and rows["DuplicateSampleCheck"].status == "ok"
    assert rows["DuplicateSampleCheck"].key == "duplicates 0, pairs_checked 400"
    assert rows["Odd#2"].status == "not-run"
    assert stage_of_code("update-ratio-high") == "tune"


def test_a_diagnostic_that_measured_no_number_shows_what_it_says_instead_of_its_timing():
    # a check that does not apply to this model (an image input for a table check) keeps only a
    # sentence and its timing: the sentence is the key, never "seconds 0.0045"
    figures = {
        "TargetInInputCheck": {"note": "input of shape (64, 1, 8, 8) is not a table of features: not judged"},
        "FutureLeakCheck": {"aligned": "no sequence input", "seconds": 0.0045},
    }
    rows = {r.name: r for r in build(report([], figures)).rows}
    assert rows["TargetInInputCheck"].key.startswith("input of shape (64, 1, 8, 8) is not a table")
    assert rows["FutureLeakCheck"].key == "no sequence input"


def test_internal_error_and_broken_figures_never_break_the_checklist():
    r = report(
        [finding("internal-error", "info", "GradientMonitor", "GradientMonitor failed: boom")],
        {"GradientMonitor": {"depth_profile": "not a dict"}, "LossAtInitCheck": {"loss": "nan"}},
    )
    r["findings"].append({"code": "weird"})  # a truncated finding from another version
    rows = {row.name: row for row in build(r).rows}
    assert rows["GradientMonitor"].status == "skipped" and "internal error" in rows["GradientMonitor"].reason
    assert rows["LossAtInitCheck"].key == "loss at init nan"
    json.dumps(build(r).to_dict(), allow_nan=False)


def test_console_is_one_line_per_diagnostic_problems_first_figures_on_request():
    r = report(
        [
            finding("bias-before-norm", "info", "ModelLintCheck", "conv bias before BatchNorm"),
            finding(
                "update-ratio-low", "warning", "UpdateRatioMonitor", "ratios 1e-7: raise the learning rate"
            ),
            finding("loss-at-init", "error", "LossAtInitCheck", "loss 9 vs chance 2.3"),
        ],
        {**HEALTHY_FIGURES, "ModelLintCheck": {"trainable_params": 4, "params_in_no_optimizer": 0}},
    )
    text = to_text(build(r), width=120)
    lines = text.splitlines()
    assert lines[0].startswith("ERROR") and "Loss at init" in lines[0]
    assert "loss-at-init: loss 9 vs chance 2.3" in lines[1]
    warn = next(i for i, line in enumerate(lines) if line.startswith("WARN"))
    assert "Update/weight ratio" in lines[warn] and "update-ratio-low" in lines[warn + 1]
    ok = [line for line in lines if line.startswith("ok ")]
    assert len(ok) == 4 and all(len(line) <= 120 for line in lines)
    assert any("note: bias-before-norm" in line for line in ok)
    assert lines[-1].startswith("-      not run:") or "not run:" in text
    full = format_text(r, width=120)
    assert full.startswith("lightning_recipe report: 1 error(s), 1 warning(s), 1 info at step 40")
    assert "Key figures" not in full
    assert "Key figures:" in format_text(r, width=120, figures=True)


def test_cli_report_prints_the_checklist_and_figures_on_request(tmp_path, capsys):
    (tmp_path / "recipe_report.json").write_text(json.dumps(report([], HEALTHY_FIGURES)))
    assert main(["report", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "Overfit one batch" in out and "Key figures" not in out
    assert main(["report", str(tmp_path), "--figures"]) == 0
    assert "Key figures:" in capsys.readouterr().out


def test_checklist_reads_report_json_only():
    """The checklist works from the report JSON: it imports no callback, no torch, no Lightning."""
    tree = ast.parse((ROOT / "lightning_recipe" / "checklist.py").read_text())
    imported = {
        node.module if isinstance(node, ast.ImportFrom) else alias.name
        for node in ast.walk(tree)
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in node.names
    }
    assert {m for m in imported if m and m.startswith("lightning_recipe")} == {"lightning_recipe.findings"}
    assert not {m for m in imported if m and m.split(".")[0] in ("torch", "lightning")}


# ---------------------------------------------------------------------------- the plugin
def test_entry_point_and_package_data_in_pyproject():
    tomllib = pytest.importorskip("tomllib")
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    target = meta["project"]["entry-points"]["tensorboard_plugins"]["recipe"]
    assert target == "lightning_recipe_tensorboard.plugin:RecipePlugin"
    module, _, attr = target.partition(":")
    __import__(module)
    cls = getattr(sys.modules[module], attr)
    from tensorboard.plugins.base_plugin import TBPlugin

    assert issubclass(cls, TBPlugin) and cls.plugin_name == "recipe"
    data = meta["tool"]["setuptools"]["package-data"]["lightning_recipe_tensorboard"]
    static = ROOT / "lightning_recipe_tensorboard" / "static"
    for name in ("index.js", "style.css"):
        assert (static / name).exists() and any(Path(name).match(p.split("/")[-1]) for p in data)
    from _tbserver import recipe_entry_point_installed

    if recipe_entry_point_installed():  # installed: TensorBoard's own discovery finds the tab
        from tensorboard import default

        found = [p for p in default.get_dynamic_plugins() if getattr(p, "plugin_name", None) == "recipe"]
        assert [f"{p.__module__}:{p.__qualname__}" for p in found] == [target]


def test_plugin_reads_reports_without_torch(tmp_path):
    """TensorBoard imports every plugin at start and a tab must answer at once: the plugin reads
    the reports without importing torch, Lightning or the lightning_recipe package."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "recipe_report.json").write_text(json.dumps(report([], HEALTHY_FIGURES)))
    code = (
        "import sys; from tensorboard.plugins.base_plugin import TBContext; "
        "from lightning_recipe_tensorboard.plugin import RecipePlugin; "
        f"runs = RecipePlugin(TBContext(logdir={str(tmp_path)!r})).runs()['runs']; "
        "print(len(runs[0]['diagnostics']) > 10, "
        "sorted(m for m in ('torch', 'lightning', 'lightning_recipe') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "True []"


def test_plugin_is_active_only_for_a_log_directory_the_suite_wrote(tmp_path):
    from tensorboard.plugins.base_plugin import TBContext

    from lightning_recipe_tensorboard.plugin import RecipePlugin

    (tmp_path / "other" / "run").mkdir(parents=True)
    plugin = RecipePlugin(TBContext(logdir=str(tmp_path / "other"), data_provider=None))
    assert plugin.is_active() is False
    assert plugin.runs()["runs"] == []
    run = tmp_path / "suite" / "a" / "version_0"
    run.mkdir(parents=True)
    (run / "recipe_report.json").write_text(json.dumps(report([], HEALTHY_FIGURES, status="running")))
    (tmp_path / "suite" / "recipe_report.json").write_text("{not json")
    plugin = RecipePlugin(TBContext(logdir=str(tmp_path / "suite"), data_provider=None))
    assert plugin.is_active() is True
    runs = {r["run"]: r for r in plugin.runs()["runs"]}
    assert runs["a/version_0"]["status"] == "running"
    assert runs["."]["status"] == "unreadable" and "JSONDecodeError" in runs["."]["error"]
    assert runs["a/version_0"]["diagnostics"][0]["stage"] == "data"
    assert plugin.frontend_metadata().tab_name == "Recipe"
