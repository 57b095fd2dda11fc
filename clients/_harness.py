"""Shared plumbing of the third-party corpus: build the recipe suite the way a user would, and
write what each recipe callback did as JSON.

A corpus script calls :func:`run` with a function ``fit(recipe)`` (returning ``None``, or the
callbacks that actually ran where the library copies them) that builds the library's model
the way its own docs build it, on small synthetic data made in code, and trains it for a few
epochs with ``callbacks=recipe(monitor=...)``. Every callback is then classified:

- ``measured``: it ran and made no ``check-skipped`` / ``internal-error`` finding;
- ``skipped``: it reported ``check-skipped`` (the reasons are kept);
- ``internal-error``: it reported ``internal-error`` (the message is kept);
- ``not-run``: the trainer never called the callback (the fit crashed first, or the library
  dropped the callbacks it was given).

Every finding (code, severity, message) is kept too; warning/error findings on these healthy
models are false alarms unless the script says the model is meant to be broken.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import sys
import tempfile
import time
import traceback
import types
import warnings
from collections.abc import Callable
from typing import Any

import lightning_recipe as lr
from lightning_recipe.suite import SUITE

CLASS_TO_NAME = {cls.__name__: name for name, cls in SUITE}


def version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def trainer_kwargs(root: str, max_epochs: int = 3, **extra: Any) -> dict[str, Any]:
    """Trainer arguments shared by the corpus: CPU, a few epochs, quiet, logs under ``root``."""
    kw: dict[str, Any] = {
        "max_epochs": max_epochs,
        "accelerator": "cpu",
        "devices": 1,
        "default_root_dir": root,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "log_every_n_steps": 1,
        # small on purpose: the whole corpus runs in minutes on two cores
        "limit_train_batches": 6,
        "limit_val_batches": 2,
    }
    kw.update(extra)
    return kw


def _mark_setup(cb: Any) -> None:
    """Make ``cb.setup`` note that the trainer called it (a bound method, so a library that
    deep-copies the callbacks marks its own copies)."""
    original = type(cb).setup

    def setup(self: Any, *args: Any, **kwargs: Any) -> Any:
        self._clients_ran = True
        return original(self, *args, **kwargs)

    cb.setup = types.MethodType(setup, cb)


def _summarise(callbacks: list[Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for cb in callbacks:
        name = CLASS_TO_NAME.get(type(cb).__name__, type(cb).__name__)
        found = list(cb.findings) if hasattr(cb, "findings") else []
        skips = [f.message for f in found if f.code == "check-skipped"]
        errors = [f.message for f in found if f.code == "internal-error"]
        if not getattr(cb, "_clients_ran", False):
            status = "not-run"
        elif errors:
            status = "internal-error"
        elif skips:
            status = "skipped"
        else:
            status = "measured"
        out[name] = {
            "status": status,
            "skipped": skips,
            "internal_errors": errors,
            "findings": [
                {"code": f.code, "severity": f.severity.value, "message": f.message, "step": f.step}
                for f in found
            ],
            "figures": _plain(getattr(cb, "figures", {})),
        }
    return out


def _plain(value: Any, depth: int = 0) -> Any:
    """``value`` as JSON (numbers, strings, short lists, dicts); anything else as a short repr."""
    if isinstance(value, (bool, int, str)) or value is None:
        return value
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else str(value)
    if depth > 4:
        return repr(value)[:80]
    if isinstance(value, dict):
        return {str(k): _plain(v, depth + 1) for k, v in list(value.items())[:40]}
    if isinstance(value, (list, tuple)):
        return [_plain(v, depth + 1) for v in list(value)[:20]]
    try:
        return float(value)
    except Exception:
        return repr(value)[:80]


def run(library: str, model: str, dists: list[str], fit: Callable[[Callable[..., list]], None]) -> None:
    """Run ``fit(recipe)`` and write the JSON result to ``argv[1]`` (or print it)."""
    os.environ.setdefault("PYTHONHASHSEED", "0")
    warnings.simplefilter("ignore")
    made: list[Any] = []

    def recipe(monitor: str, mode: str = "min") -> list:
        cbs = lr.recipe_callbacks(monitor=monitor, mode=mode, print_report=False)
        for cb in cbs:
            _mark_setup(cb)
        made.extend(cbs)
        return cbs

    out_path = os.path.abspath(sys.argv[1]) if len(sys.argv) > 1 else None
    # libraries write logs and bookkeeping into the working directory (pytorch-tabular's
    # .pt_tmp, lightning_logs): keep them out of the checkout
    os.chdir(workdir())
    t0 = time.time()
    crash = None
    try:
        used = fit(recipe)
        if used is not None:  # the library copied the callbacks: these are the ones that ran
            made[:] = used
    except BaseException as exc:  # a crash is a result too
        crash = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))[-4000:]
    result = {
        "library": library,
        "model": model,
        "versions": {d: version(d) for d in ["torch", "lightning", "pytorch-lightning", *dists]},
        "seconds": round(time.time() - t0, 1),
        "crash": crash,
        "callbacks": _summarise(made),
    }
    text = json.dumps(result, indent=1)
    if out_path:
        with open(out_path, "w") as fh:
            fh.write(text)
    else:
        print(text)
    if crash:
        print(crash, file=sys.stderr)


def workdir() -> str:
    """A fresh folder for the run's logs (removed with the process' temp dir)."""
    return tempfile.mkdtemp(prefix="lr_clients_")
