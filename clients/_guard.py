"""Refuse a corpus install that would replace torch: read a ``pip install --dry-run --report``
JSON and exit non-zero if it installs torch, torchvision or any other torch build.

Usage: ``python clients/_guard.py report.json``
"""

from __future__ import annotations

import json
import sys

FORBIDDEN = {"torch", "torchvision", "torchaudio", "triton"}


def main(path: str) -> int:
    with open(path) as fh:
        report = json.load(fh)
    bad = [
        f"{item['metadata']['name']}=={item['metadata']['version']}"
        for item in report.get("install", [])
        if item["metadata"]["name"].lower() in FORBIDDEN
    ]
    if bad:
        print(
            f"refusing the corpus install: it would install {', '.join(bad)} over the project's torch; "
            "pick another library (or version) in the same domain.",
            file=sys.stderr,
        )
        return 1
    print(
        f"corpus install keeps torch: {len(report.get('install', []))} packages, none of {sorted(FORBIDDEN)}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1]))
