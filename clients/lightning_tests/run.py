"""Run Lightning's own tests with the full ``lightning_recipe`` suite in every ``Trainer``.

    python clients/lightning_tests/run.py --src PATH   # PATH: a checkout of Lightning's repository

Runs ``tests_pytorch/loops``, ``tests_pytorch/trainer`` and ``tests_pytorch/loggers`` (or the paths
given) with the :mod:`recipe_inject` plugin, then reruns every test that failed with the suite
without it, to tell the failures the suite causes from the ones the environment causes (missing
optional packages). Writes ``results.json`` and ``results.md`` next to this file (or to
``--out``) and exits 1 if any diagnostic reported ``internal-error``.

A test that fails only with the suite is not necessarily a fault of the suite: Lightning's tests
assert the exact callback list, every logged metric, the files left in the run directory and how
often a hook or ``backward`` ran, and the suite adds callbacks, logs ``recipe/...`` scalars, writes
``recipe_report.json`` and reruns the user's steps on copies of the model. The summary lists them
all with their first error line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_PATHS = ("tests_pytorch/loops", "tests_pytorch/trainer", "tests_pytorch/loggers")


def _pytest(python: str, tests_dir: Path, out: Path, args: list[str], inject: bool) -> int:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["RECIPE_INJECT"] = "1" if inject else "0"
    env["RECIPE_INJECT_OUT"] = str(out)
    if out.exists():
        out.unlink()
    cmd = [
        python,
        "-m",
        "pytest",
        "-p",
        "recipe_inject",
        "-q",
        "-p",
        "no:cacheprovider",
        "--timeout",
        "300",
        *args,
    ]
    return subprocess.call(cmd, cwd=tests_dir, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _rows(path: Path) -> list[dict]:
    return (
        [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    )


def _first_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[0][:200] if lines else ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--src", required=True, help="a checkout of github.com/Lightning-AI/pytorch-lightning"
    )
    parser.add_argument("--python", default=sys.executable, help="the interpreter (with lightning installed)")
    parser.add_argument("--out", default=str(HERE), help="where results.json / results.md go")
    parser.add_argument("paths", nargs="*", default=list(DEFAULT_PATHS))
    ns = parser.parse_args(argv)
    tests_dir = Path(ns.src).resolve() / "tests"
    if not (tests_dir / "tests_pytorch").is_dir():
        parser.error(f"--src must be a checkout of Lightning's repository (no {tests_dir / 'tests_pytorch'})")
    out_dir = Path(ns.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    with_suite = out_dir / "with_suite.jsonl"
    _pytest(ns.python, tests_dir, with_suite, list(ns.paths), inject=True)
    rows = _rows(with_suite)
    failed = [r["test"] for r in rows if r["outcome"] == "failed" or r["error"]]
    without = out_dir / "without_suite.jsonl"
    base = {}
    if failed:
        _pytest(ns.python, tests_dir, without, failed, inject=False)
        base = {r["test"]: r for r in _rows(without)}

    internal = [(r["test"], m) for r in rows for m in r["internal_errors"]]
    skips = Counter(m.split(":", 1)[0] for r in rows for m in r["skipped"])
    step_raised = sum(1 for r in rows for m in r["skipped"] if "when the check ran it" in m)
    only_with = [t for t in failed if t in base and base[t]["outcome"] == "passed" and not base[t]["error"]]
    summary = {
        "tests": len(rows),
        "outcomes": dict(Counter(r["outcome"] for r in rows)),
        "tests_with_a_trainer": sum(1 for r in rows if r["trainers"]),
        "trainers": sum(r["trainers"] for r in rows),
        "internal_errors": [{"test": t, "message": m} for t, m in internal],
        "skips_by_callback": dict(skips.most_common()),
        "skips_because_the_step_raised_on_a_copy": step_raised,
        "failed_with_suite": len(failed),
        "failed_without_suite_too": len(failed) - len(only_with),
        "failed_only_with_suite": [
            {
                "test": t,
                "error": next(r["error"] for r in rows if r["test"] == t).strip().splitlines()[0][:200],
            }
            for t in only_with
        ],
    }
    (out_dir / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = [
        "# Lightning's own tests with the suite in every Trainer",
        "",
        f"Paths: {', '.join(ns.paths)}. {summary['tests']} tests ({summary['outcomes']}), "
        f"{summary['tests_with_a_trainer']} of them built {summary['trainers']} Trainers "
        "with the full suite.",
        "",
        f"- internal-error findings: **{len(internal)}**",
        f"- check-skipped because the test's own step raised on a probe's copy: {step_raised}",
        f"- failed with the suite: {len(failed)}; of those, failing without it too: "
        f"{summary['failed_without_suite_too']}; only with it: {len(only_with)} (listed below)",
        "",
    ]
    lines += [f"- `{t}`: {m[:200]}" for t, m in internal]
    lines += ["", "Failing only with the suite (first error line):", ""]
    lines += [f"- `{d['test']}`: {d['error']}" for d in summary["failed_only_with_suite"]]
    (out_dir / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:8]))
    return 1 if internal else 0


if __name__ == "__main__":
    raise SystemExit(main())
