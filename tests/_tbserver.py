"""Start a real TensorBoard server on 127.0.0.1 and read its HTTP API (tests, screenshots).

Used by ``tests/test_dashboard.py`` and ``docs/make_screenshots.py`` to prove that what the suite
writes renders in TensorBoard itself, not only in the event files.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class TensorBoardServer:
    """A running ``tensorboard`` process; ``get(path)`` reads its JSON API."""

    def __init__(self, url: str, proc: subprocess.Popen, log_path: Path) -> None:
        self.url = url
        self.proc = proc
        self.log_path = log_path

    def get(self, path: str, **params: str) -> Any:
        """GET ``path`` (e.g. ``/data/runs``) and decode the JSON answer."""
        query = ("?" + urllib.parse.urlencode(params)) if params else ""
        with urllib.request.urlopen(self.url + path + query, timeout=10) as resp:
            body = resp.read()
        return json.loads(body) if body[:1] in (b"{", b"[") else body

    def get_bytes(self, path: str, **params: str) -> bytes:
        query = ("?" + urllib.parse.urlencode(params)) if params else ""
        with urllib.request.urlopen(self.url + path + query, timeout=10) as resp:
            return resp.read()


def recipe_entry_point_installed() -> bool:
    """True when the package installed in this environment registers the Recipe tab (the
    ``tensorboard_plugins`` entry point), as the ``tensorboard`` command sees it: in
    site-packages, not in a checkout's build leftovers on the current directory."""
    import site
    import sysconfig
    from importlib.metadata import distributions

    paths = [sysconfig.get_paths()["purelib"], *site.getsitepackages()]
    paths += [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return any(
        ep.group == "tensorboard_plugins" and ep.name == "recipe"
        for dist in distributions(path=paths)
        for ep in dist.entry_points
    )


#: ``tensorboard`` with the Recipe tab added explicitly, for a checkout whose package is installed
#: without the ``tensorboard_plugins`` entry point (an old install); the rest as the command line
_LAUNCHER = """
import sys
from tensorboard import default, program
from lightning_recipe_tensorboard.plugin import RecipePlugin
plugins = [p for p in default.get_plugins() if p is not RecipePlugin]  # static + dynamic
tb = program.TensorBoard(plugins=[*plugins, RecipePlugin])
tb.configure(argv=["tensorboard", *sys.argv[1:]])
sys.exit(tb.main())
"""


def _tensorboard_cmd() -> list[str]:
    if not recipe_entry_point_installed():
        return [sys.executable, "-c", _LAUNCHER]
    exe = Path(sys.executable).with_name("tensorboard")
    if exe.exists():
        return [str(exe)]
    return [sys.executable, "-m", "tensorboard.main"]  # this environment's, not another one on PATH


@contextmanager
def serve(
    logdir: str | os.PathLike, timeout: float = 60.0, wait_for_tag: str | None = None
) -> Iterator[TensorBoardServer]:
    """Run ``tensorboard --logdir LOGDIR`` on 127.0.0.1 (free port) until the block ends.

    Waits (at most ``timeout`` seconds) until the server answers and has loaded a run holding
    ``wait_for_tag`` among its scalar tags, if given. The process is always stopped at the end.
    """
    port = free_port()
    log_path = Path(tempfile.mkdtemp(prefix="tb_server_")) / "tensorboard.log"
    cmd = [
        *_tensorboard_cmd(),
        "--logdir",
        str(logdir),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--load_fast",
        "false",
        "--reload_interval",
        "1",
    ]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
        )
    server = TensorBoardServer(f"http://127.0.0.1:{port}", proc, log_path)
    try:
        _wait_ready(server, timeout, wait_for_tag)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _wait_ready(server: TensorBoardServer, timeout: float, wait_for_tag: str | None) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(
                f"tensorboard exited with {server.proc.returncode}: {server.log_path.read_text()[-2000:]}"
            )
        try:
            runs = server.get("/data/runs")
            if runs and wait_for_tag is None:
                return
            if runs:
                tags = server.get("/data/plugin/scalars/tags")
                if any(wait_for_tag in t for t in tags.values()):
                    return
        except (urllib.error.URLError, ConnectionError, json.JSONDecodeError, TimeoutError) as exc:
            last = exc
        time.sleep(0.5)
    raise TimeoutError(f"tensorboard did not become ready in {timeout:.0f}s ({last}); log: {server.log_path}")


def find_chromium() -> str | None:
    """Path of a Chromium binary, or None."""
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
    "--hide-scrollbars",
)


