"""The finding contract: fields, emission once per code, rank zero only, gathering, raise."""

import dataclasses
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest

import lightning_recipe as lr
from lightning_recipe.callback import RecipeCallback
from lightning_recipe.findings import CATALOG, Finding, RecipeError, RecipeWarning, Severity
from models import Classifier, blobs, loaders, mlp, trainer


class Probe(RecipeCallback):
    pass


class OtherProbe(RecipeCallback):
    pass


def fake_trainer(rank_zero=True, step=3):
    return SimpleNamespace(is_global_zero=rank_zero, global_step=step, callbacks=[], loggers=[])


def test_finding_fields_are_the_public_contract():
    names = [f.name for f in dataclasses.fields(Finding)]
    assert names == ["code", "severity", "message", "source", "step", "evidence"]
    f = Finding("loss-at-init", Severity.WARNING, "m", "LossAtInitCheck", 0, {"loss": 4.7})
    with pytest.raises(dataclasses.FrozenInstanceError):
        f.code = "x"
    assert Severity("error") is Severity.ERROR and Severity.WARNING == "warning"
    assert Finding.from_dict(f.to_dict()) == f
    assert issubclass(RecipeWarning, UserWarning) and issubclass(RecipeError, RuntimeError)


def test_catalog_holds_every_design_code():
    design = [
        "loss-at-init",
        "softmax-before-loss",
        "input-not-normalized",
        "bad-input",
        "batch-mixing",
        "gradcheck-failed",
        "overfit-batch-failed",
        "params-not-updating",
        "bias-before-norm",
        "output-no-bias",
        "train-eval-mode",
        "grad-not-zeroed",
        "input-independent",
        "update-ratio-low",
        "update-ratio-high",
        "dead-units",
        "saturated-units",
        "vanishing-gradients",
        "exploding-gradients",
        "non-finite-gradients",
        "loss-diverged",
        "non-finite-loss",
        "loss-not-decreasing",
        "lr-decayed-early",
        "overfitting",
        "underfitting",
        "prediction-instability",
        "noisy-filters",
        "early-stopped",
    ]
    assert set(design) <= set(CATALOG)


def test_warning_emitted_once_per_code_with_code_prefix():
    cb, t = Probe(), fake_trainer()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cb.report(t, "loss-at-init", "warning", "first", {"loss": 1.0})
        cb.report(t, "loss-at-init", "warning", "second", {"loss": 2.0})
        cb.report(t, "bad-input", "error", "third")
        cb.report(t, "check-skipped", "info", "quiet")
    texts = [str(w.message) for w in caught if issubclass(w.category, RecipeWarning)]
    assert texts == ["[loss-at-init] first", "[bad-input] third"]
    assert [f.code for f in cb.findings] == ["loss-at-init", "loss-at-init", "bad-input", "check-skipped"]
    assert cb.findings[0].step == 3 and cb.findings[0].source == "Probe"
    assert cb.findings[1].evidence == {"loss": 2.0}


def test_no_warning_off_rank_zero_but_finding_kept():
    cb = Probe()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cb.report(fake_trainer(rank_zero=False), "bad-input", "error", "x")
    assert not [w for w in caught if issubclass(w.category, RecipeWarning)]
    assert len(cb.findings) == 1


def test_unknown_code_and_bad_on_error_are_rejected():
    cb = Probe()
    with pytest.raises(ValueError, match="Unknown finding code"):
        cb.report(None, "made-up", "info", "x")
    with pytest.raises(ValueError, match="on_error"):
        Probe(on_error="explode")
    with pytest.raises(ValueError):
        cb.report(None, "bad-input", "fatal", "x")


def test_on_error_raise_turns_error_into_recipe_error():
    cb = Probe(on_error="raise")
    cb.report(None, "bad-input", "warning", "fine")
    with pytest.raises(RecipeError, match=r"^\[bad-input\] broken") as info:
        cb.report(None, "bad-input", "error", "broken")
    assert info.value.finding.code == "bad-input"


@pytest.mark.internal_error_expected
def test_run_safely_turns_internal_failure_into_info_and_turns_off():
    cb = Probe()

    def boom():
        raise ZeroDivisionError("inside")

    assert cb.run_safely(None, "hook", boom) is None
    assert cb.findings[-1].code == "internal-error" and "ZeroDivisionError" in cb.findings[-1].message
    assert not cb.active
    assert cb.run_safely(None, "hook", lambda: 1) is None  # stays off


def test_findings_gathers_every_recipe_callback_in_step_order(tmp_path):
    a, b = Probe(), OtherProbe()
    t = trainer(tmp_path, [a, b], logger=None, max_steps=1)
    b.report(t, "bad-input", "info", "late", step=5)
    a.report(t, "bad-input", "info", "early", step=1)
    b.report(t, "bad-input", "info", "middle", step=2)
    assert [f.message for f in lr.findings(t)] == ["early", "middle", "late"]


def test_recipe_error_stops_fit_cleanly(tmp_path):
    x, y = blobs()
    x[3, 2] = float("nan")
    train, _ = loaders(x, y, shuffle=False, val_fraction=0.0)
    t = trainer(tmp_path, [lr.DataInspectionCheck(on_error="raise")], max_epochs=3)
    with pytest.raises(RecipeError, match="bad-input"):
        t.fit(Classifier(mlp()), train)
    assert t.global_step == 0  # stopped before the first optimizer step
    assert (tmp_path / "run" / "version_0" / "recipe_report.json").exists()


def test_evidence_is_strict_json_also_for_tensor_and_numpy_values():
    # NaN / Inf read from a tensor or a NumPy scalar went into recipe_report.json as bare NaN and
    # Infinity, which strict JSON readers (jq, browsers, json.loads(parse_constant=...)) reject
    import json

    import numpy as np
    import torch

    f = Finding(
        "internal-error",
        Severity.INFO,
        "m",
        "Probe",
        0,
        {"a": torch.tensor(float("nan")), "b": np.float32("inf"), "c": torch.tensor([1.0, float("-inf")])},
    )

    def refuse(name):
        raise ValueError(name)

    d = json.loads(json.dumps(f.to_dict()), parse_constant=refuse)
    assert d["evidence"] == {"a": "nan", "b": "inf", "c": [1.0, "-inf"]}


def test_catalog_states_the_chance_loss_the_check_measures():
    # torch's multi_margin_loss divides by C: a know-nothing (zero) prediction scores (C-1)/C, not
    # the C-1 of cs231n's unnormalised SVM that the catalog promised
    import torch
    import torch.nn.functional as F

    c = 5
    zero_prediction = F.multi_margin_loss(torch.zeros(3, c), torch.tensor([0, 1, 2]))
    assert float(zero_prediction) == pytest.approx((c - 1) / c)
    assert "(C-1)/C" in CATALOG["loss-at-init"].meaning


@pytest.mark.internal_error_expected
def test_the_test_suite_fails_on_an_internal_error(pytester):
    """tests/conftest.py fails a test in which a diagnostic turned itself off, unless it is marked."""
    pytester.makeconftest((Path(__file__).parent / "conftest.py").read_text())
    pytester.makepyfile(
        """
        import pytest
        from lightning_recipe import RecipeCallback

        def boom():
            raise ZeroDivisionError("inside")

        def test_unmarked():
            RecipeCallback().run_safely(None, "hook", boom)

        @pytest.mark.internal_error_expected
        def test_marked():
            RecipeCallback().run_safely(None, "hook", boom)
        """
    )
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(
        [
            "*a diagnostic failed internally (internal-error)*",
            "*ZeroDivisionError: inside*",
            "*test_unmarked*",
        ]
    )
