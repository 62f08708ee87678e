"""The train-cifar flow and its command line.

    python -m flows.train_cifar --dataset synthetic --variants none,flip,flip-crop --epochs 5
"""
from __future__ import annotations

import atexit
import gc
import sys

from cli import api

if __name__ == "__main__":
    # registered first, so it runs after every other exit handler: shutdown then skips
    # collecting cycles among the objects of torch, Prefect and pandas (1.1 s here)
    atexit.register(gc.freeze)
# the temporary API server boots in its own process while this one imports the rest
_API = api.start() if __name__ == "__main__" and not {"-h", "--help"} & set(sys.argv[1:]) else None

import argparse  # noqa: E402 - after the server start, on purpose
import contextlib
import logging
import os
import signal
import traceback
import typing
from datetime import datetime, timezone

from prefect import flow
from prefect.runtime import flow_run
from prefect.states import Cancelled
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import ValidationError

from cli import interrupt
from run.params import RunParams, describe_errors, signed
from store import require_conditional_writes
from run.errors import is_user_error

def stable_run_id() -> str:
    """From the flow run's creation time and id, so that every execution of it (a Retry,
    a reschedule after SIGTERM) continues the same run."""
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    if ctx is not None and ctx.flow_run is not None:
        return run_id_of(ctx.flow_run.created or datetime.now(timezone.utc), ctx.flow_run.id)
    return f"{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{os.getpid()}"


def run_id_of(created: datetime, flow_run_id) -> str:
    """`<created>-<last 8 hex digits of the flow run id>`. Not the first 8: Prefect's ids are
    UUIDv7, whose first 12 digits are the creation millisecond, so runs created together
    (a backfill of missed nights) would share them; the last digits are random."""
    return f"{created.astimezone(timezone.utc):%Y%m%d-%H%M%S}-{str(flow_run_id)[-8:]}"


def _superseded(store_uri: str, run_id: str | None) -> Cancelled | None:
    """With late_runs=latest: Cancelled, named Superseded, when this scheduled night is stale
    (run/nightly.py); None to train. The night's trend entry waits in the store for the
    next run of the deployment (registry/trends.py)."""
    from prefect.context import FlowRunContext

    from run.nightly import origin, superseded_message, superseding_run
    from tasks import trend

    ctx = FlowRunContext.get()
    me = ctx.flow_run if ctx is not None else None
    newer = superseding_run(me) if me is not None else None
    if newer is None:
        return None
    message = superseded_message(me, newer)
    print(message)
    night = trend.entry(run_id or stable_run_id(), "superseded", me.expected_start_time.isoformat(), flow_run_id=str(me.id),
                        origin=origin(), message=message)
    trend.leave_superseded(store_uri, night)
    return Cancelled(name="Superseded", message=message)


