"""The Prefect API a command-line run talks to, started early when there is none.

With no PREFECT_API_URL, Prefect would start its temporary server at the run's first
API call and wait for it (about 5.5 s on 2 cores). `start()` boots the same server in
its own process before the CLI imports torch and the project, so the two overlap:
about 3 s off every `make run` (benchmarks/README.md, orchestration). With
PREFECT_API_URL set, nothing is started.
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
    url: str


def _free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start() -> TemporaryAPI | None:
    """None when an API is configured (or Prefect's ephemeral mode is off)."""
    settings = get_current_settings()
    if settings.api.url or not settings.server.ephemeral.enabled:
        return None
    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--app-dir", str(prefect.__module_path__.parent), "--factory",
         "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port),
         "--log-level", "error", "--lifespan", "on"],
        # a session of its own: a terminal's Ctrl-C (SIGINT to the whole foreground process
        # group) reaches this process only, which records the run as cancelled on the server
        env=server_env(settings), start_new_session=True)
    api = TemporaryAPI(process, f"http://127.0.0.1:{port}/api")
    # registered before Prefect's log and event workers register theirs: atexit runs
    # handlers last-in first-out, so those flush to the server before it stops
    atexit.register(stop, api)
    return api


def server_env(settings) -> dict[str, str]:
    """This environment with the settings in force here (from a profile too), the UI off,
    and telemetry off unless the user set it: offline, its first report fails with an
    ERROR that would be the first line of every run."""
    return {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", **os.environ, "PREFECT_UI_ENABLED": "0",
            "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1",
            **settings.to_environment_variables(exclude_unset=True)}


def ready(api: TemporaryAPI | None, timeout: float | None = None) -> None:
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
    if api is None:
        yield
        return
    with temporary_settings(updates={PREFECT_API_URL: api.url}):
        yield


def see_later(flow_run_id) -> str:
    """The run stays in the Prefect home's database, which `make server` serves."""
    server = get_current_settings().server.api
    return (f"to see this run in the Prefect UI: make server, then open "
            f"http://{server.host}:{server.port}/runs/flow-run/{flow_run_id}")


def stop(api: TemporaryAPI | None, graceful: bool = True) -> None:
    """Gracefully, so it saves what it was sent; at once when it was sent nothing. Safe twice."""
    if api is not None and api.process.poll() is None:
        api.process.terminate() if graceful else api.process.kill()
        try:
            api.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            api.process.kill()
            api.process.wait()
