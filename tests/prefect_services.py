"""Draining Prefect's in-process event and log workers within a bound.

`EventsWorker.drain_all()` and `APILogWorker` drains wait with no timeout, and the
test harness drains both that way when it exits. A worker whose queue task never
finishes (seen twice in `make test`: a session teardown of 414 s, and a fixture
teardown in test_champion that was still waiting 15 minutes later on an idle machine)
then holds a pytest-xdist worker, and with it the whole suite, for as long as it
likes. `drain(timeout)` drains every instance, waits at most `timeout` seconds, and
lets go of those that did not finish: they are already out of Prefect's registry
(draining removes them), so no later drain waits for them, and their exit hooks are
removed, so the process still exits. It warns naming what it let go of, and returns it.

Those workers are one per process, and each keeps the API it first sent to: a test that
points this process at another server (a module's own) for a while and leaves its events
worker bound there sends every later event of the process to a server that has stopped,
and the backlog never drains. `api_url(url)` drains them before and after such a block.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import threading
import warnings
from collections.abc import Iterator


def drain(timeout: float, client_type: type | None = None) -> list[str]:
    """Drain Prefect's events and API-log workers in this process (only the events workers
    sending through `client_type`, if given); the ones still busy after `timeout` seconds
    are let go, named in a warning and returned."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    instances = {}  # the registry is one dict on their common base class; read it through both
    for service in (EventsWorker, APILogWorker):
        with service._instance_lock, service._instance_cache_lock:
            instances.update((id(i), i) for i in service._instances.values()
                             if client_type is None or getattr(i, "client_type", None) is client_type)
    futures = {instance._drain(): instance for instance in instances.values()}
    _, busy = concurrent.futures.wait(futures, timeout=timeout)
    abandoned = []
    for future in busy:
        instance = futures[future]
        # threading calls these hooks before the interpreter exits; this one would wait forever
        threading._threading_atexits[:] = [  # type: ignore[attr-defined]
            hook for hook in threading._threading_atexits  # type: ignore[attr-defined]
            if getattr(getattr(hook, "func", hook), "__self__", None) is not instance]
        client = getattr(instance, "client_type", None)
        # the URL it was given, else the one its client opened (a client made without one
        # reads PREFECT_API_URL when the worker starts, and keeps it)
        api = (dict(getattr(instance, "client_options", ())).get("api_url")
               or getattr(getattr(instance, "_client", None), "_events_socket_url", None))
        abandoned.append(" ".join(filter(None, [type(instance).__name__, client and f"({client.__name__})",
                                                api and f"to {api}", f"with {instance._queue.qsize()} items left"])))
    if abandoned:
        warnings.warn(f"Prefect workers still busy after {timeout:g} s, let go: {abandoned}")
    return abandoned


@contextlib.contextmanager
def api_url(url: str, timeout: float = 60) -> Iterator[None]:
    """PREFECT_API_URL is `url` within the block, and Prefect's events and log workers
    start afresh on entry and on exit: what the block sends goes to `url`, what came before
    and comes after to the API around it."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    drain(timeout)
    with temporary_settings({PREFECT_API_URL: url}):
        try:
            yield
        finally:
            drain(timeout)
