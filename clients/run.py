"""Run the third-party corpus: every ``clients/<project>.py`` in its own subprocess (with a
timeout), then write ``clients/results.json`` and the markdown table ``clients/results.md``.

Usage (from the repository root, with the corpus venv; ``make clients`` sets it up)::

    .venv-clients/bin/python clients/run.py [--timeout 420] [--only NAME ...] [--jobs 1]

Each cell of the table is what one recipe callback did on one project's healthy model:
✓ measured, ⚠ measured but made a warning/error finding (a false alarm on a healthy model),
– skipped (``check-skipped``; the footnote gives the reason), ✗ internal error, ○ first-layer
filters on a model without conv layers or image input (not applicable, not counted as blind),
· the trainer never called it (a crash, or the library dropped the callback).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

SHORT = {
    "data_inspection": "data",
    "loss_at_init": "init",
    "batch_independence": "indep",
    "future_leak": "leak",
    "padding": "pad",
    "gradient_check": "gradchk",
    "overfit_batch": "overfit",
    "model_lint": "lint",
    "regularization": "reg",
    "class_prior": "prior",
    "target_in_input": "tgtin",
    "train_val_overlap": "overlap",
    "checkpoint_ensemble": "ens",
    "early_stopping": "stop",
    "update_ratio": "upd",
    "activations": "act",
    "gradients": "grads",
    "first_layer_filters": "filters",
    "loss_curve": "curve",
    "train_val_gap": "gap",
    "input_independent": "baseline",
    "prediction_dynamics": "pred",
    "label_noise": "noise",
    "baselines": "base",
}
NOT_APPLICABLE = "there is no Conv1d/Conv2d"
#: label noise on a model without class labels of 3 or more classes (a regression, a binary
#: task, a token model): shown apart and reported both ways (issue 13 exempts only the filters)
NO_LABELS = (
    "is not a classification loss with integer targets",
    "needs 3 or more classes to tell a pair apart",
    "label noise is judged for one label per sample",
)


def scripts() -> list[Path]:
    return sorted(p for p in HERE.glob("*.py") if not p.name.startswith("_") and p.name != "run.py")


def run_one(script: Path, timeout: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="lr_clients_") as tmp:
        out = Path(tmp) / "result.json"
        t0 = time.time()
        env = {**os.environ, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
        try:
            proc = subprocess.run(
                [sys.executable, str(script), str(out)],
                cwd=tmp,
                env=env,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
            tail = (proc.stdout + proc.stderr)[-3000:]
            rc: int | str = proc.returncode
        except subprocess.TimeoutExpired as exc:
            tail = f"timed out after {timeout:.0f} s: " + str(exc.stderr or "")[-2000:]
            rc = "timeout"
        if out.exists():
            result = json.loads(out.read_text())
        else:
            result = {"library": script.stem, "model": script.stem, "crash": tail, "callbacks": {}}
        result.update({"script": script.name, "returncode": rc, "wall_seconds": round(time.time() - t0, 1)})
        if rc != 0 and not result.get("crash"):
            result["crash"] = tail
        return result


#: the generic advice at the end of skip messages, cut from the table's footnotes (kept in the JSON)
_ADVICE = (
    "; pass get_input=",
    "; log them with self.log(",
    "; raise max_seconds",
    "; use torch.nn.functional",
)


def _short(message: str) -> str:
    for cut in _ADVICE:
        message = message.split(cut)[0]
    return message.rstrip(".") + "."


def cell(entry: dict | None, notes: dict[str, int]) -> tuple[str, str]:
    """(symbol, kind) of one callback on one project; adds skip/error reasons to ``notes``."""
    if entry is None or entry["status"] == "not-run":
        return "·", "not-run"
    status = entry["status"]
    if status == "skipped" and all(NOT_APPLICABLE in m for m in entry["skipped"]):
        return "○", "n/a"
    if status == "skipped" and all(any(k in m for k in NO_LABELS) for m in entry["skipped"]):
        n = notes.setdefault(_short(entry["skipped"][0]), len(notes) + 1)
        return f"◌{n}", "no-labels"
    loud = [f for f in entry["findings"] if f["severity"] in ("warning", "error")]
    if status == "internal-error":
        n = notes.setdefault(_short(entry["internal_errors"][0]), len(notes) + 1)
        return f"✗{n}", "internal-error"
    if status == "skipped":
        n = notes.setdefault(_short(entry["skipped"][0]), len(notes) + 1)
        return f"–{n}" + ("⚠" if loud else ""), "skipped"
    if loud:
        return "⚠", "alarm"
    return "✓", "measured"


def table(results: list[dict]) -> str:
    notes: dict[str, int] = {}
    alarms: list[str] = []
    names = list(SHORT)
    lines = [
        "| project | " + " | ".join(SHORT[n] for n in names) + " |",
        "|---|" + "---|" * len(names),
    ]
    counts = {
        "measured": 0,
        "alarm": 0,
        "skipped": 0,
        "internal-error": 0,
        "not-run": 0,
        "n/a": 0,
        "no-labels": 0,
    }
    for r in results:
        cells = []
        for n in names:
            entry = r.get("callbacks", {}).get(n)
            sym, kind = cell(entry, notes)
            counts[kind] += 1
            cells.append(sym)
            if entry:
                for f in entry["findings"]:
                    if f["severity"] in ("warning", "error"):
                        where = f"{r['library']} {r['model']}: `{n}`"
                        alarms.append(f"{where} {f['severity']} `{f['code']}`: {f['message']}")
        label = f"{r['library']}: {r['model']}" + (" (crashed)" if r.get("crash") else "")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    judged = sum(v for k, v in counts.items() if k != "n/a")
    blind = counts["skipped"] + counts["internal-error"] + counts["not-run"] + counts["no-labels"]
    strict = judged - counts["no-labels"]
    out = [
        *lines,
        "",
        f"{len(results)} projects, {judged} (callback, project) pairs judged ({counts['n/a']} "
        "first-layer-filter pairs on models without conv layers or image input left out): "
        f"{counts['measured'] + counts['alarm']} measured, {blind} blind "
        f"({100 * blind / max(judged, 1):.1f}%: {counts['skipped'] + counts['no-labels']} skipped, "
        f"{counts['internal-error']} internal errors, {counts['not-run']} not run); "
        f"{counts['no-labels']} of the skips are label noise on a model without class labels of 3 or "
        f"more classes (◌): leaving those out too, {blind - counts['no-labels']} of {strict} blind "
        f"({100 * (blind - counts['no-labels']) / max(strict, 1):.1f}%); "
        f"{counts['alarm']} measured with a warning/error finding; "
        f"{sum(1 for r in results if r.get('crash'))} crashed fits.",
        "",
        "✓ measured · ⚠ warning/error finding on a healthy model · –N skipped (reason N) · ✗N internal error "
        "(message N) · ○ first-layer filters on a model without conv layers or image input (not counted) · "
        "◌N label noise on a model without class labels of 3 or more classes (skipped, reason N) · "
        "· never called",
        "",
    ]
    if notes:
        out += ["Reasons:", ""]
        out += [f"{n}. {msg}" for msg, n in notes.items()]
        out.append("")
    if alarms:
        out += ["Warning/error findings:", ""]
        out += [f"- {a}" for a in alarms]
        out.append("")
    crashes = [r for r in results if r.get("crash")]
    if crashes:
        out += ["Crashes:", ""]
        out += [f"- {r['script']}: `{r['crash'].strip().splitlines()[-1][:300]}`" for r in crashes]
        out.append("")
    return "\n".join(out)


BEGIN, END = "<!-- clients:table:begin -->", "<!-- clients:table:end -->"


def write_readme(path: Path, md: str) -> None:
    """Replace the text between the ``clients:table`` markers of ``path`` with ``md``."""
    text = path.read_text()
    head, sep, rest = text.partition(BEGIN)
    _, sep2, tail = rest.partition(END)
    if not sep or not sep2:
        raise SystemExit(f"{path} has no {BEGIN} ... {END} section")
    path.write_text(f"{head}{BEGIN}\n{md.rstrip()}\n{END}{tail}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--timeout", type=float, default=420.0, help="seconds per project")
    parser.add_argument("--only", nargs="*", default=None, help="script names (stems) to run")
    parser.add_argument("--jobs", type=int, default=1, help="projects run at once")
    parser.add_argument("--out", default=str(HERE / "results"), help="output path without extension")
    parser.add_argument(
        "--readme",
        default=None,
        help="also write the table into this README between the clients:table markers",
    )
    args = parser.parse_args(argv)
    todo = [p for p in scripts() if not args.only or p.stem in args.only]
    if not todo:
        parser.error(f"no corpus script matches {args.only}; have {[p.stem for p in scripts()]}")

    def one(p: Path) -> dict:
        r = run_one(p, args.timeout)
        print(f"{p.stem}: {r['wall_seconds']} s" + (" CRASH" if r.get("crash") else ""), flush=True)
        return r

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        results = list(pool.map(one, todo))
    md = table(results)
    if args.only:  # a partial run: the saved table and README stay the full corpus's
        print(md)
        return 1 if any(r.get("crash") for r in results) else 0
    Path(args.out + ".json").write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n")
    Path(args.out + ".md").write_text(md)
    if args.readme:
        write_readme(Path(args.readme), md)
    print(md)
    return 1 if any(r.get("crash") for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
