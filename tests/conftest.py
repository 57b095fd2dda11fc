import os
import sys
import warnings
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("PYTHONHASHSEED", "0")
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same RNG state, so model inits do not depend on test order."""
    import random

    import numpy as np

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _quiet():
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")
    yield


# ---------------------------------------------------------------------------- internal errors
# A diagnostic that fails internally reports an ``internal-error`` info finding and turns itself
# off, so a test that only looks at warnings would still pass with the callback blind. Every
# test fails on such a finding unless it is marked ``@pytest.mark.internal_error_expected``.
pytest_plugins = ["pytester"]


def _internal_error_log() -> list:
    """The list every ``internal-error`` finding is appended to (kept on the patched method, so a
    nested pytest run in the same process shares it)."""
    from lightning_recipe.callback import RecipeCallback

    if getattr(RecipeCallback.report, "_internal_errors", None) is None:
        original = RecipeCallback.report
        log: list = []

        def report(self, trainer, code, *args, **kwargs):
            if code == "internal-error":
                message = args[1] if len(args) > 1 else kwargs.get("message", "")
                log.append(f"{type(self).__name__}: {message}")
            return original(self, trainer, code, *args, **kwargs)

        report._internal_errors = log
        RecipeCallback.report = report
    return RecipeCallback.report._internal_errors


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "internal_error_expected: the test provokes an internal-error finding on purpose"
    )


@pytest.fixture(autouse=True)
def _no_internal_errors(request):
    """Fail the test if any recipe callback reported ``internal-error`` during it."""
    log = _internal_error_log()
    log.clear()
    yield
    errors = list(log)
    log.clear()
    if errors and request.node.get_closest_marker("internal_error_expected") is None:
        pytest.fail("a diagnostic failed internally (internal-error):\n" + "\n".join(errors), pytrace=False)
