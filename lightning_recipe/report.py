"""The end-of-fit report: a findings table on the console, ``recipe/report`` in TensorBoard and
``<log_dir>/recipe_report.json`` (every finding plus each callback's key figures).

``lightning-recipe report LOGDIR`` prints the same table from the JSON of a finished run.
"""

from __future__ import annotations

import json
import os
import shutil
import textwrap
import time
import warnings
from pathlib import Path
from typing import Any

from lightning_recipe import _context, tensorboard
from lightning_recipe._context import recipe_callbacks_of
from lightning_recipe._version import __version__
from lightning_recipe.findings import Finding, Severity, _jsonable

REPORT_FILE = "recipe_report.json"


def gather_findings(trainer: Any) -> list[Finding]:
    """Every finding of every recipe callback on ``trainer``, in step order (stable).

    Under ``ddp_spawn`` (and other multiprocessing launchers) the callbacks that saw the findings
    lived in the worker processes; in the launching process their lists are empty, so the
    findings are read back from rank zero's ``recipe_report.json``.
    """
    callbacks = recipe_callbacks_of(trainer)
    found: list[Finding] = []
    for cb in callbacks:
        found.extend(cb.findings)
    if not found and callbacks and _spawned(trainer):
        found = _findings_from_report(trainer)
    return sorted(found, key=lambda f: f.step)


def _spawned(trainer: Any) -> bool:
    launcher = getattr(getattr(trainer, "strategy", None), "launcher", None)
    return type(launcher).__name__ == "_MultiProcessingLauncher"


def _findings_from_report(trainer: Any) -> list[Finding]:
    # the launching process's logger never learned the worker's version (it would pick the next
    # free one), so look for the newest report under the logger's root directory
    path = Path(log_dir_of(trainer)) / REPORT_FILE
    if not path.is_file():
        loggers = getattr(trainer, "loggers", None) or []
        root = getattr(loggers[0], "root_dir", None) if loggers else None
        try:
            path = find_report(root or getattr(trainer, "default_root_dir", "."))
        except FileNotFoundError:
            return []
    try:
        return [Finding.from_dict(d) for d in json.loads(path.read_text()).get("findings", [])]
    except (OSError, ValueError, KeyError):
        return []


def collect(trainer: Any, status: str = "finished") -> dict[str, Any]:
    """The report as a JSON-ready dict; ``status`` is "running", "finished" or "failed"."""
    callbacks = recipe_callbacks_of(trainer)
    figures: dict[str, Any] = {}
    for cb in callbacks:
        name = type(cb).__name__
        key = name if name not in figures else f"{name}#{len(figures)}"
        figures[key] = _jsonable(dict(cb.figures))
    found = gather_findings(trainer)
    return {
        "lightning_recipe_version": __version__,
        "status": status,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "global_step": _context.global_step(trainer),
        "epoch": int(getattr(trainer, "current_epoch", 0) or 0),
        "world_size": _context.world_size(trainer),
        "counts": count_by_severity(found),
        "findings": [f.to_dict() for f in found],
        "figures": figures,
    }


def count_by_severity(found: list[Finding]) -> dict[str, int]:
    """``{"error": n, "warning": n, "info": n}``."""
    counts = {s.value: 0 for s in (Severity.ERROR, Severity.WARNING, Severity.INFO)}
    for f in found:
        counts[f.severity.value] += 1
    return counts


def log_dir_of(trainer: Any) -> str:
    """Where the report goes: the first logger's ``log_dir`` (TensorBoard/CSV), else its
    ``save_dir``, else ``trainer.default_root_dir``. Unlike ``trainer.log_dir`` this calls no
    collective, so it is safe on rank zero alone."""
    loggers = getattr(trainer, "loggers", None) or []
    if loggers:
        first = loggers[0]
        for attr in ("log_dir", "save_dir"):
            value = getattr(first, attr, None)
            if isinstance(value, (str, os.PathLike)) and value:
                return os.fspath(value)
    return os.fspath(getattr(trainer, "default_root_dir", None) or os.getcwd())


