"""The command line: every invalid value is refused by name before any data is touched."""
from __future__ import annotations

import contextlib
import io
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from flows.train_cifar import build_parser, main


@pytest.mark.parametrize("args,message", [
    (["--model", "resnet9000"], "--model: unknown model 'resnet9000'; known models: "),
    (["--variants", "none,mixup"], "--variants: unknown variant(s) 'mixup'; known variants: none, flip, crop"),
    (["--epochs", "0"], "--epochs: Input should be greater than or equal to 1, found '0'"),
    (["--batch-size", "0"], "--batch-size: Input should be greater than or equal to 1, found '0'"),
    (["--lr", "-0.1"], "--lr: Input should be greater than 0, found '-0.1'"),
    (["--data-dir", "/no/such/dir"], "--data-dir: no such folder or file: /no/such/dir"),
    (["--patience", "0"], "--patience: Input should be greater than or equal to 1"),
    (["--device", "tpu"], "--device: expected auto, cpu, cuda or cuda:N, found 'tpu'"),
    (["--data-md5", "xyz"], "--data-md5: expected 32 hex digits, found 'xyz'"),
    (["--store", "gs://bucket/x"], "--store: expected a local folder or s3://bucket/prefix"),
    (["--run-id", "../escape"], "--run-id: run_id '../escape' is not a valid name: expected letters, digits"),
    (["--data-source", "s3://bucket/../../x"], "--data-source: expected s3://bucket/key with no '.', '..' or empty"),
    (["--data-source", "s3://bucket/a//b.tar.gz"], "--data-source: expected s3://bucket/key with no '.', '..' or"),
    # a trailing newline, carriage return, tab or space: names match whole strings
    *[(["--run-id", f"r1{end}"], f"--run-id: run_id {'r1' + end!r} is not a valid name")
      for end in ["\n", "\r", "\t", " "]],
    *[(["--store", f"s3://bucket{end}/runs"], f"--store: {f's3://bucket{end}/runs'!r}: {'bucket' + end!r} is not a valid")
      for end in ["\n", "\r", "\t", " "]],
    (["--data-source", "s3://bucket\n/k.tar.gz", "--data-md5", "0" * 32], "--data-source: expected s3://bucket/key"),
])
def test_invalid_values_named_before_any_work(args, message, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TRAIN_CIFAR_CACHE", str(tmp_path / "cache"))
    code = main([*args, "--store", str(tmp_path / "store")] if "--store" not in args else args)
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert not (tmp_path / "store").exists() and not (tmp_path / "cache").exists()


def test_cuda_on_a_cpu_machine_is_refused_by_name(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["--device", "cuda", "--dataset", "synthetic", "--store", str(tmp_path)]) == 1
    assert "--device cuda: CUDA is not available" in capsys.readouterr().err


def test_flags_mirror_the_parameters():
    from run.params import RunParams

    flags = {a.dest for a in build_parser()._actions} - {"help"}
    assert flags == set(RunParams.model_fields)


def test_help_and_exit_code_from_a_real_process():
    ok = subprocess.run([sys.executable, "-m", "flows.train_cifar", "--help"], capture_output=True, text=True)
    assert ok.returncode == 0 and "--variants" in ok.stdout and "--subset" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "flows.train_cifar", "--epochs", "0"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--epochs" in bad.stderr
    bad = subprocess.run([sys.executable, "-m", "flows.train_cifar", "--precision", "fp16"], capture_output=True,
                         text=True)
    assert bad.returncode == 2 and "--precision: invalid choice: 'fp16'" in bad.stderr


def new_user_env(tmp_path: Path) -> dict[str, str]:
    """`make run`'s environment for a new user: no Prefect settings (so no API: the CLI
    starts its temporary server), a Prefect home and work folder of their own."""
    # a slow machine's startup timeout is kept
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PREFECT_") or k == "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_LOGGING_LEVEL="INFO",
               TRAIN_CIFAR_CACHE=str(tmp_path / "cache"))
    return env


def flow_runs(home: Path) -> dict[str, str]:
    """{flow run id: state type} in the Prefect home's database."""
    with contextlib.closing(sqlite3.connect(home / "prefect.db")) as db:
        return dict(db.execute("select id, state_type from flow_run").fetchall())