def chromium(args: list[str], timeout: float = 90.0) -> subprocess.CompletedProcess:
    """Run headless Chromium with a fresh profile and the flags this machine needs."""
    exe = find_chromium()
    if exe is None:
        raise FileNotFoundError("chromium is not installed (apt-get install chromium)")
    profile = tempfile.mkdtemp(prefix="chromium_profile_")
    try:
        return subprocess.run(
            [exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    finally:
        shutil.rmtree(profile, ignore_errors=True)


class BrowserPage:
    """Headless Chromium driven over the DevTools protocol (needs ``websocket-client``).

    Example::

        with BrowserPage.open() as page:
            page.goto(server.url + "/#custom_scalars")
            page.wait_for_text("Recipe")
            page.screenshot("recipe.png")
    """

    def __init__(self, proc: subprocess.Popen, ws: Any, profile: str) -> None:
        self.proc, self.ws, self.profile = proc, ws, profile
        self._id = 0

    @classmethod
    @contextmanager
    def open(cls, width: int = 1400, height: int = 1000, timeout: float = 30.0) -> Iterator[BrowserPage]:
        import websocket  # websocket-client, a dev dependency

        exe = find_chromium()
        if exe is None:
            raise FileNotFoundError("chromium is not installed (apt-get install chromium)")
        profile = tempfile.mkdtemp(prefix="chromium_profile_")
        proc = subprocess.Popen(
            [
                exe,
                *CHROMIUM_FLAGS,
                f"--user-data-dir={profile}",
                "--remote-debugging-port=0",
                f"--window-size={width},{height}",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            port_file = Path(profile) / "DevToolsActivePort"
            deadline = time.monotonic() + timeout
            while not (port_file.exists() and port_file.read_text().strip()):
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("chromium did not open its DevTools port")
                time.sleep(0.2)
            port = int(port_file.read_text().split()[0])
            pages = []
            while not pages:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5) as resp:
                    pages = [p for p in json.loads(resp.read()) if p.get("type") == "page"]
                if not pages:
                    time.sleep(0.2)
            ws = websocket.create_connection(
                pages[0]["webSocketDebuggerUrl"], timeout=timeout, suppress_origin=True
            )
            page = cls(proc, ws, profile)
            page.send(
                "Emulation.setDeviceMetricsOverride",
                width=width,
                height=height,
                deviceScaleFactor=1,
                mobile=False,
            )
            yield page
        finally:
            try:
                proc.terminate()
                proc.wait(timeout=10)
            except Exception:
                proc.kill()
            shutil.rmtree(profile, ignore_errors=True)

    def send(self, method: str, **params: Any) -> dict[str, Any]:
        """Send a DevTools command and return its result."""
        self._id += 1
        self.ws.send(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self._id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def goto(self, url: str) -> None:
        self.send("Page.navigate", url=url)

    def evaluate(self, expression: str) -> Any:
        """Evaluate JavaScript in the page and return its (JSON) value."""
        res = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        return res.get("result", {}).get("value")

    #: JavaScript returning the text of the page, shadow roots and same-origin iframes (the
    #: dynamic plugins' tabs, such as Recipe) included
    DEEP_TEXT = """
    (() => { const out = [];
      const walk = (n) => { if (!n) return;
        if (n.nodeType === 1 && (n.tagName === 'STYLE' || n.tagName === 'SCRIPT')) return;
        if (n.nodeType === 3) { const t = n.textContent.trim(); if (t) out.push(t); }
        if (n.shadowRoot) walk(n.shadowRoot);
        if (n.tagName === 'IFRAME') {
          try { walk(n.contentDocument && n.contentDocument.body); } catch (e) {} }
        for (const c of n.childNodes || []) walk(c); };
      walk(document.body); return out.join('\\n'); })()
    """

    def text(self) -> str:
        """All text in the page, including inside shadow DOM and iframes."""
        return self.evaluate(self.DEEP_TEXT) or ""

    def wait_for_text(self, needle: str, timeout: float = 30.0) -> str:
        """Wait until ``needle`` appears in the page text; return the text."""
        deadline = time.monotonic() + timeout
        text = ""
        while time.monotonic() < deadline:
            text = self.text()
            if needle in text:
                return text
            time.sleep(0.5)
        raise TimeoutError(f"{needle!r} did not appear in {timeout:.0f}s; page text starts: {text[:300]!r}")

    def screenshot(self, path: str | os.PathLike) -> None:
        """Save a PNG of the viewport."""
        import base64

        data = self.send("Page.captureScreenshot", format="png")["data"]
        Path(path).write_bytes(base64.b64decode(data))
