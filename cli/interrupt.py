"""Ctrl-C, SIGTERM, SIGHUP at the command line: the run stops within seconds, cancelled and resumable.

Python runs signal handlers in the main thread only, so the flow runs in a thread of
its own (there Prefect installs no SIGTERM handler, which would raise wherever the
flow happens to be). The first signal stops every training loop at its next batch,
keeping the last finished epoch; a second, or GRACE_S without an end, stops at once.
The exit code is 128 + the signal's number.
"""
from __future__ import annotations

import contextvars
import os
import signal
import sys
import threading
import time
from typing import Callable

from cnn.train import STOP
from cli import api

GRACE_S = 20.0  # first signal to giving up on a clean stop: well inside a pod's 30 s grace period
SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

# what a stop at once marks Cancelled, and the run id to resume with
_current: dict[str, str | None] = {}


def running(flow_run_id, run_id: str) -> None:
    _current.update(flow_run_id=str(flow_run_id) if flow_run_id else None, run_id=run_id)


def resume_hint(run_id: str) -> str:
    return (f"run {run_id} stopped; each variant keeps the epochs it finished: to resume it, "
            f"run the same command with --run-id {run_id}")


def exit_code(signum: int) -> int:
    return 128 + signum


class Stopper:
    """While entered, the stop signals ask the run to stop instead of ending this process."""

    def __init__(self):
        self.received: list[int] = []
        self._previous: dict[int, object] = {}

    @property
    def signum(self) -> int | None:
            return self.received[0] if self.received else None

    def __enter__(self) -> Stopper:
        STOP.clear()
        _current.clear()
        if threading.current_thread() is threading.main_thread():  # else signals are not ours to take
            self._previous = {s: signal.signal(s, self._on_signal) for s in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        STOP.clear()

    def _on_signal(self, signum: int, frame) -> None:
        self.received.append(signum)
        STOP.set()

    def run(self, call: Callable[[], object], server: api.TemporaryAPI | None):
        """`call()` (the flow) in a thread of its own; None if a signal came before it began."""
        if self.received:
            return None
        out: dict[str, object] = {}

        def target() -> None:
            try:
                out["state"] = call()
            except BaseException as e:  # noqa: BLE001 - handed to the caller below, as if raised here
                out["error"] = e

        # the thread sees this one's context: the API the run is pointed at (api.using)
        thread = threading.Thread(target=contextvars.copy_context().run, args=(target,), name="flow")
        thread.start()
        deadline = None
        while thread.is_alive():
            thread.join(0.1)
            if self.received and deadline is None:
                deadline = time.monotonic() + GRACE_S
                name = signal.Signals(self.signum).name
                print(f"{name}: stopping the run at the next batch (the epoch in progress is dropped); "
                      f"{'press Ctrl-C' if self.signum == signal.SIGINT else 'signal'} again to stop at once",
                      file=sys.stderr)
            if thread.is_alive() and (len(self.received) > 1 or (deadline and time.monotonic() > deadline)):
                self._abandon(server)
        if "error" in out:
            raise out["error"]
        return out["state"]

    def _abandon(self, server: api.TemporaryAPI | None) -> None:
        """Mark the flow run Cancelled, stop the server, exit; the last finished epochs are in
        the local cache, and in the store where their upload had landed."""
        from prefect import get_client
        from prefect.states import Cancelled

        run_id, flow_run_id = _current.get("run_id"), _current.get("flow_run_id")
        hint = resume_hint(run_id) if run_id else "stopped before the run began; nothing was trained"
        if flow_run_id:
            try:
                with get_client(sync_client=True) as client:
                    client.set_flow_run_state(flow_run_id, Cancelled(message=f"stopped at once; {hint}"), force=True)
            except Exception as e:  # noqa: BLE001 - exiting is the point; say what was not recorded
                print(f"could not mark flow run {flow_run_id} Cancelled: {e}", file=sys.stderr)
        api.stop(server)
        if server is not None and flow_run_id:
            print(api.see_later(flow_run_id), file=sys.stderr)
        print(f"{signal.Signals(self.signum).name}: {hint}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        # the flow's thread cannot be ended from here, nor waited for: leave without it
        os._exit(exit_code(self.signum))
