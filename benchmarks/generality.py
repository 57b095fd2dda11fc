"""Overhead of the suite's original callbacks, for comparing two versions of the package.

    git worktree add /tmp/before facc909                  # the code before issue 13's reader
    python benchmarks/generality.py --tree /tmp/before    # that version
    python benchmarks/generality.py                       # this checkout

Runs ``benchmarks/overhead.py``'s models (ResNet-style CNN, wide MLP; one epoch of 201 steps) with
the suite restricted to the 14 callbacks that existed before the reading of any batch layout and
loss (issue 13), interleaved with two plain runs, and prints amortized and quiet-step ratios
against the plain run of the same process. Run both versions on the same quiet machine: the
ratios, not the step times, are comparable.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from pathlib import Path
from typing import Any

ORIGINAL = (
    "data_inspection",
    "loss_at_init",
    "batch_independence",
    "gradient_check",
    "overfit_batch",
    "model_lint",
    "update_ratio",
    "activations",
    "gradients",
    "first_layer_filters",
    "loss_curve",
    "train_val_gap",
    "input_independent",
    "prediction_dynamics",
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--tree", type=Path, default=None, help="a checkout whose lightning_recipe to measure"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=201)
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    if args.tree is not None:  # import that checkout's package, not the installed (editable) one
        sys.meta_path = [f for f in sys.meta_path if "editable" not in repr(f)]
        sys.path.insert(0, str(args.tree.resolve()))
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    import overhead
    import torch

    import lightning_recipe as lr
    from lightning_recipe.suite import SUITE

    torch.set_num_threads(1)
    print(f"lightning_recipe from {Path(lr.__file__).parent}")
    others = {name: False for name, _ in SUITE if name not in ORIGINAL}
    configs: dict[str, Any] = {
        "plain": lambda: [],
        "plain (again)": lambda: [],
        "original callbacks": lambda: lr.recipe_callbacks(print_report=False, **others),
    }
    out: dict[str, Any] = {"package": str(Path(lr.__file__).parent)}
    logdir = Path("/tmp/lightning_recipe_bench")
    for kind in ("cnn", "mlp"):
        raw: dict[str, list] = {name: [] for name in configs}
        overhead.run(kind, [], min(args.steps, 60), logdir)  # warm-up
        for _ in range(args.repeats):
            for name, make in configs.items():
                raw[name].append(overhead.run(kind, make(), args.steps, logdir))
        stats = {name: overhead.summarise(r) for name, r in raw.items()}
        base = stats["plain"]
        out[kind] = {
            name: {
                "amortized": s["mean"] / base["mean"],
                "quiet": s["quiet_median"] / base["quiet_median"],
                "one_shot_s": max(0.0, s["first"] - base["first"]),
                "plain_step_ms": base["mean"] * 1000,
            }
            for name, s in stats.items()
        }
        print(f"\n{kind}: plain step {base['mean'] * 1000:.1f} ms")
        for name, row in out[kind].items():
            ratios = f"amortized {row['amortized']:.3f}  quiet {row['quiet']:.3f}"
            print(f"  {name:<20} {ratios}  one-shot {row['one_shot_s']:.2f} s")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
