"""Which errors are the user's to fix, and which a task retries."""
from __future__ import annotations

from store import StoreError, StoreOutage, StoreUnavailable


def is_user_error(e: BaseException) -> bool:
    """Bad input (ValueError) or a store that refuses (no such bucket, access denied, a
    lease another writer holds), but not an outage: the store may come back. Never
    retried; the command line shows its message without a traceback."""
    return isinstance(e, ValueError) or (isinstance(e, StoreError)
                                         and not isinstance(e, (StoreUnavailable, StoreOutage)))


def is_io_error(task, task_run, state) -> bool:
    """Retry transient I/O only: not a user's error, nor a StoreOutage (its window was the retrying)."""
    try:
        state.result()
    except Exception as e:
        return not is_user_error(e) and not isinstance(e, StoreOutage)
    return False
