"""Take the README's screenshots from a real demo run, in a real TensorBoard and a real browser.

    .venv/bin/python docs/make_screenshots.py                    # writes docs/images/*.png
    .venv/bin/python docs/make_screenshots.py recipe_checklist.png   # only the ones named

Needs Debian's chromium (apt-get install chromium) and websocket-client (the dev extra). It
trains the healthy digits demo and its ``dead-relu`` variant (for a findings table with
something in it), serves each with TensorBoard on 127.0.0.1 and photographs the views the README
explains; the Recipe tab shows both runs side by side.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from lightning_recipe.demo import run_demo

# the TensorBoard + headless Chromium harness lives with the tests (it is not shipped in the wheel)
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _tbserver import BrowserPage, serve

OUT = Path(__file__).parent / "images"

#: (file, run ("" for every run), URL hash, text to wait for, window height)
SHOTS = [
    ("recipe_checklist.png", "", "#recipe", "Squeeze out the juice", 2300),
    ("recipe_tab.png", "healthy", "#custom_scalars", "real vs zero-input loss", 1500),
    (
        "first_layer_filters.png",
        "healthy",
        "#images&tagFilter=recipe%2Ffirst_layer_filters",
        "first_layer_filters",
        760,
    ),
    (
        "prediction_dynamics.png",
        "healthy",
        "#images&tagFilter=recipe%2Fprediction_dynamics",
        "prediction_dynamics",
        900,
    ),
    (
        "layer_histograms.png",
        "healthy",
        "#histograms&tagFilter=features%5C.0",
        "recipe/weights/features.0.weight",
        900,
    ),
    ("findings.png", "dead-relu", "#text&tagFilter=recipe%2Ffindings", "recipe/findings", 900),
]


def main(names: list[str]) -> int:
    unknown = set(names) - {shot[0] for shot in SHOTS}
    if unknown:
        known = [shot[0] for shot in SHOTS]
        print(f"unknown screenshot(s) {sorted(unknown)}; known: {known}", file=sys.stderr)
        return 2
    OUT.mkdir(parents=True, exist_ok=True)
    logdir = Path(tempfile.mkdtemp(prefix="recipe_screenshots_"))
    for bug in (None, "dead-relu"):
        run_demo(bug=bug, epochs=8, logdir=logdir)
    for name, run, view, wait_for, height in SHOTS:
        if names and name not in names:
            continue
        with serve(logdir / run, timeout=90) as server, BrowserPage.open(1400, height) as page:
            page.goto(server.url + "/" + view)
            page.wait_for_text(wait_for, timeout=90)
            time.sleep(4)  # let the charts and images finish drawing
            page.screenshot(OUT / name)
        print(f"wrote {OUT / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
