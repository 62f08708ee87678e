"""cli/api.py: when the temporary API server cannot come up, the run stops with a
clear error naming it, and no server process is left behind; it keeps quiet about
telemetry; and the CLI says how to see the run once it is gone."""
from __future__ import annotations

import subprocess
import sys

import pytest

from cli import api


def test_a_server_that_exits_is_named_with_its_exit_code():
    proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    with pytest.raises(RuntimeError, match=r"temporary Prefect API server exited with code 3 before it was ready.*"
                                           r"PREFECT_API_URL"):
        api.ready(api.TemporaryAPI(proc, f"http://127.0.0.1:{api._free_port()}/api"), timeout=30)


def test_a_server_that_never_answers_is_stopped_and_named():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    url = f"http://127.0.0.1:{api._free_port()}/api"  # nothing listens there
    with pytest.raises(RuntimeError, match=rf"server at {url} was not ready within 1 s"):
        api.ready(api.TemporaryAPI(proc, url), timeout=1)
    assert proc.poll() is not None  # stopped, not left running


def test_nothing_is_started_when_an_api_is_configured():
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:9/api"}):
        assert api.start() is None


def test_the_temporary_server_does_not_send_telemetry_unless_asked(monkeypatch):
    """Offline, Prefect's telemetry service logs an ERROR as the first line of every run."""
    from prefect.settings import PREFECT_SERVER_ANALYTICS_ENABLED, get_current_settings, temporary_settings

    monkeypatch.delenv("PREFECT_SERVER_ANALYTICS_ENABLED", raising=False)
    assert api.server_env(get_current_settings())["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    with temporary_settings(updates={PREFECT_SERVER_ANALYTICS_ENABLED: True}):  # in a profile, say
        assert api.server_env(get_current_settings())["PREFECT_SERVER_ANALYTICS_ENABLED"].lower() == "true"
    monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "true")
    assert api.server_env(get_current_settings())["PREFECT_SERVER_ANALYTICS_ENABLED"] == "true"


def test_the_way_to_see_a_run_later_is_make_servers_address():
    assert api.see_later("0d1e") == ("to see this run in the Prefect UI: make server, then open "
                                     "http://127.0.0.1:4200/runs/flow-run/0d1e")
