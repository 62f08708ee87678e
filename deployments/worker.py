"""The process worker for the project's local pools: Prefect's, reporting a crash once.

    .venv/bin/python deployments/worker.py --pool train-cifar-local            # make worker

Prefect's process worker reports a killed flow-run process twice: its runner at once,
and the worker again up to half a minute later, without looking at the run. A run
retried in between would be marked Crashed by that late report. Here the worker first
checks whether a final state was recorded since it picked the run up. (Kubernetes
pools are not affected: the pod's own process reports what the worker cannot see.)
"""
from __future__ import annotations

import argparse
import asyncio
import faulthandler
import math
import os
import signal
import sys
import threading
import time

from prefect.client.orchestration import PrefectClient
from prefect.client.schemas.objects import FlowRun
from prefect.settings import PREFECT_WORKER_HEARTBEAT_SECONDS
from prefect.utilities.processutils import setup_signal_handlers_worker
from prefect.workers import process


class ProcessWorker(process.ProcessWorker):

    @classmethod
    def __dispatch_key__(cls) -> str:
        return "train-cifar-process"  # leaves Prefect's `process` worker registered as itself

    async def _propose_crashed_state(self, flow_run: FlowRun, message: str,
                                     client: PrefectClient | None = None) -> None:
        ended = await self._ended_since_picked_up(flow_run, client or self.client)
        if ended is not None:
            self.get_flow_run_logger(flow_run).info(
                f"Not reporting flow run '{flow_run.id}' as crashed again: its end was recorded "
                f"({ended.type.value} at {ended.timestamp:%H:%M:%S}) and it may have been retried since")
            return
        await super()._propose_crashed_state(flow_run, message, client=client)

    @staticmethod
    async def _ended_since_picked_up(flow_run: FlowRun, client: PrefectClient):
        # the server stamps every state, so the times are one clock's
        if flow_run.state is None:
            return None
        picked_up = flow_run.state.timestamp
        states = await client.read_flow_run_states(flow_run.id)
        return next((s for s in sorted(states, key=lambda s: s.timestamp)
                     if s.is_final() and s.timestamp > picked_up), None)


async def serve(pool: str, name: str | None, limit: int | None) -> None:
    worker = ProcessWorker(work_pool_name=pool, name=name, limit=limit,
                           heartbeat_interval_seconds=int(PREFECT_WORKER_HEARTBEAT_SECONDS.value()))
    await worker.start(printer=print)


def exit_within(seconds: float) -> None:
    """Ends the process `seconds` from now if it has not ended by then. Python's exit joins
    every thread that is not a daemon, and a library's thread left blocked in a call without
    a timeout would hold a stopped worker, and `make worker`, for good: a stopped worker was
    once still alive 180 s after SIGTERM, in that join. It names them, with every thread's
    stack, and exits 1."""
    def give_up() -> None:
        time.sleep(seconds)
        left = [t.name for t in threading.enumerate() if not t.daemon and t is not threading.main_thread()]
        print(f"worker stopped, but after {seconds:g} s its exit still waits on threads {left}; "
              "ending without them (their stacks follow)", file=sys.stderr, flush=True)
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        os._exit(1)

    threading.Thread(target=give_up, name="exit-within", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pool", required=True, help="the process work pool to poll, e.g. train-cifar-local")
    ap.add_argument("--name", help="the worker's name (default: Prefect's)")
    ap.add_argument("--limit", type=int, help="at most this many flow runs at a time (default: no limit)")
    ap.add_argument("--exit-grace-seconds", type=float, default=60.0,
                    help="once stopped, how long the process waits for threads left running before it "
                         "exits without them (default: 60)")
    args = ap.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        ap.error(f"--limit: expected at least 1, found {args.limit}")
    if not args.exit_grace_seconds > 0:
        ap.error(f"--exit-grace-seconds: expected a number of seconds above 0, found {args.exit_grace_seconds:g}")
    if not math.isfinite(args.exit_grace_seconds):  # inf would be no bound at all
        ap.error(f"--exit-grace-seconds: expected a finite number of seconds, found {args.exit_grace_seconds:g}")
    # as `prefect worker start`: a first Ctrl-C or SIGTERM stops polling and lets runs finish.
    # Prefect's handler turns SIGTERM into a SIGINT to this process. A shell that starts a
    # job in the background without job control (`make worker &` in a script, nohup) starts
    # it with SIGINT ignored; inherited, that SIGINT would be dropped and the worker would
    # never stop on SIGTERM, and go on taking runs until killed. So SIGINT is Python's again.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    setup_signal_handlers_worker(os.getpid(), "the process worker", print)
    try:
        asyncio.run(serve(args.pool, args.name, args.limit))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("worker stopped", flush=True)
    finally:
        exit_within(args.exit_grace_seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
