"""Who writes a unit (a lease's owner), and whether Prefect knows that writer has ended."""
from __future__ import annotations

import os
import socket


def current_owner() -> str:
    """The flow run (the same across its retries and reschedules), else this process."""
    from prefect.runtime import flow_run

    fid = flow_run.get_id()
    return str(fid) if fid else f"process-{socket.gethostname()}-{os.getpid()}"


def flow_run_is_over(owner: str) -> bool:
    """True if `owner` is a flow run that Prefect knows has ended: it no longer writes."""
    import uuid

    from prefect import get_client

    try:
        with get_client(sync_client=True) as client:
            state = client.read_flow_run(uuid.UUID(owner)).state
    except Exception:  # noqa: BLE001 - not a flow run, or no API: cannot tell
        return False
    return state is not None and state.is_final()
