"""A Prefect events worker that never finishes costs the suite a bounded wait, not the run;
events sent after a block on another API go to the API around it.

In a process of its own: an event is emitted through a client whose send never returns
(as a worker stuck on its queue task is; Prefect's drain would wait for it forever), then
tests/prefect_services.drain lets go of it after its bound and names it, a later drain
finds nothing to wait on, and the process still exits. And in a process with a test
harness: an event sent after a plain switch to another API and back is lost; after
`prefect_services.api_url` it reaches the harness.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time

import pytest

from tests.prefect_fixtures import REPO

SCRIPT = textwrap.dedent("""
    import asyncio, time
    from prefect.events.clients import EventsClient
    from prefect.events.schemas.events import Event
    from prefect.events.worker import EventsWorker
    from tests import prefect_services

    class Stuck(EventsClient):
        async def _emit(self, event):
            await asyncio.Event().wait()  # never set

    EventsWorker.instance(Stuck).send(Event(event="train-cifar.test",
                                            resource={"prefect.resource.id": "train-cifar.test"}))
    start = time.monotonic()
    print("let go:", prefect_services.drain(timeout=3))
    print(f"after {time.monotonic() - start:.0f} s")
    done, busy = EventsWorker.drain_all(timeout=30)
    print("a later drain waits on:", len(done) + len(busy))
""")


def _env(tmp_path) -> dict:
    # the worker's own API client is made but never used (no run context, no lookups)
    return {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PREFECT_HOME": str(tmp_path / "prefect"),
            "PREFECT_API_URL": "http://127.0.0.1:9/api", "PYTHONPATH": str(REPO)}


def test_a_worker_that_never_finishes_is_let_go_after_the_bound_and_the_process_exits(tmp_path):
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, env=_env(tmp_path), capture_output=True, text=True,
                         timeout=120)  # without the exit hooks' removal, it would not exit at all
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert any(line.startswith("let go: ['EventsWorker (Stuck) with ") for line in lines), out.stdout + out.stderr
    assert "after 3 s" in lines, out.stdout
    assert "Prefect workers still busy after 3 s, let go: ['EventsWorker (Stuck)" in out.stderr, out.stderr
    assert "a later drain waits on: 0" in lines, out.stdout  # the harness's own drain has nothing to wait on


def test_without_letting_go_the_stuck_worker_holds_the_process_at_exit(tmp_path):
    """Why the exit hooks go too: Prefect's drain with a timeout returns, but its exit hook
    waits on the stuck worker again, with no bound, and the process never ends."""
    script = SCRIPT.replace("prefect_services.drain(timeout=3)", "EventsWorker.drain_all(timeout=3)")
    proc = subprocess.Popen([sys.executable, "-u", "-c", script], cwd=REPO, env=_env(tmp_path), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 120
        while not any(line.startswith("a later drain waits on: 0") for line in lines):  # the script's end
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)
            time.sleep(0.2)
        with pytest.raises(subprocess.TimeoutExpired):  # ... and then it does not exit
            proc.wait(timeout=10)
    finally:
        proc.kill()
        proc.wait()


MOVED = textwrap.dedent("""
    import time
    from prefect import get_client
    from prefect.events import emit_event
    from prefect.events.filters import EventFilter, EventNameFilter
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.testing.utilities import prefect_test_harness
    from tests import prefect_services

    GONE = "http://127.0.0.1:9/api"  # a module's server, since stopped

    def emit(name):
        emit_event(event=name, resource={"prefect.resource.id": "train-cifar.test"})

    def arrived(name, within=30):
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            with get_client(sync_client=True) as c:
                if c.read_events(EventFilter(event=EventNameFilter(name=[name])), limit=1).events:
                    return True
            time.sleep(1)
        return False

    with prefect_test_harness(server_startup_timeout=120):
        with temporary_settings({PREFECT_API_URL: GONE}):
            emit("train-cifar.inside-plain")
        emit("train-cifar.after-plain")
        print("after a plain switch, the next event reached the API:", arrived("train-cifar.after-plain", 15))
        with prefect_services.api_url(GONE, timeout=20):
            emit("train-cifar.inside")
        emit("train-cifar.after")
        print("after api_url, the next event reached the API:", arrived("train-cifar.after"))
""")


@pytest.mark.slow
def test_events_after_a_block_on_another_api_go_to_the_api_around_it(tmp_path):
    """Why test_pictures points this process at its module's server through `api_url`:
    Prefect's events worker keeps the API it first sent to, so after a plain settings switch
    the process's later events go to the other server (here one that has stopped) and are
    lost; through `api_url` they reach the API around the block."""
    env = {**_env(tmp_path), "PREFECT_API_URL": ""}  # the harness sets its own
    out = subprocess.run([sys.executable, "-c", MOVED], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=240)
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert "after a plain switch, the next event reached the API: False" in lines, out.stdout
    assert "after api_url, the next event reached the API: True" in lines, out.stdout
