"""The TensorBoard plugin behind the "Recipe" tab.

Routes, under ``/data/plugin/recipe/``:

* ``index.js``, ``style.css``: the tab itself (plain ES module and CSS, served from the package;
  no external asset, works offline).
* ``runs``: JSON, every run of the log directory that holds a ``recipe_report.json``, with its
  status (running / finished / failed) and its checklist (:mod:`lightning_recipe.checklist`):
  every diagnostic with its stage, status, key number, key figures, findings, a downsampled main
  series read from the run's scalars and the TensorBoard views that hold the detail.

The plugin is active for a log directory with at least one ``recipe_report.json`` under it, and
inactive (listed, not broken) for any other.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

from tensorboard import plugin_util
from tensorboard.backend import http_util
from tensorboard.data import provider
from tensorboard.plugins import base_plugin
from werkzeug import wrappers

from lightning_recipe_tensorboard import PLUGIN_NAME

REPORT_FILE = "recipe_report.json"  # lightning_recipe.report.REPORT_FILE (that module imports torch)
STATIC = Path(__file__).parent / "static"
#: points per sparkline
SERIES_POINTS = 60
#: how often is_active() walks the log directory again while it has found nothing
RESCAN_SECONDS = 10.0
_STATIC_TYPES = {".js": "application/javascript", ".css": "text/css"}


_LOAD_LOCK = threading.Lock()
_LOADED: list[Any] = []


def _checklist() -> Any:
    """``lightning_recipe.checklist``, loaded on first use.

    Importing it the usual way runs ``lightning_recipe/__init__.py``, which imports torch and
    Lightning: seconds, and hundreds of MB, in a process that only reads JSON. So the two files
    it needs (``checklist.py`` and ``findings.py``, which import nothing but the standard
    library) are loaded from the installed package's folder on their own, under private names.
    Where that cannot be done (the package is already imported, or not a plain folder), it is the
    usual import.
    """
    with _LOAD_LOCK:
        if not _LOADED:
            _LOADED.append(_load_checklist())
        return _LOADED[0]


def _load_checklist() -> Any:
    if "lightning_recipe" in sys.modules:
        return importlib.import_module("lightning_recipe.checklist")
    try:
        spec = importlib.util.find_spec("lightning_recipe")  # finds the folder, runs nothing
        folder = Path(next(iter(spec.submodule_search_locations or ())))  # type: ignore[union-attr]
        findings = _load_file(f"{__package__}._findings", folder / "findings.py")
        # checklist.py says `from lightning_recipe.findings import CATALOG`: for the time it is
        # loaded, that name is the module just loaded (a module in sys.modules is not imported
        # again, and its package is not imported at all)
        sys.modules["lightning_recipe.findings"] = findings
        try:
            return _load_file(f"{__package__}._checklist", folder / "checklist.py")
        finally:
            sys.modules.pop("lightning_recipe.findings", None)
    except Exception:
        return importlib.import_module("lightning_recipe.checklist")


def _load_file(name: str, path: Path) -> Any:
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is made
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def find_reports(logdir: str | os.PathLike) -> dict[str, Path]:
    """``{run name: report path}`` for every ``recipe_report.json`` under ``logdir``; the run name
    is the report's directory relative to ``logdir``, as TensorBoard names the run ("." for the
    log directory itself)."""
    root = Path(logdir)
    out: dict[str, Path] = {}
    if not root.is_dir():
        return out
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        if REPORT_FILE in filenames:
            rel = Path(dirpath).relative_to(root).as_posix()
            out[rel or "."] = Path(dirpath) / REPORT_FILE
    return out


class RecipePlugin(base_plugin.TBPlugin):
    """lightning_recipe's checklist as a TensorBoard tab (plugin name ``recipe``)."""

    plugin_name = PLUGIN_NAME

    def __init__(self, context: base_plugin.TBContext) -> None:
        self._data_provider = context.data_provider
        logdir = context.logdir or getattr(context.flags, "logdir", None) or ""
        self._logdir = os.path.expanduser(logdir) if logdir and "://" not in logdir else ""
        self._active = False
        self._scanned_at = float("-inf")
        self._cache: dict[Path, tuple[float, dict[str, Any]]] = {}

    # ------------------------------------------------------------------ TBPlugin
    def get_plugin_apps(self) -> dict[str, Any]:
        return {
            "/index.js": self._serve_static,
            "/style.css": self._serve_static,
            "/runs": self._serve_runs,
        }

    def is_active(self) -> bool:
        if self._active or not self._logdir:
            return self._active
        now = time.monotonic()
        if now - self._scanned_at >= RESCAN_SECONDS:
            self._scanned_at = now
            self._active = _has_report(self._logdir)
        return self._active

    def data_plugin_names(self) -> tuple[str, ...]:
        return ()  # active by its reports on disk, not by summaries of its own

    def frontend_metadata(self) -> base_plugin.FrontendMetadata:
        return base_plugin.FrontendMetadata(
            es_module_path="/index.js", tab_name="Recipe", disable_reload=True
        )

    # ------------------------------------------------------------------ routes
    @wrappers.Request.application
    def _serve_static(self, request: wrappers.Request) -> wrappers.Response:
        name = request.path.rsplit("/", 1)[-1]
        path = STATIC / name
        return http_util.Respond(request, path.read_bytes(), _STATIC_TYPES[path.suffix])

    @wrappers.Request.application
    def _serve_runs(self, request: wrappers.Request) -> wrappers.Response:
        ctx = plugin_util.context(request.environ)
        eid = plugin_util.experiment_id(request.environ)
        body = self.runs(ctx, eid)
        return http_util.Respond(request, json.dumps(body, allow_nan=False, default=str), "application/json")

    # ------------------------------------------------------------------ data
    def runs(self, ctx: Any = None, experiment_id: str = "") -> dict[str, Any]:
        """The ``runs`` route's answer (also callable without a server)."""
        checklist = _checklist()
        out: list[dict[str, Any]] = []
        now = time.time()
        for run, path in (find_reports(self._logdir) if self._logdir else {}).items():
            entry: dict[str, Any] = {"run": run, "path": str(path)}
            try:
                mtime, report = self._read(path)
            except (OSError, ValueError) as exc:
                entry.update({"status": "unreadable", "error": f"{type(exc).__name__}: {exc}"})
                out.append(entry)
                continue
            entry.update(checklist.build(report).to_dict())
            entry["updated"] = mtime
            entry["updated_age_s"] = max(0.0, now - mtime)
            entry["created"] = report.get("created")
            entry["version"] = report.get("lightning_recipe_version")
            out.append(entry)
        try:
            self._attach_series(ctx, experiment_id, out)
        except Exception as exc:  # no scalars (yet) must not hide the checklist
            for entry in out:
                entry.setdefault("series_error", f"{type(exc).__name__}: {exc}")
        return {
            "logdir": self._logdir,
            "stages": [{"key": s.key, "title": s.title, "habit": s.habit} for s in checklist.STAGES],
            "statuses": list(checklist.STATUSES),
            "runs": _finite(out),
        }

    def _read(self, path: Path) -> tuple[float, dict[str, Any]]:
        mtime = path.stat().st_mtime
        cached = self._cache.get(path)
        if cached is not None and cached[0] == mtime:
            return cached
        report = json.loads(path.read_text())
        if not isinstance(report, dict):
            raise ValueError("not a report: the JSON is no object")
        self._cache[path] = (mtime, report)
        return mtime, report

    def _attach_series(self, ctx: Any, experiment_id: str, entries: list[dict[str, Any]]) -> None:
        if self._data_provider is None:
            return
        runs = [e["run"] for e in entries if "diagnostics" in e]
        if not runs:
            return
        listing = self._data_provider.list_scalars(
            ctx,
            experiment_id=experiment_id,
            plugin_name="scalars",
            run_tag_filter=provider.RunTagFilter(runs=runs),
        )
        wanted: dict[str, dict[str, str]] = {}  # run -> diagnostic -> tag
        for entry in entries:
            tags = listing.get(entry["run"], {})
            for diag in entry.get("diagnostics", []):
                tag = next((t for t in diag.get("series", []) if t in tags), None)
                if tag is not None:
                    wanted.setdefault(entry["run"], {})[diag["name"]] = tag
        all_tags = sorted({t for d in wanted.values() for t in d.values()})
        if not all_tags:
            return
        data = self._data_provider.read_scalars(
            ctx,
            experiment_id=experiment_id,
            plugin_name="scalars",
            downsample=SERIES_POINTS,
            run_tag_filter=provider.RunTagFilter(runs=list(wanted), tags=all_tags),
        )
        for entry in entries:
            for diag in entry.get("diagnostics", []):
                tag = wanted.get(entry["run"], {}).get(diag["name"])
                points = data.get(entry["run"], {}).get(tag, []) if tag else []
                if points:
                    diag["sparkline"] = {"tag": tag, "points": [[p.step, p.value] for p in points]}


def _has_report(logdir: str) -> bool:
    for _, dirnames, filenames in os.walk(logdir):
        if REPORT_FILE in filenames:
            return True
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
    return False


def _finite(value: Any) -> Any:
    """NaN and Inf as strings, so the answer is strict JSON."""
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
