"""A real headless Chromium for the tests, driven over the DevTools protocol (CDP).

`--dump-dom` cannot say whether an image loaded (naturalWidth is layout state, not
markup), so the page is opened in a browser that stays up, and JavaScript is
evaluated in it over CDP's websocket (the `websockets` package comes with Prefect).
"""
from __future__ import annotations

import json
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
        self.proc = subprocess.Popen([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "--remote-debugging-port=0", url],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        try:
            self.ws = _connect(profile / "DevToolsActivePort", self.proc)
        except BaseException:
            self.close()
            raise
        self._id = 0

    def evaluate(self, expression: str):
        """The JSON value of `expression` in the page (an exception in it raises here)."""
        self._id += 1
        self.ws.send(json.dumps({"id": self._id, "method": "Runtime.evaluate",
                                 "params": {"expression": expression, "returnByValue": True}}))
        while True:  # events may come before the answer
            msg = json.loads(self.ws.recv(timeout=30))
            if msg.get("id") == self._id:
                break
        result = msg["result"]
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression!r} raised in the page: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 90):
        """`expression`'s value once it is truthy, polled (the UI renders after its API calls)."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value or time.monotonic() > deadline:
                return value
            time.sleep(0.5)

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
