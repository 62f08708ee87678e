"""Fan-out: each unit (a repeat of a variant) as a flow run of its own deployment, watched and resubmitted.

A crashed child (pod lost, node gone) is started again as the next attempt, which
resumes from the checkpoint; a failed one is not (another attempt would only repeat
it); a cancelled one cancels the run. Idempotency keys per attempt let a retried or
restarted parent get its children back instead of duplicates.
"""
from __future__ import annotations

import dataclasses
import time
import uuid
from dataclasses import dataclass
from typing import Callable

from prefect import get_client
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.deployments import run_deployment
from prefect.states import Cancelled, Cancelling

from run.context import RunContext
from run.layout import PAUSED, Unit
from run.records import UnitResult

POLL_S = 5.0  # how often the parent looks at its children; each look is one API call per child


class RunCancelled(RuntimeError):
    """A child was cancelled: the run is cancelled."""


@dataclass
class Child:
    unit: Unit
    attempt: int
    flow_run: FlowRun

    @property
    def label(self) -> str:
        return f"flow run {self.flow_run.name} ({self.flow_run.id})"


def child_name(run_id: str, unit: Unit, attempt: int, rung: int | None = None) -> str:
    return f"{run_id}-{unit.label}-{'' if rung is None else f'r{rung}-'}a{attempt}"


def idempotency_key(run_id: str, unit: Unit, attempt: int, rung: int | None = None) -> str:
    seed = f"s{unit.seed}:" if unit.repeated else ""
    return f"{run_id}:{unit.variant}:{seed}{'' if rung is None else f'r{rung}:'}{attempt}"


def fan_out(ctx: RunContext, parameters: dict[Unit, dict],
            on_change: Callable[[str, dict], None] = lambda label, row: None,
            rung: int | None = None) -> list[UnitResult]:
    """Train each unit as a flow run of `variant_deployment`; results in `parameters`' order.
    `rung` (successive halving): the children train to their `until_epoch` and pause; a
    unit's result is then its paused record (or its final one, if it ended sooner)."""
    store, run_id, deployment = ctx.store, ctx.run_id, ctx.params.variant_deployment
    attempts, deadline_s = ctx.params.variant_attempts, ctx.params.fanout_deadline_hours * 3600
    results: dict[Unit, UnitResult] = {}
    live: dict[Unit, Child] = {}
    first: dict[Unit, int] = {}  # `variant_attempts` bounds crashes within one execution

    def start(u: Unit, attempt: int) -> None:
        while True:
            run = run_deployment(deployment, parameters=parameters[u], timeout=0, as_subflow=True,
                                 flow_run_name=child_name(run_id, u, attempt, rung),
                                 idempotency_key=idempotency_key(run_id, u, attempt, rung), tags=["train-cifar"])
            if not (run.state and (run.state.is_failed() or run.state.is_cancelled() or _cancel_asked_of(run.id))):
                break
            # ended (or being cancelled) by an earlier execution: retrying the run means training
            # the unit again. A child cancelled at the deadline may not show Cancelled yet: its
            # SIGTERM can reschedule it first (seen under load), so the history decides.
            print(f"{u.label}: {child_name(run_id, u, attempt, rung)} {run.state.name.lower()} in an earlier execution "
                  f"of this run; starting attempt {attempt + 1}")
            attempt += 1
        first.setdefault(u, attempt)
        live[u] = Child(u, attempt, run)
        on_change(u.label, {"status": f"{run.state.name.lower() if run.state else 'scheduled'}", "attempts": attempt})

    def finish(u: Unit, result: UnitResult) -> None:
        results[u] = result
        live.pop(u, None)
        on_change(u.label, result.summary())

    def failed(u: Unit, error: str, attempt: int) -> UnitResult:
        return UnitResult.failed(u.variant, error, attempts=attempt, seed=u.seed)

    def stored(u: Unit) -> UnitResult | None:
        """The unit's final record, or at a rung its paused one once it reached the rung."""
        done = UnitResult.read(store, run_id, u)
        until = parameters[u].get("until_epoch")
        if done is None and until is not None:
            paused = UnitResult.read(store, run_id, u, PAUSED)
            done = paused if paused is not None and paused.epochs_run >= until else None
        return done

    for u in parameters:
        done = stored(u)
        if done is not None:
            print(f"{u.label}: already trained ({done.status}); not started again")
            finish(u, done)
        else:
            start(u, 1)

    deadline = time.monotonic() + deadline_s
    with get_client(sync_client=True) as client:
        while live:
            for u, child in list(live.items()):
                run = client.read_flow_run(child.flow_run.id)
                state = run.state
                if state is None or not state.is_final():
                    on_change(u.label, {"status": state.name.lower() if state else "scheduled",
                                        "attempts": child.attempt})
                    continue
                message = state.message or state.name
                cancelled = state.is_cancelled() or (state.is_crashed() and _cancel_asked(client, run.id))
                if state.is_completed():
                    got = stored(u)
                    finish(u, dataclasses.replace(got, attempts=child.attempt) if got else failed(
                        u, f"{child.label} completed but left no result record in {store.uri}", child.attempt))
                elif cancelled:
                    _cancel(client, [c for c in live.values() if c is not child], f"{child.label} was cancelled")
                    raise RunCancelled(f"{u.label}: {child.label} was cancelled ({message}); the run is cancelled")
                elif state.is_crashed() and child.attempt - first[u] + 1 < attempts:
                    print(f"{u.label}: {child.label} crashed ({message}); starting attempt {child.attempt + 1} "
                          f"({attempts} allowed), which resumes from the checkpoint")
                    start(u, child.attempt + 1)
                elif state.is_crashed():
                    finish(u, failed(u, f"crashed in all {attempts} attempts; the last, {child.label}: {message}",
                                     child.attempt))
                else:
                    finish(u, failed(u, f"{child.label} failed: {message}", child.attempt))
            if live and time.monotonic() > deadline:
                why = f"not finished within the fan-out deadline ({deadline_s / 3600:g} h)"
                _cancel(client, list(live.values()), why)
                for u, child in list(live.items()):
                    finish(u, failed(u, f"{child.label} {why}; cancelled", child.attempt))
            if live:
                time.sleep(POLL_S)
    return [results[u] for u in parameters]


def mark_pruned(flow_run_id: str, why: str) -> None:
    """The child that paused at the rung where its unit was stopped ends Cancelled, named
    Pruned, as the UI shows it. Its run had completed (paused): the state is forced."""
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(uuid.UUID(str(flow_run_id)), Cancelled(name="Pruned", message=why), force=True)


def _cancel_asked(client, flow_run_id) -> bool:
    """Someone cancelled the child: a process killed while Cancelling can report its
    SIGTERM as a crash before its worker records Cancelled (seen under load)."""
    return any(s.type == StateType.CANCELLING for s in client.read_flow_run_states(flow_run_id))


def _cancel_asked_of(flow_run_id) -> bool:
    with get_client(sync_client=True) as client:
        return _cancel_asked(client, flow_run_id)


def _cancel(client, children: list[Child], why: str) -> None:
    """A running child through Cancelling (its worker stops the process); one not started, directly."""
    for c in children:
        run = client.read_flow_run(c.flow_run.id)
        if run.state is None or run.state.is_final():
            continue
        state = Cancelling(message=why) if run.state.is_running() or run.state.is_pending() else Cancelled(message=why)
        client.set_flow_run_state(uuid.UUID(str(c.flow_run.id)), state, force=True)
        print(f"{c.unit.label}: cancelled {c.label}: {why}")
