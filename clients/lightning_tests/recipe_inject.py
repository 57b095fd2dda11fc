"""A pytest plugin that adds the full ``lightning_recipe`` suite to every ``Trainer`` a test makes.

Used to run Lightning's own tests (trainer, loops, loggers) with the suite injected: every step
signature, return value, hook and trainer state those tests exercise meets every diagnostic. Per
test it records the outcome and every ``internal-error`` finding (a diagnostic that turned itself
off) and every ``check-skipped`` finding, as JSON lines in ``$RECIPE_INJECT_OUT`` (default
``recipe_inject.jsonl``).

Usage (from Lightning's ``tests/`` folder)::

    python -m pytest -p recipe_inject tests_pytorch/loops tests_pytorch/trainer tests_pytorch/loggers

with this folder on ``PYTHONPATH``. ``RECIPE_INJECT=0`` runs the same tests without the suite
(the baseline a failure is compared with).
"""

from __future__ import annotations

import json
import os
import traceback
from typing import Any

import pytest

_LOG: dict[str, list[str]] = {"internal": [], "skipped": [], "raised": [], "trainers": []}
_RESTORE: list[Any] = []


def _enabled() -> bool:
    return os.environ.get("RECIPE_INJECT", "1") != "0"


def _patch() -> None:
    from lightning.pytorch.trainer import trainer as trainer_mod

    import lightning_recipe as lr
    from lightning_recipe.callback import RecipeCallback

    original_init = trainer_mod.Trainer.__init__

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        callbacks = kwargs.get("callbacks")
        if callbacks is None:
            callbacks = []
        elif not isinstance(callbacks, (list, tuple)):
            callbacks = [callbacks]
        kwargs["callbacks"] = list(callbacks) + lr.recipe_callbacks(print_report=False)
        _LOG["trainers"].append("x")
        original_init(self, *args, **kwargs)

    __init__.__wrapped__ = original_init  # type: ignore[attr-defined]
    trainer_mod.Trainer.__init__ = __init__  # type: ignore[method-assign]
    _RESTORE.append(lambda: setattr(trainer_mod.Trainer, "__init__", original_init))

    original_report = RecipeCallback.report

    def report(self: Any, trainer: Any, code: str, *args: Any, **kwargs: Any) -> Any:
        message = args[1] if len(args) > 1 else kwargs.get("message", "")
        if code == "internal-error":
            _LOG["internal"].append(f"{type(self).__name__}: {message}")
        elif code == "check-skipped":
            _LOG["skipped"].append(f"{type(self).__name__}: {message}")
        return original_report(self, trainer, code, *args, **kwargs)

    RecipeCallback.report = report  # type: ignore[method-assign]
    _RESTORE.append(lambda: setattr(RecipeCallback, "report", original_report))


def pytest_configure(config: pytest.Config) -> None:
    if _enabled():
        _patch()


def pytest_unconfigure(config: pytest.Config) -> None:
    while _RESTORE:  # an in-process session (a test of this plugin) leaves the classes as they were
        _RESTORE.pop()()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: Any) -> Any:
    for v in _LOG.values():
        v.clear()
    outcome: dict[str, str] = {}
    item.stash[_OUTCOME] = outcome
    yield
    row = {
        "test": item.nodeid,
        "outcome": outcome.get("call") or outcome.get("setup") or "unknown",
        "error": outcome.get("error", ""),
        "trainers": len(_LOG["trainers"]),
        "internal_errors": list(_LOG["internal"]),
        "skipped": list(_LOG["skipped"]),
    }
    with open(os.environ.get("RECIPE_INJECT_OUT", "recipe_inject.jsonl"), "a") as fh:
        fh.write(json.dumps(row) + "\n")


_OUTCOME = pytest.StashKey[dict]()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: Any) -> Any:
    rep = yield
    report = rep.get_result()
    outcome = item.stash.get(_OUTCOME, None)
    if outcome is None:
        return
    if report.when == "setup" and report.outcome != "passed":
        outcome["setup"] = report.outcome
    if report.when == "call":
        outcome["call"] = report.outcome
    if report.failed and call.excinfo is not None:
        tb = "".join(traceback.format_exception_only(call.excinfo.type, call.excinfo.value))
        outcome["error"] = (outcome.get("error", "") + tb)[-2000:]
