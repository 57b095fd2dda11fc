"""The Recipe tab in a real TensorBoard: the healthy demo and two broken ones in one log directory,
the plugin listed and enabled, its ``runs`` route checked against each run's recipe_report.json,
and (where Chromium is installed) the tab rendered in headless Chromium, every diagnostic and
finding code in its DOM, and a run that is still training updating live.

TensorBoard is started as a user starts it (``tensorboard --logdir``) when the installed package
registers the entry point; for an older install of the package it is started with the plugin
passed explicitly (tests/_tbserver.py says which).
"""

import json
import shutil
import time

import pytest

from _tbserver import BrowserPage, find_chromium, serve
from lightning_recipe.demo import run_demo

pytestmark = pytest.mark.slow

BUGS = ("softmax", "dead-relu")
#: a synthetic run that is still training (only its report: it is mid-fit)
LIVE = "live/version_0"


@pytest.fixture(scope="module")
def logdir(tmp_path_factory):
    logdir = tmp_path_factory.mktemp("recipe_tab")
    for bug in (None, *BUGS):
        run_demo(bug=bug, epochs=2, logdir=logdir)
    healthy = json.loads((logdir / "healthy" / "version_0" / "recipe_report.json").read_text())
    live = dict(healthy, status="running", global_step=7, findings=[], counts={})
    live["figures"] = {k: (v if k.endswith("Check") else {}) for k, v in healthy["figures"].items()}
    (logdir / LIVE).mkdir(parents=True)
    (logdir / LIVE / "recipe_report.json").write_text(json.dumps(live))
    return logdir


@pytest.fixture(scope="module")
def server(logdir):
    with serve(logdir, timeout=120, wait_for_tag="recipe/loss/train") as srv:
        yield srv


def reports_on_disk(logdir):
    return {
        p.parent.relative_to(logdir).as_posix(): json.loads(p.read_text())
        for p in sorted(logdir.rglob("recipe_report.json"))
    }


def codes(findings, severities=("info", "warning", "error")):
    return {f["code"] for f in findings if f["severity"] in severities}


def test_plugin_is_listed_and_enabled(server):
    listing = server.get("/data/plugins_listing")
    assert listing["recipe"]["enabled"] is True
    assert listing["recipe"]["tab_name"] == "Recipe"
    assert listing["recipe"]["loading_mechanism"]["module_path"] == "/data/plugin/recipe/index.js"
    js = server.get_bytes("/data/plugin/recipe/index.js").decode()
    assert "export async function render" in js and "http" not in js.replace("http://www.w3.org/2000/svg", "")
    assert b".pill" in server.get_bytes("/data/plugin/recipe/style.css")


def test_runs_route_holds_every_report(server, logdir):
    data = server.get("/data/plugin/recipe/runs")
    disk = reports_on_disk(logdir)
    runs = {r["run"]: r for r in data["runs"]}
    assert set(runs) == set(disk) == {"healthy/version_0", "softmax/version_0", "dead-relu/version_0", LIVE}
    assert set(server.get("/data/runs")) == set(disk) - {LIVE}  # the same names TensorBoard gives its runs
    assert data["stages"][0]["key"] == "data"
    for name, report in disk.items():
        run = runs[name]
        assert run["status"] == report["status"] and run["global_step"] == report["global_step"]
        shown = [f for d in run["diagnostics"] for f in d["findings"]]
        assert sorted((f["code"], f["source"], f["step"]) for f in shown) == sorted(
            (f["code"], f["source"], f["step"]) for f in report["findings"]
        )
        by_name = {d["name"]: d for d in run["diagnostics"]}
        assert set(report["figures"]) <= set(by_name)
        for f in report["findings"]:
            if f["severity"] in ("warning", "error"):
                assert by_name[f["source"]]["status"] in ("warning", "error"), (name, f["code"])
        if name != LIVE:
            assert len(by_name["LossCurveMonitor"]["sparkline"]["points"]) >= 3
            assert by_name["LossCurveMonitor"]["sparkline"]["tag"] == "recipe/loss/train"
    assert not codes(disk["healthy/version_0"]["findings"], ("warning", "error"))
    assert "softmax-before-loss" in codes(disk["softmax/version_0"]["findings"])
    assert "dead-units" in codes(disk["dead-relu/version_0"]["findings"])
    assert all(d["status"] == "ok" for d in runs["healthy/version_0"]["diagnostics"] if d["known"])
    live = {d["name"]: d["status"] for d in runs[LIVE]["diagnostics"]}
    assert runs[LIVE]["status"] == "running" and live["LossCurveMonitor"] == "pending"