@flow(name="train-cifar", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=16))
@signed(RunParams.model_fields)
def train_cifar(**params):
    """Train one CNN per augmentation variant, select by validation, test once, publish."""
    from flows.variants import devices_for
    from run.context import RunContext
    from run.layout import probe_key
    from tasks.data import fetch_dataset

    try:
        p = RunParams(**params)
    except ValidationError as e:
        raise ValueError(f"invalid parameter(s):\n{describe_errors(e)}") from None
    if p.late_runs == "latest" and (stale := _superseded(p.store, p.run_id)) is not None:
        return stale  # before data is fetched: a stale night trains nothing and writes only its trend entry
    ctx = RunContext(p, p.run_id or stable_run_id(), flow_run_id=flow_run.get_id(),
                     created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    interrupt.running(ctx.flow_run_id, ctx.run_id)
    # with fan-out the test runs on the parent's machine (a CPU pod), whatever `device` says
    test_device = devices_for("auto" if p.variant_deployment else p.device)[0]
    print(f"run {ctx.run_id}: {len(p.variants)} variant(s) of {p.model} -> {ctx.store_uri}")
    # fail early on a store that never answers or ignores conditional writes (leases, champion)
    require_conditional_writes(ctx.store, probe_key(ctx.run_id))

    ctx = ctx.with_dataset(fetch_dataset(ctx))
    try:
        return _train(ctx, test_device)
    except Exception as e:
        from tasks import trend

        trend.record_failure(ctx, e)  # the dataset is known: the night goes in its trend
        raise


def _train(ctx, test_device: str):
    """From the fetched dataset to the published run (or the skip)."""
    from cnn.train import STOP
    from flows.fanout import RunCancelled
    from flows.variants import train_units
    from run.cache import drop_local_copies
    from tasks.artifacts import create_run_artifacts
    from tasks.data_checks import check_data, purged_dataset
    from tasks.publish import publish_run
    from tasks.scoring import compare_variants, score_variants
    from tasks.selection import select_variant
    from tasks.skip import fingerprint_run, skip_run
    from tasks.testing import test_model

    p = ctx.params
    # before anything trains or any child flow run is asked for. A run that matches the
    # champion's run, which checked this same data the same way, skips without checking it
    # (a run with purge_test_duplicates on never does: its purge is known only once checked)
    fingerprint, matched = fingerprint_run(ctx, before_checks=True)
    if matched is None:
        ctx = ctx.with_data_checks(check_data(ctx))  # bad data stops the run here
        ctx = ctx.with_dataset(purged_dataset(ctx.dataset, ctx.data_checks))  # before the fingerprint: it counts
        fingerprint, matched = fingerprint_run(ctx)
    if matched is not None:
        return skip_run(ctx, fingerprint, matched)
    ctx = ctx.with_fingerprint(fingerprint)
    try:
        units = train_units(ctx)
    except RunCancelled as e:
        return Cancelled(message=str(e))
    if STOP.is_set():
        return Cancelled(message=interrupt.resume_hint(ctx.run_id))
    scores = score_variants(ctx, units)
    selected = select_variant(scores, p.select_metric)
    comparison = compare_variants(ctx, units, scores, selected)
    test = test_model(ctx, selected, test_device)
    out = publish_run(ctx, scores, selected, test, comparison)
    drop_local_copies(ctx.store, ctx.run_id)
    create_run_artifacts(ctx)
    _summary(scores, selected.name, out)
    return out


def _summary(scores: list, selected: str, out: dict) -> None:
    print("variant              status         epochs  best  val_loss  val_acc  seconds  attempts  "
          "mean val_acc (95% interval)")
    for s in scores:
        fmt = lambda x, f: "-" if x is None else format(x, f)  # noqa: E731
        ci = s.val_accuracy_ci
        mean = f"{s.val_accuracy_mean:.4f} ({ci[0]:.4f}-{ci[1]:.4f}) x{len(s.repeats)}" if s.selectable else "-"
        print(f"{s.name:<20} {s.status:<14} {fmt(s.epochs_run, 'd'):>6}  {fmt(s.best_epoch, 'd'):>4}  "
              f"{fmt(s.val_loss, '.4f'):>8}  {fmt(s.val_accuracy, '.4f'):>7}  {fmt(s.seconds, '.1f'):>7}  "
              f"{s.attempts:>8}  {mean}" + ("  <- selected" if s.name == selected else ""))
    print(f"test accuracy {out['test_accuracy']:.4f}; promoted: {out['promoted']}")


def _help(field) -> str:
    return field.description.replace("%", "%%")  # argparse %-formats help: "95%" would break it


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m flows.train_cifar", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for name, field in RunParams.model_fields.items():
        flag = "--" + name.replace("_", "-")
        default = field.get_default(call_default_factory=True)
        if field.annotation is bool:
            ap.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=_help(field))
        elif name == "variants":
            ap.add_argument(flag, default=",".join(default), metavar="A,B,...", help=_help(field) + " (comma-separated)")
        elif typing.get_origin(field.annotation) is typing.Literal:
            ap.add_argument(flag, choices=typing.get_args(field.annotation), default=default, help=_help(field))
        else:
            ap.add_argument(flag, default=default, help=_help(field), metavar=name.upper())
    return ap


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of every error, a user's mistake's too (not a run parameter)")
    try:
        args = parser.parse_args(argv)
    except SystemExit:
        api.stop(_API, graceful=False)
        raise
    raw = {k: v for k, v in vars(args).items() if k != "debug"}
    try:
        params = RunParams.model_validate(raw, strict=False)
    except ValidationError as e:
        print(f"error: invalid parameter\n{describe_errors(e, flag_style=True)}", file=sys.stderr)
        api.stop(_API, graceful=False)
        return 2
    state = error = None
    with interrupt.Stopper() as stopper, _console_tracebacks(args.debug):
        try:
            api.ready(_API)
            with api.using(_API):
                state = stopper.run(lambda: train_cifar(**params.model_dump(), return_state=True), _API)
                _send_prefect_backlog()
        except Exception as e:  # the temporary server did not come up
            error = e
    if _API is not None and state is not None:  # its "View at" link dies with the temporary server
        print(api.see_later(state.state_details.flow_run_id), file=sys.stderr)
    return _last_word(state, error, stopper.signum, args.debug)


def _send_prefect_backlog(timeout: float = 30.0) -> None:
    """Prefect's queued events and API logs, sent now: drained at exit instead, a slow
    queue prints "Still processing items" after the run's last word."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    EventsWorker.drain_all(timeout=timeout)
    APILogWorker.drain_all(timeout=timeout)


def _last_word(state, error: Exception | None, signum: int | None, debug: bool) -> int:
    """What to do next, last on stderr; the exit code: 0 done, 1 failed or cancelled,
    128 + the signal stopped."""
    name = signal.Signals(signum).name if signum else None
    if state is None and error is None:
        print(f"{name}: stopped before the run began; nothing was trained", file=sys.stderr)
        return interrupt.exit_code(signum)
    if state is not None and state.is_cancelled():
        print(f"{name or 'cancelled'}: {state.message}", file=sys.stderr)
        return interrupt.exit_code(signum) if signum else 1
    if state is not None and state.is_completed() and state.name == "Skipped":
        print(f"skipped: {state.message}", file=sys.stderr)
        print(state.result()["skipped"])  # the skip record: the last line on stdout, for scripts
        return 0
    try:
        if error is not None:
            raise error
        out = state.result()
    except Exception as e:
        if debug and state is None:  # the flow's own errors have their traceback in its log
            traceback.print_exc()
        print(f"error: {e}" if is_user_error(e) else f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(out["manifest"])  # the last line on stdout, for scripts
    return 0


@contextlib.contextmanager
def _console_tracebacks(shown: bool):
    """Unless `shown`, the console drops tracebacks of a user's mistake or of no variant
    trained: the message says what to do. Only the console's copy: the run's logger hands
    the record to the API's handler first (own handlers before the root's), so the UI's
    log keeps the traceback."""
    from prefect.logging.handlers import PrefectConsoleHandler

    from tasks.selection import NoVariantTrained

    def quiet(record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if error is not None and (is_user_error(error) or isinstance(error, NoVariantTrained)):
            record.exc_info = record.exc_text = None
        return True

    consoles = [] if shown else [h for h in logging.getLogger().handlers if isinstance(h, PrefectConsoleHandler)]
    for h in consoles:
        h.addFilter(quiet)
    try:
        yield
    finally:
        for h in consoles:
            h.removeFilter(quiet)


if __name__ == "__main__":
    sys.exit(main())
