"""One run per missed night: a scheduled run that starts after a newer night of its
deployment is already due ends without training (`late_runs: latest`).

When the server or the workers were down (a weekend), Prefect starts every missed
scheduled run back to back once they are up again. Each would train the same code on
the same data; only the newest is worth its GPUs.
"""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Iterable

from prefect.client.schemas.objects import FlowRun, StateType

# A newer night in one of these states has trained, is training or will train: this night
# is stale. One that was cancelled (by someone, or by the deployment's concurrency limit),
# failed or crashed produced no model, so it does not stand in for this one.
# SCHEDULED includes Late and AwaitingConcurrencySlot; RUNNING includes Retrying.
WILL_OR_DID_TRAIN = (StateType.SCHEDULED, StateType.PENDING, StateType.RUNNING, StateType.PAUSED,
                     StateType.COMPLETED)


def newest_due(me: FlowRun, runs: Iterable[FlowRun], now: datetime) -> FlowRun | None:
    """The newest run among `runs` that makes the scheduled run `me` stale, or None: another
    auto-scheduled run of the same deployment whose night (expected start) is later than
    `me`'s and already due at `now` (tomorrow's run, created ahead by the scheduler, is not
    due), in a state of WILL_OR_DID_TRAIN. A run someone started by hand is never stale and
    never makes another stale."""
    if not me.auto_scheduled or me.deployment_id is None or me.expected_start_time is None:
        return None
    newer = [r for r in runs
             if r.id != me.id and r.auto_scheduled and r.deployment_id == me.deployment_id
             and r.expected_start_time is not None and me.expected_start_time < r.expected_start_time <= now
             and r.state_type in WILL_OR_DID_TRAIN]
    return max(newer, key=lambda r: (r.expected_start_time, str(r.id)), default=None)


def superseding_run(me: FlowRun, now: datetime | None = None) -> FlowRun | None:
    """newest_due over the server's runs of `me`'s deployment scheduled after `me` and up to
    `now` (the server has no filter for auto_scheduled: newest_due checks it)."""
    from prefect import get_client
    from prefect.client.schemas.filters import (FlowRunFilter, FlowRunFilterDeploymentId,
                                                FlowRunFilterExpectedStartTime, FlowRunFilterState,
                                                FlowRunFilterStateType)
    from prefect.client.schemas.sorting import FlowRunSort

    if not me.auto_scheduled or me.deployment_id is None or me.expected_start_time is None:
        return None  # a run started by hand, or outside a deployment: no query
    now = now or datetime.now(timezone.utc)
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                deployment_id=FlowRunFilterDeploymentId(any_=[me.deployment_id]),
                expected_start_time=FlowRunFilterExpectedStartTime(after_=me.expected_start_time, before_=now),
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=list(WILL_OR_DID_TRAIN)))),
            sort=FlowRunSort.EXPECTED_START_TIME_DESC, limit=200)
    return newest_due(me, runs, now)


def superseded_message(me: FlowRun, newer: FlowRun) -> str:
    return (f"nothing trained: the night of {_when(me.expected_start_time)} is superseded by the newer scheduled "
            f"run {newer.name} ({newer.id}) of {_when(newer.expected_start_time)}, already due "
            f"({newer.state_name or newer.state_type.value}); late_runs=all trains every missed night")


def _when(t: datetime) -> str:
    return f"{t.astimezone(timezone.utc):%Y-%m-%d %H:%M} UTC"


def origin() -> tuple[str | None, str | None]:
    """(deployment name, night) of the current flow run: the night (YYYY-MM-DD of the
    scheduled start, UTC) only for a run its deployment's schedule created; (None, None)
    outside a deployment."""
    from prefect.context import FlowRunContext
    from prefect.runtime import deployment, flow_run

    ctx = FlowRunContext.get()
    if ctx is None or ctx.flow_run is None or not deployment.name:
        return None, None
    night = (f"{flow_run.scheduled_start_time.astimezone(timezone.utc):%Y-%m-%d}"
             if ctx.flow_run.auto_scheduled else None)
    return deployment.name, night
