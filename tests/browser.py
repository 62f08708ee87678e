"""A real headless Chromium for the tests, driven over the DevTools protocol (CDP).

`--dump-dom` cannot say whether an image loaded (naturalWidth is layout state, not
markup), so the page is opened in a browser that stays up, and JavaScript is
evaluated in it over CDP's websocket (the `websockets` package comes with Prefect).
"""
from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1400,2000"]


class Page:
    """One page of a headless Chromium at `url`; `evaluate` runs JavaScript in it."""

    def __init__(self, url: str, profile: Path):
        # a profile used before holds the port of a browser that is gone
        (profile / "DevToolsActivePort").unlink(missing_ok=True)
        self.proc = subprocess.Popen([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "--remote-debugging-port=0", url],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        try:
            self.ws = _connect(profile / "DevToolsActivePort", self.proc)
        except BaseException:
            self.close()
            raise
        self._id = 0

    def send(self, method: str, params: dict | None = None) -> dict:
        """The result of one CDP command (events that come before its answer are skipped)."""
        self._id += 1
        self.ws.send(json.dumps({"id": self._id, "method": method, "params": params or {}}))
        while True:
            msg = json.loads(self.ws.recv(timeout=30))
            if msg.get("id") == self._id:
                break
        if "error" in msg:
            raise RuntimeError(f"{method} failed: {msg['error']}")
        return msg["result"]

    def evaluate(self, expression: str):
        """The JSON value of `expression` in the page (an exception in it raises here)."""
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression!r} raised in the page: {result['exceptionDetails']}")
        return result["result"].get("value")

    def text(self) -> str:
        """The page's text as it stands: its markup with the tags taken out and the spaces
        collapsed (what `chromium --dump-dom` would show of it)."""
        return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", self.evaluate("document.documentElement.outerHTML") or ""))

    def wait_for(self, expression: str, timeout: float = 90):
        """`expression`'s value once it is truthy, polled: the UI renders after its API calls,
        later on a busy machine. Fails after `timeout` seconds, showing what the page had."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                value = self.evaluate(expression)
            except RuntimeError as e:  # a page between two documents has no context to run in
                value, error = None, e
            else:
                error = None
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"{expression!r} still {error or value!r} after {timeout:.0f}s; "
                                     f"the page shows: {self._shown()}")
            time.sleep(0.5)

    def wait_for_text(self, *needles: str, patterns: tuple[str, ...] = (), timeout: float = 90) -> str:
        """The page's `text()` once it holds every one of `needles` and matches every regular
        expression of `patterns`, polled; fails after `timeout` seconds naming what was missing
        and showing the page."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                text = self.text()
            except RuntimeError:
                text = ""
            missing = [n for n in needles if n not in text] + [p for p in patterns if not re.search(p, text)]
            if not missing:
                return text
            if time.monotonic() > deadline:
                raise AssertionError(f"not on the page after {timeout:.0f}s: {missing}; "
                                     f"it shows: {text[-3000:]}")
            time.sleep(0.5)

    def screenshot(self, path: Path) -> Path:
        """A PNG of the page as it is now."""
        path.write_bytes(base64.b64decode(self.send("Page.captureScreenshot", {"format": "png"})["data"]))
        return path

    def _shown(self) -> str:
        try:
            return self.evaluate("document.body ? document.body.innerText : ''")[:3000]
        except RuntimeError as e:
            return f"(unreadable: {e})"

    def close(self) -> None:
        if getattr(self, "ws", None) is not None:
            self.ws.close()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def __enter__(self) -> Page:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _connect(port_file: Path, proc: subprocess.Popen, timeout: float = 60):
    """The page's CDP websocket: Chromium writes its debugging port (chosen by the OS:
    port 0) to DevToolsActivePort in its profile folder once it listens."""
    from websockets.sync.client import connect

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"chromium exited with {proc.returncode} before it listened")
        if port_file.exists() and port_file.read_text().strip():
            port = int(port_file.read_text().split()[0])
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5) as r:
                pages = [t for t in json.load(r) if t["type"] == "page"]
            if pages:
                return connect(pages[0]["webSocketDebuggerUrl"], max_size=None)
        time.sleep(0.2)
    raise TimeoutError(f"chromium did not open its debugging port within {timeout}s")
