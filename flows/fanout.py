"""Fan-out: each variant as a flow run of its own deployment, watched and resubmitted.

Kubernetes (through the work pool) places each child on a GPU node and Prefect
records, reschedules and shows it; this module only starts the children and waits:

- Completed: the variant's result record is read from the store.
- Crashed (pod lost, node gone, worker killed): the next attempt is started; it
  resumes from the checkpoint. After `attempts` crashes the variant is failed.
- Failed: the variant is failed with the child's message; not resubmitted.
- Cancelled: somebody cancelled a child, so the whole run is cancelled.
- Past the deadline: unfinished children are cancelled and reported as failed.

Children are named `<run-id>-<variant>-a<attempt>` and carry the idempotency key
`<run-id>:<variant>:<attempt>`: a parent that is retried or restarted asks for the
same keys and gets its running (or finished) children back instead of duplicates.
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Callable

from prefect import get_client
from prefect.client.schemas.objects import FlowRun
from prefect.deployments import run_deployment
from prefect.states import Cancelled, Cancelling

from store import Store
from tasks.results import VariantResult

POLL_S = 5.0  # how often the parent looks at its children; each look is one API call per child


class RunCancelled(RuntimeError):
    """A child was cancelled: the run is cancelled."""


@dataclass
class Child:
    variant: str
    attempt: int
    flow_run: FlowRun

    @property
    def label(self) -> str:
        return f"flow run {self.flow_run.name} ({self.flow_run.id})"


def child_name(run_id: str, variant: str, attempt: int) -> str:
    return f"{run_id}-{variant}-a{attempt}"


def idempotency_key(run_id: str, variant: str, attempt: int) -> str:
    return f"{run_id}:{variant}:{attempt}"


def fan_out(deployment: str, run_id: str, parameters: dict[str, dict], store: Store, attempts: int,
            deadline_s: float, on_change: Callable[[str, dict], None] = lambda v, row: None) -> list[VariantResult]:
    """Train each variant of `parameters` ({variant: the child's parameters}) as a flow run
    of `deployment`, all at once; returns their results in the same order."""
    results: dict[str, VariantResult] = {}
    live: dict[str, Child] = {}

    def start(v: str, attempt: int) -> None:
        run = run_deployment(deployment, parameters=parameters[v], timeout=0, as_subflow=True,
                             flow_run_name=child_name(run_id, v, attempt),
                             idempotency_key=idempotency_key(run_id, v, attempt), tags=["train-cifar"])
        live[v] = Child(v, attempt, run)
        on_change(v, {"status": f"{run.state.name.lower() if run.state else 'scheduled'}", "attempts": attempt})

    def finish(v: str, result: VariantResult) -> None:
        results[v] = result
        live.pop(v, None)
        on_change(v, result.summary())

    for v in parameters:
        done = VariantResult.read(store, run_id, v)  # trained by an earlier execution of this run
        if done is not None:
            print(f"{v}: already trained ({done.status}); not started again")
            finish(v, done)
        else:
            start(v, 1)

    deadline = time.monotonic() + deadline_s
    with get_client(sync_client=True) as client:
        while live:
            for v, child in list(live.items()):
                run = client.read_flow_run(child.flow_run.id)
                state = run.state
                if state is None or not state.is_final():
                    on_change(v, {"status": state.name.lower() if state else "scheduled", "attempts": child.attempt})
                    continue
                message = state.message or state.name
                if state.is_completed():
                    got = VariantResult.read(store, run_id, v)
                    finish(v, _with_attempts(got, child.attempt) if got else VariantResult.failed(
                        v, f"{child.label} completed but left no result record in {store.uri}",
                        attempts=child.attempt))
                elif state.is_crashed() and child.attempt < attempts:
                    print(f"{v}: {child.label} crashed ({message}); starting attempt {child.attempt + 1} "
                          f"of {attempts}, which resumes from the checkpoint")
                    start(v, child.attempt + 1)
                elif state.is_crashed():
                    finish(v, VariantResult.failed(v, f"crashed in all {attempts} attempts; the last, {child.label}: "
                                                      f"{message}", attempts=child.attempt))
                elif state.is_cancelled():
                    _cancel(client, [c for c in live.values() if c is not child], f"{child.label} was cancelled")
                    raise RunCancelled(f"{v}: {child.label} was cancelled ({message}); the run is cancelled")
                else:  # Failed: a bug or bad input, which another attempt would only repeat
                    finish(v, VariantResult.failed(v, f"{child.label} failed: {message}", attempts=child.attempt))
            if live and time.monotonic() > deadline:
                why = f"not finished within the fan-out deadline ({deadline_s / 3600:g} h)"
                _cancel(client, list(live.values()), why)
                for v, child in list(live.items()):
                    finish(v, VariantResult.failed(v, f"{child.label} {why}; cancelled", attempts=child.attempt))
            if live:
                time.sleep(POLL_S)
    return [results[v] for v in parameters]


def _with_attempts(result: VariantResult, attempts: int) -> VariantResult:
    result.attempts = attempts
    return result


def _cancel(client, children: list[Child], why: str) -> None:
    """Cancel children that are still going: a running one through Cancelling (its worker
    stops the process), one that has not started yet directly."""
    for c in children:
        run = client.read_flow_run(c.flow_run.id)
        if run.state is None or run.state.is_final():
            continue
        state = Cancelling(message=why) if run.state.is_running() or run.state.is_pending() else Cancelled(message=why)
        client.set_flow_run_state(uuid.UUID(str(c.flow_run.id)), state, force=True)
        print(f"{c.variant}: cancelled {c.label}: {why}")