# ---------------------------------------------------------------------------- formatting
def format_table(found: list[Finding], width: int | None = None) -> str:
    """A plain-text table of findings, most severe first, messages wrapped to the terminal."""
    if width is None:
        width = max(80, min(160, shutil.get_terminal_size((120, 20)).columns))
    if not found:
        return "lightning_recipe: no findings."
    order = sorted(found, key=lambda f: (-f.severity.rank, f.step))
    code_w = max(len("code"), *(len(f.code) for f in order))
    step_w = max(len("step"), *(len(str(f.step)) for f in order))
    head = f"{'severity':<8}  {'step':>{step_w}}  {'code':<{code_w}}  message"
    indent = 8 + 2 + step_w + 2 + code_w + 2
    msg_w = max(30, width - indent)
    lines = [head, "-" * min(width, indent + msg_w)]
    for f in order:
        wrapped = textwrap.wrap(f"{f.message} ({f.source})", msg_w) or [""]
        lines.append(f"{f.severity.value:<8}  {f.step:>{step_w}}  {f.code:<{code_w}}  {wrapped[0]}")
        lines.extend(" " * indent + more for more in wrapped[1:])
    return "\n".join(lines)


def format_figures(figures: dict[str, Any], width: int = 100) -> str:
    """Each callback's key figures on one wrapped line."""
    lines = []
    for name, figs in figures.items():
        if not figs:
            continue
        parts = [f"{k}={_fmt(v)}" for k, v in figs.items() if not isinstance(v, (dict, list))]
        if not parts:
            continue
        text = f"{name}: " + ", ".join(parts)
        lines.extend(textwrap.wrap(text, width, subsequent_indent="    "))
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def format_text(report: dict[str, Any], width: int | None = None, figures: bool = False) -> str:
    """The console report: a summary line and the recipe's checklist, one line per diagnostic
    (errors and warnings first, with their message and what to try); every callback's key
    figures too with ``figures=True`` (they are always in ``recipe_report.json``)."""
    from lightning_recipe.checklist import build, to_text

    found = [Finding.from_dict(d) for d in report.get("findings", [])]
    c = report.get("counts") or count_by_severity(found)
    status = report.get("status", "finished")
    head = (
        f"lightning_recipe report: {c.get('error', 0)} error(s), {c.get('warning', 0)} warning(s), "
        f"{c.get('info', 0)} info at step {report.get('global_step', '?')}"
        + ("" if status == "finished" else f" (run {status})")
    )
    parts = [head, "", to_text(build(report), width)]
    figs = format_figures(report.get("figures", {}), width or 100) if figures else ""
    if figs:
        parts += ["", "Key figures:", figs]
    return "\n".join(parts)


def format_markdown(report: dict[str, Any]) -> str:
    """The report as markdown (TensorBoard text ``recipe/report``)."""
    found = [Finding.from_dict(d) for d in report.get("findings", [])]
    c = report.get("counts") or count_by_severity(found)
    out = [
        f"**lightning_recipe report** at step {report.get('global_step')}"
        + ("" if report.get("status", "finished") == "finished" else f" (run {report['status']})")
        + ": "
        f"{c.get('error', 0)} error(s), {c.get('warning', 0)} warning(s), {c.get('info', 0)} info",
        "",
        tensorboard.findings_markdown(sorted(found, key=lambda f: (-f.severity.rank, f.step))),
    ]
    figures = report.get("figures", {})
    if figures:
        out += ["", "| callback | key figures |", "|---|---|"]
        for name, figs in figures.items():
            shown = ", ".join(f"{k}={_fmt(v)}" for k, v in figs.items() if not isinstance(v, (dict, list)))
            out.append(f"| {name} | {shown or '-'} |")
    return "\n".join(out)


