"""The dashboard a user opens: a real TensorBoard server over a short demo run, its HTTP API, and
(where Chromium is installed) the rendered page in headless Chromium.

The browser part needs Debian's chromium (``apt-get install chromium``) and ``websocket-client``;
without them it is skipped with the reason. The HTTP part always runs.
"""

import pytest

from _tbserver import BrowserPage, find_chromium, serve
from lightning_recipe.demo import run_demo

pytestmark = pytest.mark.slow

SCALARS = [
    "recipe/loss/train",
    "recipe/lr/opt0_group0",
    "recipe/update_ratio_summary/median",
    "recipe/update_ratio_summary/band_low",
    "recipe/train_val/val_loss",
    "recipe/train_val/val_loss_log10",
    "recipe/train_val_gap/acc",
    "recipe/input_independent/real_loss",
    "recipe/input_independent/zero_loss",
    "recipe/activation_stats/features.2/dead_fraction",
    "recipe/grad_depth_ratio",
    "recipe/ensemble/single/loss",
    "recipe/ensemble/snapshot_ensemble/loss",
    "recipe/ensemble/averaged/loss",
    "recipe/prediction_dynamics/accuracy",
    "recipe/data/mean",
]
HISTOGRAMS = [
    "recipe/activations/features.2",
    "recipe/gradients/features.0",
    "recipe/weights/features.0.weight",
    "recipe/labels",
    "recipe/update_ratio_summary/log10_ratios",
]
IMAGES = ["recipe/batch_before_net", "recipe/first_layer_filters", "recipe/prediction_dynamics"]
CHARTS = [
    "Train vs val loss",
    "Train vs val loss (log10)",
    "real vs zero-input loss",
    "Dead ReLU units (fraction per layer)",
    "single vs ensemble vs averaged (validation loss)",
]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    logdir = tmp_path_factory.mktemp("dashboard")
    _, report = run_demo(epochs=3, logdir=logdir)
    return logdir, report


@pytest.fixture(scope="module")
def server(demo_run):
    logdir, _ = demo_run
    with serve(logdir, timeout=90, wait_for_tag="recipe/loss/train") as srv:
        yield srv


def tags_of(srv, plugin):
    data = srv.get(f"/data/plugin/{plugin}/tags")
    (run,) = data.keys()
    return run, data[run]


def test_server_lists_the_run_and_every_tag_kind(server):
    assert server.get("/data/runs") == ["healthy/version_0"]
    _, scalars = tags_of(server, "scalars")
    assert set(SCALARS) <= set(scalars), sorted(set(SCALARS) - set(scalars))
    _, hists = tags_of(server, "histograms")
    assert set(HISTOGRAMS) <= set(hists), sorted(set(HISTOGRAMS) - set(hists))
    _, images = tags_of(server, "images")
    assert set(IMAGES) <= set(images)
    _, texts = tags_of(server, "text")
    assert {"recipe/findings/text_summary", "recipe/report/text_summary"} <= set(texts)


def test_tags_hold_real_data(server, demo_run):
    run, _ = tags_of(server, "scalars")
    points = server.get("/data/plugin/scalars/scalars", run=run, tag="recipe/loss/train")
    assert len(points) >= 5 and points[-1][2] < points[0][2]  # [wall_time, step, value]: the loss fell
    band = server.get("/data/plugin/scalars/scalars", run=run, tag="recipe/update_ratio_summary/band_low")
    assert {p[2] for p in band} == {-5.0}
    hist = server.get("/data/plugin/histograms/histograms", run=run, tag="recipe/activations/features.2")
    assert len(hist) >= 2
    images = server.get("/data/plugin/images/images", run=run, tag="recipe/first_layer_filters")
    assert len(images) >= 2  # one per epoch
    png = server.get_bytes("/data/plugin/images/individualImage?" + images[-1]["query"])
    assert png[:4] == b"\x89PNG" and len(png) > 500
    report = server.get("/data/plugin/text/text", run=run, tag="recipe/report/text_summary")
    text = report[-1]["text"]
    assert "lightning_recipe report" in text and "ensemble-evaluated" in text
    _, demo_report = demo_run
    assert f"step {demo_report['global_step']}" in text


def test_custom_scalars_layout_is_the_recipe_section(server):
    layout = server.get("/data/plugin/custom_scalars/layout")
    (category,) = layout["category"]
    assert category["title"] == "Recipe"
    titles = [c["title"] for c in category["chart"]]
    for wanted in CHARTS:
        assert wanted in titles
    assert any(t.startswith("Update ratio, log10") for t in titles)
    assert titles[0].startswith("Training loss")  # the charts a user reads first come first


def _browser_or_skip():
    if find_chromium() is None:
        pytest.skip("chromium is not installed (apt-get install chromium): browser part skipped")
    try:
        import websocket  # noqa: F401
    except ImportError:
        pytest.skip("websocket-client is not installed (pip install websocket-client)")


def test_browser_shows_the_recipe_section_and_findings(server, tmp_path):
    _browser_or_skip()
    with BrowserPage.open(1400, 1200) as page:
        page.goto(server.url + "/#custom_scalars")
        text = page.wait_for_text("real vs zero-input loss", timeout=60)
        assert "Recipe" in text and "Train vs val loss" in text and "Update ratio" in text
        page.screenshot(tmp_path / "recipe.png")
        assert (tmp_path / "recipe.png").stat().st_size > 10_000
        page.goto(server.url + "/#text")
        text = page.wait_for_text("lightning_recipe report", timeout=60)
        assert "recipe/findings" in text and "ensemble-evaluated" in text
