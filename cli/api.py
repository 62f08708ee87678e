"""The Prefect API a command-line run talks to, started early when there is none.

With no PREFECT_API_URL, Prefect starts a temporary API server itself at the
run's first API call and waits for it: on 2 cores, about 1.5 s importing the
server code into this process and 4 s for the server process to boot, all
before the flow begins. The CLI calls `start()` as its first step instead,
before it imports torch and the project (2.5 to 3.5 s), so that the same server
(the command Prefect runs for its own temporary server) boots in its own process
meanwhile; `ready()` waits for its health check just before the flow runs, and
`using()` points the run at it. This takes about 3 s off every `make run`
(benchmarks/README.md, orchestration).

The server keeps its database in the Prefect home, as Prefect's own temporary
server does, and is stopped when this process exits, after Prefect has flushed
its logs and events to it; it runs in a session of its own, so that Ctrl-C at
the terminal stops the run, not the server the run reports its end to. With
PREFECT_API_URL set (a deployment, `make server`), nothing is started.
"""
from __future__ import annotations

import atexit
import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

import prefect
from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings


@dataclass
class TemporaryAPI:
    process: subprocess.Popen
    url: str  # http://127.0.0.1:PORT/api


def _free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start() -> TemporaryAPI | None:
    """Start a temporary API server in the background if no API is configured; returns
    None when one is (or when Prefect's ephemeral mode is switched off)."""
    settings = get_current_settings()
    if settings.api.url or not settings.server.ephemeral.enabled:
        return None
    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--app-dir", str(prefect.__module_path__.parent), "--factory",
         "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port),
         "--log-level", "error", "--lifespan", "on"],
        # a session of its own: a terminal's Ctrl-C (SIGINT to its whole foreground process
        # group) reaches this process only, which then records the run as cancelled on this
        # server before it stops it (cli/interrupt.py)
        env=server_env(settings), start_new_session=True)
    api = TemporaryAPI(process, f"http://127.0.0.1:{port}/api")
    # registered before Prefect's log and event workers register theirs: atexit runs
    # handlers last-in first-out, so those flush to the server before it stops
    atexit.register(stop, api)
    return api


def server_env(settings) -> dict[str, str]:
    """The temporary server's environment: this one's, with the settings in force here
    (from a profile too), the UI off, and Prefect's telemetry off unless the user set it.
    Offline, the telemetry service's first report fails with an ERROR that would be the
    first line of every run; and this server is this run's alone, gone when it ends."""
    return {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", **os.environ, "PREFECT_UI_ENABLED": "0",
            "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1",
            **settings.to_environment_variables(exclude_unset=True)}


def ready(api: TemporaryAPI | None, timeout: float | None = None) -> None:
    """Wait until the server answers its health check; a clear error if it cannot."""
    if api is None:
        return
    timeout = timeout or get_current_settings().server.ephemeral.startup_timeout_seconds
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if api.process.poll() is not None:
            raise RuntimeError(f"the temporary Prefect API server exited with code {api.process.returncode} "
                               "before it was ready (its output is above); set PREFECT_API_URL to a running "
                               "server (`make server`) to use that instead")
        try:
            with urllib.request.urlopen(f"{api.url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.05)
    stop(api)
    raise RuntimeError(f"the temporary Prefect API server at {api.url} was not ready within {timeout:.0f} s "
                       "(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS); set PREFECT_API_URL to a running "
                       "server (`make server`) to use that instead")


@contextlib.contextmanager
def using(api: TemporaryAPI | None):
    """Run the body against `api` (or the configured API when it is None)."""
    if api is None:
        yield
        return
    with temporary_settings(updates={PREFECT_API_URL: api.url}):
        yield


def see_later(flow_run_id) -> str:
    """How to open a run of the temporary server in the UI once that server is gone: its
    "View at" link dies with it, but the run stays in the Prefect home's database, which
    `make server` serves (on Prefect's default address, as the Makefile starts it)."""
    server = get_current_settings().server.api
    return (f"to see this run in the Prefect UI: make server, then open "
            f"http://{server.host}:{server.port}/runs/flow-run/{flow_run_id}")


def stop(api: TemporaryAPI | None, graceful: bool = True) -> None:
    """Stop the server: gracefully, so it saves what it was sent, or at once when it was
    sent nothing (a run refused for its parameters). Safe to call twice."""
    if api is not None and api.process.poll() is None:
        api.process.terminate() if graceful else api.process.kill()
        try:
            api.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            api.process.kill()
            api.process.wait()