# ---------------------------------------------------------------------------- writing
def findings_changed(trainer: Any) -> None:
    """New findings: refresh ``recipe/findings`` in TensorBoard and the JSON on disk (rank zero),
    so ``lightning-recipe report`` shows them while the run is still going."""
    try:
        tensorboard.findings_changed(trainer, lambda: gather_findings(trainer))
    except Exception:  # a refresh for the reader's convenience must never stop the run
        pass
    state = _context.trainer_state(trainer)
    if state.snapshot_written and not state.report_written:
        write_snapshot(trainer)


def write_snapshot_once(trainer: Any) -> None:
    """At fit start: the first ``recipe_report.json`` of the run (status "running")."""
    state = _context.trainer_state(trainer)
    if not state.snapshot_written:
        state.snapshot_written = True
        write_snapshot(trainer)


def write_snapshot(trainer: Any, status: str = "running") -> Path | None:
    """Write the report JSON with what is known now (rank zero); never raises."""
    if not _context.is_global_zero(trainer):
        return None
    try:
        return _write_json(trainer, collect(trainer, status))
    except Exception:  # the final report says what went wrong; a snapshot must not stop the run
        return None


def _writes_files(trainer: Any) -> bool:
    """False under ``fast_dev_run``: like Lightning's loggers and checkpoints, a dry run leaves no
    files behind (its logger is a dummy, so the report would land in the working directory)."""
    return not getattr(trainer, "fast_dev_run", False)


def _write_json(trainer: Any, report: dict[str, Any]) -> Path | None:
    if not _writes_files(trainer):
        return None
    path = Path(log_dir_of(trainer)) / REPORT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2, sort_keys=False))
    os.replace(tmp, path)  # readers never see a half-written file
    return path


def write_report_if_last(trainer: Any, callback: Any, status: str = "finished") -> dict[str, Any] | None:
    """Write the report if ``callback`` is the last recipe callback on the trainer (so every
    other callback's ``on_fit_end`` has run) and it was not written yet this fit."""
    callbacks = recipe_callbacks_of(trainer)
    if not callbacks or callbacks[-1] is not callback:
        return None
    state = _context.trainer_state(trainer)
    if state.report_written:
        return None
    state.report_written = True
    try:
        return write_report(trainer, status=status)
    except Exception as exc:  # the run is over and went well (or failed on its own): never fail it here
        if _context.is_global_zero(trainer):
            warnings.warn(
                f"lightning_recipe could not write its report to {log_dir_of(trainer)} "
                f"({type(exc).__name__}: {exc}); the findings are still in "
                "lightning_recipe.findings(trainer).",
                UserWarning,
                stacklevel=2,
            )
        return None


def write_report(trainer: Any, print_report: bool | None = None, status: str = "finished") -> dict[str, Any]:
    """Write the console table, ``recipe/report`` and the JSON (rank zero); return the report."""
    report = collect(trainer, status)
    if not _context.is_global_zero(trainer):
        return report
    tensorboard.flush_findings(trainer, lambda: gather_findings(trainer))
    tensorboard.add_text(trainer, "recipe/report", format_markdown(report))
    path = _write_json(trainer, report)
    report["path"] = None if path is None else str(path)
    if print_report is None:
        print_report = any(getattr(cb, "print_report", True) for cb in recipe_callbacks_of(trainer))
    if print_report:
        saved = "not saved: fast_dev_run writes no files" if path is None else f"report saved to {path}"
        figures = "" if path is None else f"; key figures: lightning-recipe report {path.parent} --figures"
        print("\n" + format_text(report) + f"\n\n({saved}{figures})\n", flush=True)
    return report


def find_report(path: str | os.PathLike) -> Path:
    """The newest ``recipe_report.json`` at or under ``path``."""
    p = Path(path)
    if p.is_file():
        return p
    if not p.exists():
        raise FileNotFoundError(f"no such file or directory: {p}")
    candidates = sorted(p.rglob(REPORT_FILE), key=lambda q: q.stat().st_mtime)
    if not candidates:
        raise FileNotFoundError(f"no {REPORT_FILE} under {p}")
    return candidates[-1]


def load_report(path: str | os.PathLike) -> dict[str, Any]:
    """Read a report written by :func:`write_report`."""
    return json.loads(find_report(path).read_text())