def test_plugin_is_disabled_not_broken_for_other_log_directories(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(tmp_path / "plain")) as writer:
        for step in range(3):
            writer.add_scalar("loss", 1.0 / (step + 1), step)
    with serve(tmp_path, timeout=120, wait_for_tag="loss") as srv:
        assert srv.get("/data/plugins_listing")["recipe"]["enabled"] is False
        assert srv.get("/data/plugin/recipe/runs")["runs"] == []


# ---------------------------------------------------------------------------- the browser
def _browser_or_skip():
    if find_chromium() is None:
        pytest.skip("chromium is not installed (apt-get install chromium): browser part skipped")
    try:
        import websocket  # noqa: F401
    except ImportError:
        pytest.skip("websocket-client is not installed (pip install websocket-client)")


#: per run (column), the diagnostics shown with their status, and the finding codes in the cells
DOM_STATE = """
(() => {
  const find = (root) => { if (!root) return null;
    for (const n of root.querySelectorAll('*')) {
      if (n.tagName === 'IFRAME' && n.contentDocument && n.contentDocument.getElementById('recipe-root'))
        return n.contentDocument;
      if (n.shadowRoot) { const d = find(n.shadowRoot); if (d) return d; } }
    return null; };
  const doc = find(document);
  if (!doc) return null;
  const out = {};
  for (const td of doc.querySelectorAll('tr.diag-row td[data-run]')) {
    const run = out[td.dataset.run] = out[td.dataset.run] || {status: {}, codes: []};
    run.status[td.parentElement.dataset.diagnostic] = td.dataset.status || 'absent';
    for (const c of td.querySelectorAll('.finding .code')) run.codes.push(c.textContent);
  }
  return out;
})()
"""


def _dom_state(page, want_runs, timeout=60.0):
    deadline = time.monotonic() + timeout
    state = None
    while time.monotonic() < deadline:
        state = page.evaluate(DOM_STATE)
        if state and want_runs <= set(state):
            return state
        time.sleep(0.5)
    shown = state and sorted(state)
    raise TimeoutError(f"the Recipe tab did not show {sorted(want_runs)}; it showed {shown}")


def test_tab_shows_every_diagnostic_and_finding_and_follows_a_live_run(server, logdir, tmp_path):
    _browser_or_skip()
    with BrowserPage.open(1400, 1600) as page:
        page.goto(server.url + "/#recipe")
        text = page.wait_for_text("Become one with the data", timeout=90)
        stages = ("Skeleton and dumb baselines", "Overfit", "Regularize", "Tune", "Squeeze out the juice")
        assert all(stage in text for stage in stages)
        routes = {r["run"]: r for r in server.get("/data/plugin/recipe/runs")["runs"]}
        state = _dom_state(page, set(routes))
        for name, run in routes.items():
            shown = state[name]
            assert shown["status"] == {d["name"]: d["status"] for d in run["diagnostics"]}, name
            want = {f["code"] for d in run["diagnostics"] for f in d["findings"]}
            assert want <= set(shown["codes"]), (name, want - set(shown["codes"]))
        for code in ("softmax-before-loss", "dead-units"):
            assert code in text
        assert "still training" in text and "running" in text.lower()
        page.screenshot(tmp_path / "recipe_tab.png")
        assert (tmp_path / "recipe_tab.png").stat().st_size > 20_000

        # the live run finishes with a finding of a diagnostic the checklist does not know yet
        path = logdir / LIVE / "recipe_report.json"
        report = json.loads(path.read_text())
        report.update(status="finished", global_step=60)
        report["findings"] = [
            {
                "code": "label-noise",
                "severity": "warning",
                "message": "12% of the training labels contradict their nearest neighbours.",
                "source": "LabelNoiseMonitor",
                "step": 40,
                "evidence": {"fraction": 0.12},
            }
        ]
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(report))
        shutil.move(tmp, path)
        page.wait_for_text("label-noise", timeout=30)
        state = _dom_state(page, {LIVE})
        assert state[LIVE]["status"]["LabelNoiseMonitor"] == "warning"
