"""The ``lightning-recipe`` command: ``demo`` and ``report``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _demo(args: argparse.Namespace) -> int:
    from lightning_recipe.demo import run_demo

    _, report = run_demo(bug=args.bug, epochs=args.epochs, logdir=args.logdir, seed=args.seed)
    from pathlib import Path

    print(f"TensorBoard logs: {Path(report['path']).parent}")
    print(f"Open them with:   tensorboard --logdir {args.logdir}   (the Recipe tab: every run's checklist)")
    return 0


def _report(args: argparse.Namespace) -> int:
    import json

    from lightning_recipe.report import find_report, format_markdown, format_text, load_report

    try:
        path = find_report(args.logdir)
        report = load_report(path)
    except FileNotFoundError as exc:
        print(f"lightning-recipe report: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # a file being replaced right now: try again
        print(f"lightning-recipe report: could not read {args.logdir} ({exc}); try again", file=sys.stderr)
        return 2
    if args.format == "json":
        print(json.dumps(report, indent=2))
    elif args.format == "markdown":
        print(format_markdown(report))
    else:
        print(format_text(report, figures=args.figures))
        print(f"\n(from {path})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and docs)."""
    from lightning_recipe.demo import BUGS

    parser = argparse.ArgumentParser(
        prog="lightning-recipe",
        description="Karpathy's recipe and cs231n's checks as PyTorch Lightning callbacks.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train a small CNN on scikit-learn digits with the full suite")
    demo.add_argument("--bug", choices=sorted(BUGS), default=None, help="run a deliberately broken variant")
    demo.add_argument("--epochs", type=int, default=8)
    demo.add_argument(
        "--logdir", default="recipe_runs", help="TensorBoard log directory (default: recipe_runs)"
    )
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)
    rep = sub.add_parser("report", help="print the recipe's checklist of a run (one line per diagnostic)")
    rep.add_argument(
        "logdir",
        help="a run directory, a parent of runs (the newest report is shown), or a recipe_report.json; "
        "a run that is still going shows what it has found so far",
    )
    rep.add_argument("--format", choices=["text", "markdown", "json"], default="text")
    rep.add_argument(
        "--figures",
        action="store_true",
        help="also print every callback's key figures after the checklist (text format)",
    )
    rep.set_defaults(func=_report)
    from lightning_recipe.preflight import add_parser

    add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``lightning-recipe`` console script."""
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