def see_later_id(stderr: str) -> str:
    """The flow run id in the CLI's line saying how to see the run once its server is gone."""
    return re.search(r"make server, then open http://127\.0\.0\.1:4200/runs/flow-run/([0-9a-f-]{36})",
                     stderr).group(1)


def server_is_gone(port: int) -> bool:
    """Nothing listens on the temporary server's port, and no process was started for it."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        return False
    except OSError:
        pass
    flag = f"--port\0{port}\0".encode()
    return not any(flag in p.read_bytes() for p in Path("/proc").glob("[0-9]*/cmdline") if _readable(p))


def _readable(p: Path) -> bool:
    try:
        p.read_bytes()
        return True
    except OSError:  # a process that ended meanwhile
        return False


@pytest.mark.slow
def test_a_run_with_no_api_starts_its_own_server_and_stops_it(tmp_path):
    """`make run`'s case: no PREFECT_API_URL. The CLI boots the temporary API server while
    it imports, the run is recorded in the Prefect home's database (flow and task runs,
    so the server was stopped only after Prefect flushed its events), no server is left
    behind, and the CLI ends saying how to see the run with `make server`."""
    home = tmp_path / "prefect-home"
    env = new_user_env(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "flows.train_cifar", "--dataset", "synthetic", "--synthetic-train",
                           "300", "--synthetic-test", "100", "--variants", "none", "--epochs", "1", "--store",
                           str(tmp_path / "store")], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert Path(proc.stdout.strip().splitlines()[-1]).is_file()  # the manifest
    port = int(re.search(r"View at http://127\.0\.0\.1:(\d+)/runs/flow-run/", proc.stdout + proc.stderr).group(1))
    with pytest.raises(OSError):  # stopped with the run
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    assert "telemetry" not in proc.stdout + proc.stderr  # the server's telemetry is off (cli/api.py)
    # the link above died with the server: the last word says how to see the run later
    later = re.search(r"make server, then open http://127\.0\.0\.1:4200/runs/flow-run/([0-9a-f-]{36})", proc.stderr)
    assert later and later.start() > proc.stderr.rfind("View at"), proc.stderr[-3000:]
    with contextlib.closing(sqlite3.connect(home / "prefect.db")) as db:
        assert db.execute("select id from flow_run").fetchall() == [(later.group(1),)]
        assert db.execute("select state_type from flow_run").fetchall() == [("COMPLETED",)]
        tasks = dict(db.execute("select name, state_type from task_run").fetchall())
    for task in ["fetch-dataset", "train-none", "select-variant", "test-model", "publish-run"]:
        assert any(n.startswith(task) for n in tasks), f"no {task} task run in {sorted(tasks)}"
    assert set(tasks.values()) == {"COMPLETED"}


def test_a_data_source_climbing_out_of_the_cache_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    """s3://bucket/../../../victim joined onto <cache>/downloads/bucket/ names a file beside the
    cache; it is refused as a parameter, and the file is still there."""
    from run.params import RunParams, describe_errors
    from pydantic import ValidationError

    victim = tmp_path / "victim"
    victim.write_text("keep me")
    monkeypatch.setenv("TRAIN_CIFAR_CACHE", str(tmp_path / "cache"))
    source = "s3://bucket/../../../victim"
    assert (tmp_path / "cache" / "downloads" / "bucket" / "../../../victim").resolve() == victim
    with pytest.raises(ValidationError) as e:
        RunParams(data_source=source, data_md5="0" * 32)
    assert describe_errors(e.value).startswith("data_source: expected s3://bucket/key with no")
    assert main(["--data-source", source, "--data-md5", "0" * 32, "--store", str(tmp_path / "store")]) == 2
    assert "--data-source: expected s3://bucket/key" in capsys.readouterr().err
    assert victim.read_text() == "keep me"


# --- a user's mistake ends in one message (issue 16, finding 10) ---

def dead_port() -> int:
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again: nothing listens there


@pytest.mark.slow
def test_offline_make_run_ends_in_the_message_that_says_what_to_do(tmp_path):
    """`make run` as a new user runs it, offline: the official download fails (here through
    a proxy on a loopback port where nothing listens, as a machine without internet would).
    A few lines, no traceback, and the last one says what to do; the flow run is Failed
    with the message, and its log in the server keeps the traceback for the UI."""
    env = new_user_env(tmp_path)
    env.update(HTTPS_PROXY=f"http://127.0.0.1:{dead_port()}", NO_PROXY="127.0.0.1,localhost")
    proc = subprocess.run([sys.executable, "-m", "flows.train_cifar", "--store", str(tmp_path / "store")], env=env,
                          capture_output=True, text=True, timeout=600)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and len(lines) <= 15, proc.stderr
    assert lines[-1].startswith("error: could not download CIFAR-10 from https://"), lines[-1]
    assert "Without internet, pass a local copy with --data-dir DIR" in lines[-1]
    assert "--dataset synthetic" in lines[-1]
    run = see_later_id(proc.stderr)
    home = tmp_path / "prefect-home"
    assert flow_runs(home) == {run: "FAILED"}
    with contextlib.closing(sqlite3.connect(home / "prefect.db")) as db:
        (message,), = db.execute("select message from flow_run_state where flow_run_id = ? and type = 'FAILED'",
                                 (run,)).fetchall()
        logs = [m for (m,) in db.execute("select message from log where flow_run_id = ?", (run,))]
    assert "DataError: could not download CIFAR-10" in message
    assert any("Traceback" in m and "DataError" in m for m in logs)  # the UI's log still has it


@pytest.mark.slow
def test_debug_shows_the_traceback_of_a_users_mistake(tmp_path):
    empty = tmp_path / "cifar"
    empty.mkdir()
    args = [sys.executable, "-m", "flows.train_cifar", "--data-dir", str(empty), "--store", str(tmp_path / "store")]
    quiet = subprocess.run(args, env=new_user_env(tmp_path), capture_output=True, text=True, timeout=600)
    loud = subprocess.run([*args, "--debug"], env=new_user_env(tmp_path), capture_output=True, text=True, timeout=600)
    message = f"error: --data-dir {empty}: expected cifar-10-python.tar.gz or a cifar-10-batches-py/ folder"
    for proc in (quiet, loud):
        assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1].startswith(message), proc.stderr[-3000:]
    assert "Traceback" not in quiet.stderr
    assert "Traceback" in loud.stderr and 'raise DataError(' in loud.stderr


@pytest.mark.parametrize("error,quiet", [
    ("DataError('--data-dir x: expected cifar-10-python.tar.gz')", True),
    ("ValueError('invalid parameter(s)')", True),
    ("StoreError('s3://b/p: no such bucket')", True),
    ("LeaseHeld('runs/r/variants/none/lease.json is held by another writer')", True),
    ("StoreUnavailable('the store did not answer')", False),
    ("StoreOutage('the store was away for longer than 10 minutes')", False),
    ("NoVariantTrained('no variant finished training, nothing to select: none: failed (LeaseHeld: ...)')", True),
    ("RuntimeError('a fault in the code')", False),
])
def test_the_console_drops_the_traceback_of_a_users_mistake_only(error, quiet):
    """Prefect's console handler, as the CLI runs it: a known user error loses its traceback
    there (and only there: the run logger's own handler, the API's, formats it first); an
    outage or an unexpected fault keeps it."""
    import logging

    from prefect.logging.handlers import PrefectConsoleHandler

    from cnn.data import DataError  # noqa: F401 - named in `error`
    from flows.train_cifar import _console_tracebacks
    from store import StoreError, StoreOutage, StoreUnavailable  # noqa: F401
    from store.lease import LeaseHeld  # noqa: F401
    from tasks.selection import NoVariantTrained  # noqa: F401

    logger = logging.getLogger("test-cli.flow-run")  # propagates to the root, where the console is
    api_copy = logging.StreamHandler(io.StringIO())  # the API's handler formats the record as it gets it
    console = PrefectConsoleHandler(stream=io.StringIO())
    logger.addHandler(api_copy)
    logging.getLogger().addHandler(console)
    try:
        with _console_tracebacks(shown=False):
            try:
                raise eval(error)
            except Exception:
                logger.error("Encountered exception during execution", exc_info=True)
    finally:
        logger.removeHandler(api_copy)
        logging.getLogger().removeHandler(console)
    shown = console.stream.getvalue()
    assert "Encountered exception during execution" in shown
    assert ("Traceback" not in shown) == quiet, shown
    assert api_copy.stream.getvalue().count("Traceback") == 1


# --- Ctrl-C and SIGTERM stop the run, cancelled and resumable (issue 16, finding 14) ---

# the CLI as `python -m flows.train_cifar` runs it, with the `tiny` model registered first
CLI_WITH_TINY = ("import runpy, pytest; from tests.conftest import register_tiny; register_tiny(pytest.MonkeyPatch()); "
                 "runpy.run_module('flows.train_cifar', run_name='__main__', alter_sys=True)")


class Terminal:
    """The CLI in a process group of its own, as a terminal starts a command: a signal to
    the group reaches every process in it. Its stderr is read as it comes."""

    def __init__(self, args: list[str], env: dict[str, str]):
        self.proc = subprocess.Popen([sys.executable, "-c", CLI_WITH_TINY, *args], env=env, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        self.lines: list[str] = []
        self.stdout = ""
        self._readers = [threading.Thread(target=self._read, daemon=True),
                         threading.Thread(target=self._read_stdout, daemon=True)]
        for r in self._readers:
            r.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def _read_stdout(self) -> None:
        self.stdout = self.proc.stdout.read()

    def wait_for(self, pattern: str, timeout: float = 600) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            for line in list(self.lines):
                if m := re.search(pattern, line):
                    return m
            time.sleep(0.1)
        raise AssertionError(f"no line matching {pattern!r}:\n" + "\n".join(self.lines[-40:]))

    def interrupt(self, sig: int) -> int:
        os.killpg(self.proc.pid, sig)  # the whole group, as Ctrl-C does
        try:
            code = self.proc.wait(timeout=60)  # generous: the stop takes a batch and the run's end
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)  # not left behind by a failing test
            raise
        for r in self._readers:
            r.join(timeout=10)
        return code

    @property
    def stderr(self) -> str:
        return "\n".join(self.lines)


def epochs_shown(stderr: str, variant: str) -> list[int]:
    return [int(e) for e in re.findall(rf"\b{variant} epoch (\d+)/\d+ train_loss", stderr)]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_stops_the_run_cancelled_and_resumable(sig, tmp_path):
    """Ctrl-C at a terminal (SIGINT to the process group) or a pod's SIGTERM, mid-training:
    the process ends with 128 + the signal, its last line says how to resume, the unit's
    checkpoint holds its last finished epoch, the flow run is Cancelled in the temporary
    server's database, and that server is gone with the process. The resume continues from
    that epoch (and stops the same way)."""
    from cnn.checkpoint import CHECKPOINT, read_history

    env = new_user_env(tmp_path)
    home, store = tmp_path / "prefect-home", tmp_path / "store"
    args = ["--model", "tiny", "--dataset", "synthetic", "--synthetic-train", "300", "--synthetic-test", "100",
            "--variants", "none,flip", "--epochs", "500", "--patience", "500", "--batch-size", "32",
            "--store", str(store)]
    resumes = []
    for attempt in range(2):
        cli = Terminal(args + resumes, env)
        first = int(cli.wait_for(r"\bnone epoch (\d+)/500 train_loss").group(1))
        code = cli.interrupt(sig)
        out = cli.stderr
        assert code == 128 + sig, out[-3000:]
        run_id = re.search(r"run (\S+): 2 variant\(s\)", out).group(1)
        assert out.splitlines()[-1].endswith(f"to resume it, run the same command with --run-id {run_id}"), out[-3000:]
        assert "Traceback" not in out and "Connection refused" not in out, out[-3000:]
        # the unit's checkpoint holds the last epoch it finished, which is the last one shown
        shown = epochs_shown(out, "none")
        checkpoint = tmp_path / "cache" / "runs" / run_id / "variants" / "none" / CHECKPOINT
        assert [r["epoch"] for r in read_history(checkpoint)] == list(range(1, shown[-1] + 1))
        assert not epochs_shown(out, "flip")  # not started after the stop
        # the run is Cancelled in the temporary server's database, and that server is gone
        port = int(re.search(r"View at http://127\.0\.0\.1:(\d+)/runs/flow-run/", out).group(1))
        assert server_is_gone(port)
        assert flow_runs(home)[see_later_id(out)] == "CANCELLED"
        if attempt == 0:
            stopped_at = shown[-1]
            resumes = ["--run-id", run_id]
        else:  # the resume went on from the epoch the first run had finished
            assert first == stopped_at + 1 and shown[0] == stopped_at + 1, out[-3000:]
    assert sorted(flow_runs(home).values()) == ["CANCELLED", "CANCELLED"]
