"""The command line: every invalid value is refused by name before any data is touched."""
from __future__ import annotations

import contextlib
import os
import re
import socket
import sqlite3
import subprocess
import sys
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
    from flows.params import RunParams

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


@pytest.mark.slow
def test_a_run_with_no_api_starts_its_own_server_and_stops_it(tmp_path):
    """`make run`'s case: no PREFECT_API_URL. The CLI boots the temporary API server while
    it imports, the run is recorded in the Prefect home's database (flow and task runs,
    so the server was stopped only after Prefect flushed its events), no server is left
    behind, and the CLI ends saying how to see the run with `make server`."""
    home = tmp_path / "prefect-home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home), PREFECT_LOGGING_LEVEL="INFO", TRAIN_CIFAR_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, "-m", "flows.train_cifar", "--dataset", "synthetic", "--synthetic-train",
                           "300", "--synthetic-test", "100", "--variants", "none", "--epochs", "1", "--store",
                           str(tmp_path / "store")], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert Path(proc.stdout.strip().splitlines()[-1]).is_file()  # the manifest
    port = int(re.search(r"View at http://127\.0\.0\.1:(\d+)/runs/flow-run/", proc.stdout + proc.stderr).group(1))
    with pytest.raises(OSError):  # stopped with the run
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    assert "telemetry" not in proc.stdout + proc.stderr  # the server's telemetry is off (flows/api.py)
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
    from flows.params import RunParams, describe_errors
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
