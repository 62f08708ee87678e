"""The pipeline on S3: a run, the dataset mirror, resume, the champion, a dying endpoint.

All against moto's server on 127.0.0.1 through boto3, with small synthetic data.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

import store.s3 as s3mod
from cnn import data as cd
from store import PreconditionFailed, StoreError, open_store
from registry import champions
from tests.judges import promote_by_accuracy
from run.layout import Unit, stored_key
from tests.s3_fixtures import aws_client, use_credentials
from tests.contexts import run_context

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(variants=["none"], epochs=1, subset=300, device="cpu")  # a run in well under a minute


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """This machine's local cache, empty (GPU workers come and go)."""
    monkeypatch.setenv("TRAIN_CIFAR_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _objects(bucket: str) -> dict[str, bytes]:
    s3 = aws_client()
    keys = [o["Key"] for p in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket) for o in p.get("Contents", [])]
    return {k: s3.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}


def _candidate(run_id: str, accuracy: float, md5: str = "a" * 32, split_seed: int = 0, test_size: int = 140,
               name: str = "cifar10") -> dict:
    return {"run_id": run_id, "model_uri": f"s3://x/runs/{run_id}/model", "test": {"accuracy": accuracy},
            "dataset_name": name, "dataset_md5": md5, "split_seed": split_seed, "test_size": test_size}


IDENT = champions.identity(_candidate("any", 0.0))


def _artifacts(flow_run_id: str) -> dict:
    """The flow run's Prefect artifacts by key, read back through the API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    return {a.key: a for a in arts}


# ----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_full_synthetic_run_to_s3(s3_bucket, s3_users, cache, prefect_harness, monkeypatch, capsys, tmp_path):
    """Every object of the layout, each manifest SHA-256 equal to the object's, the champion
    set, the model usable from a fresh process, and no secret anywhere."""
    from flows.train_cifar import train_cifar

    use_credentials(monkeypatch, s3_users["writer"])  # moto checks signatures during this test
    secret = s3_users["writer"]["AWS_SECRET_ACCESS_KEY"]
    uri = f"s3://{s3_bucket}/nightly"
    out = train_cifar(dataset="synthetic", synthetic_train=400, synthetic_test=200, store=uri,
                      **{**TINY, "variants": ["none", "flip"]})
    run_id = out["run_id"]
    assert out["manifest"] == f"{uri}/runs/{run_id}/manifest.json"

    objects = _objects(s3_bucket)
    manifest = json.loads(objects[f"nightly/runs/{run_id}/manifest.json"])
    ident = manifest["dataset"]["identity"]
    assert manifest["promoted"] is True and manifest["promotion_reason"] == f"no champion yet for dataset {ident}"
    assert {"model/model.pt2", "model/weights.safetensors", "report.md", "none/checkpoint.safetensors",
            "flip/history.csv"} <= set(manifest["artifacts"])
    for name, a in manifest["artifacts"].items():
        assert a["uri"].startswith(f"{uri}/runs/{run_id}/"), name
        body = objects[a["uri"].removeprefix(f"s3://{s3_bucket}/")]
        assert hashlib.sha256(body).hexdigest() == a["sha256"] and len(body) == a["bytes"], name
    md5 = manifest["dataset"]["md5"]
    assert f"nightly/datasets/synthetic/{md5}/{cd.PREPARED_FILE}" in objects

    assert ident == f"synthetic-{manifest['dataset']['md5']}-split0-test{manifest['dataset']['sizes']['test']}"
    champ = json.loads(objects[f"nightly/champions/{ident}.json"])["champion"]
    assert champ["run_id"] == run_id and champ["model_uri"] == f"{uri}/runs/{run_id}/model"
    assert champ["dataset_md5"] == md5 and champ["test"]["accuracy"] == manifest["test"]["accuracy"]

    # the stored report holds store URIs and relative paths: no presigned link, whose query
    # carries the signer's key id (and a session token) and expires
    report = objects[f"nightly/runs/{run_id}/report.md"].decode()
    assert "X-Amz-" not in report and "](model/model.pt2)" in report and f"`{uri}/runs/{run_id}`" in report
    # the UI's links are presigned, valid for link_expiry_hours (here the default, a week)
    arts = _artifacts(manifest["flow_run_id"])
    for key in ["manifest", "model", "report-file"]:
        assert "X-Amz-Signature=" in arts[key].data and "X-Amz-Expires=604800" in arts[key].data, key
    assert "X-Amz-Signature=" in arts["report"].data
    assert all(secret.encode() not in body for body in objects.values())
    printed = capsys.readouterr()
    assert secret not in printed.out + printed.err

    # the champion classifies from a fresh process, through the S3 store
    img = tmp_path / "photo.jpg"
    Image.new("RGB", (120, 80), (200, 40, 40)).save(img)
    proc = subprocess.run([sys.executable, "-m", "cli.predict", "--store", uri, str(img)], cwd=ROOT,
                          capture_output=True, text=True, timeout=180, env=os.environ.copy())
    assert proc.returncode == 0, proc.stderr
    path, cls, prob = proc.stdout.strip().split("\t")
    assert path == str(img) and cls in manifest["dataset"]["classes"] and 0 < float(prob) <= 1
    assert f"run {run_id} (the champion of {ident})" in proc.stderr

    # and the portable file alone loads in a plain Python (-I: no project code on the path)
    (tmp_path / "model.pt2").write_bytes(objects[f"nightly/runs/{run_id}/model/model.pt2"])
    code = "import torch; m = torch.export.load('model.pt2').module(); print(tuple(m(torch.rand(5, 3, 32, 32)).shape))"
    proc = subprocess.run([sys.executable, "-I", "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          timeout=180)
    assert proc.stdout.strip() == "(5, 10)", proc.stderr


# ----------------------------------------------------------------------------------------
def _mirror(archive: Path, target: str, capsys) -> tuple[str, str]:
    from cli import mirror

    assert mirror.main([str(archive), target]) == 0
    lines = dict(line.split(" ", 1) for line in capsys.readouterr().out.strip().splitlines())
    return lines["md5"], lines["uri"]


def test_dataset_from_an_s3_mirror(s3_bucket, synthetic_archive, cache, capsys, tmp_path, monkeypatch):
    from tasks.data import fetch_dataset

    archive, md5 = synthetic_archive
    got_md5, src = _mirror(archive, f"s3://{s3_bucket}/mirror/", capsys)
    assert (got_md5, src) == (md5, f"s3://{s3_bucket}/mirror/{cd.ARCHIVE_NAME}")

    store_uri = f"s3://{s3_bucket}/nightly"
    info = fetch_dataset.fn(run_context(store_uri, data_source=src, data_md5=md5))
    assert info.md5 == md5 and info.source == src and info.train == 2000 and info.holdout == 400
    assert open_store(store_uri).exists(f"datasets/cifar10/{md5}/{cd.PREPARED_FILE}")

    # another machine: it decodes the archive once, to learn the SHA-256 the store's copy
    # must have (the store's copy and its meta.json are no proof), finds that copy right
    # and stores nothing; from then on it neither downloads nor decodes
    capsys.readouterr()
    monkeypatch.setenv("TRAIN_CIFAR_CACHE", str(tmp_path / "other-machine"))
    assert fetch_dataset.fn(run_context(store_uri, data_source=src, data_md5=md5)) == info
    out = capsys.readouterr().out
    assert "prepared copy found in the store and checked" in out and "decoded and stored" not in out
    (tmp_path / "other-machine" / "downloads" / s3_bucket / "mirror" / cd.ARCHIVE_NAME).unlink()
    assert fetch_dataset.fn(run_context(store_uri, data_source=src, data_md5=md5)) == info
    assert "nothing to download" in capsys.readouterr().out
    assert not (tmp_path / "other-machine" / "downloads" / s3_bucket / "mirror" / cd.ARCHIVE_NAME).exists()


def test_a_wrong_md5_from_the_mirror_is_refused(s3_bucket, synthetic_archive, cache):
    from cli import mirror
    from tasks.data import fetch_dataset

    archive, md5 = synthetic_archive
    _, src = mirror.mirror(archive, f"s3://{s3_bucket}/mirror/data.tar.gz")
    wrong = "0" * 32
    with pytest.raises(cd.DataError) as err:
        fetch_dataset.fn(run_context(f"s3://{s3_bucket}/nightly", data_source=src, data_md5=wrong))
    msg = str(err.value)
    assert src in msg and f"expected {wrong}" in msg and f"found {md5}" in msg
    # without --data-md5 the mirror must hold the official archive
    with pytest.raises(cd.DataError, match=f"not the official CIFAR-10 archive.*--data-md5 {md5}"):
        fetch_dataset.fn(run_context(f"s3://{s3_bucket}/nightly", data_source=src))
    assert not open_store(f"s3://{s3_bucket}/nightly").list("datasets")


def test_mirror_refuses_what_is_not_a_cifar_archive(s3_bucket, tmp_path):
    from cli import mirror

    bad = tmp_path / "cifar-10-python.tar.gz"
    bad.write_bytes(b"not a tarball")
    with pytest.raises(cd.DataError, match="not a readable .tar.gz"):
        mirror.mirror(bad, f"s3://{s3_bucket}/mirror/")
    with pytest.raises(ValueError, match="TARGET 'bucket/key'"):
        mirror.mirror(bad, "bucket/key")
    assert mirror.main([str(tmp_path / "missing.tar.gz"), f"s3://{s3_bucket}/m/"]) == 1
    assert not open_store(f"s3://{s3_bucket}").list("mirror")


# ----------------------------------------------------------------------------------------
class MachineLost(Exception):
    pass


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Artifact creation outside")  # the task's logic, run without a flow
def test_a_variant_resumes_from_its_s3_checkpoint_on_another_machine(s3_bucket, cache, prefect_harness,
                                                                    monkeypatch, capsys, tmp_path):
    import tasks.training
    from cnn.config import make_config
    from tasks.data import fetch_dataset
    from tasks.training import train_in_lane

    uri = f"s3://{s3_bucket}/nightly"
    st = open_store(uri)
    ds = fetch_dataset.fn(run_context(uri, dataset="synthetic", synthetic_train=400, synthetic_test=200))
    cfg = make_config("seed", "flip", epochs=2, patience=5, seed=0)
    real_train = tasks.training.train

    def dies_after_epoch_1(cfg, data, device, workdir, on_epoch, **kw):
        def upload_then_die(row, ckpt):
            on_epoch(row, ckpt)  # epoch 1's checkpoint reaches the store...
            raise MachineLost("after epoch 1")  # ...then the machine goes away

        return real_train(cfg, data, device, workdir, on_epoch=upload_then_die, **kw)

    monkeypatch.setattr(tasks.training, "train", dies_after_epoch_1)
    with pytest.raises(MachineLost):
        train_in_lane.fn(run_context(uri, "resumed", ds, subset=300, split_seed=0), cfg, "cpu")
    unit = Unit("flip", 0)
    first = st.read_versioned(stored_key(st, "resumed", unit, "history.csv"))[0].decode().splitlines()
    assert len(first) == 2  # header and epoch 1

    monkeypatch.setattr(tasks.training, "train", real_train)
    monkeypatch.setenv("TRAIN_CIFAR_CACHE", str(tmp_path / "another-machine"))
    result = train_in_lane.fn(run_context(uri, "resumed", ds, subset=300, split_seed=0), cfg, "cpu")
    assert re.search(rf"flip: resuming from {re.escape(uri)}/runs/resumed/variants/flip/gen-1/./checkpoint.safetensors "
                     r"\(epoch 1\)", capsys.readouterr().out)
    assert result.epochs_run == 2 and result.status == "completed"
    history = st.read_versioned(stored_key(st, "resumed", unit, "history.csv"))[0].decode().splitlines()
    assert history[:2] == first and len(history) == 3  # epoch 1 kept as it was, epoch 2 added


# ----------------------------------------------------------------------------------------
def test_champion_first_better_worse_and_other_dataset(s3_bucket):
    st = open_store(f"s3://{s3_bucket}/nightly")
    assert champions.promote(st, _candidate("r1", 0.50), promote_by_accuracy(0.0)) == (True, f"no champion yet for dataset {IDENT}", None)

    ok, why, _ = champions.promote(st, _candidate("r2", 0.45), promote_by_accuracy(0.0))
    assert not ok and "does not beat champion r1" in why
    ok, why, _ = champions.promote(st, _candidate("r3", 0.52), promote_by_accuracy(0.05))  # better, but not by the margin
    assert not ok and "by more than 0.05" in why
    # another dataset or split: the first champion of its own identity, r1 untouched
    ok, why, against = champions.promote(st, _candidate("r4", 0.90, md5="b" * 32), promote_by_accuracy(0.0))
    assert ok and against is None and why == f"no champion yet for dataset cifar10-{'b' * 32}-split0-test140"
    ok, why, against = champions.promote(st, _candidate("r5", 0.90, split_seed=1), promote_by_accuracy(0.0))
    assert ok and against is None
    assert champions.read(st, IDENT)["run_id"] == "r1"
    assert sorted(champions.documents(st)) == sorted([IDENT, f"cifar10-{'b' * 32}-split0-test140",
                                                     f"cifar10-{'a' * 32}-split1-test140"])

    ok, why, _ = champions.promote(st, _candidate("r6", 0.60), promote_by_accuracy(0.05))
    assert ok and "beats champion r1" in why
    assert champions.read(st, IDENT) == _candidate("r6", 0.60)


@pytest.mark.parametrize("round_", range(3))
def test_two_runs_racing_have_exactly_one_winner(s3_bucket, round_):
    """Equal accuracy: whoever writes first wins, the other must lose, never both."""
    uri = f"s3://{s3_bucket}/nightly"
    stores = [open_store(uri) for _ in range(2)]
    go = threading.Barrier(2)
    results = {}

    def run(i):
        go.wait()
        results[i] = champions.promote(stores[i], _candidate(f"run{i}", 0.7), promote_by_accuracy(0.0))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [i for i, d in results.items() if d.promoted]
    assert len(winners) == 1, results
    assert champions.read(stores[0], IDENT)["run_id"] == f"run{winners[0]}"


def test_many_runs_racing_lose_no_update(s3_bucket):
    """The best of many concurrent candidates always ends up champion: no write is lost."""
    uri = f"s3://{s3_bucket}/nightly"
    accs = [0.61, 0.55, 0.72, 0.68, 0.59, 0.70]
    go = threading.Barrier(len(accs))
    results = {}

    def run(i):
        st = open_store(uri)
        go.wait()
        results[i] = champions.promote(st, _candidate(f"run{i}", accs[i]), promote_by_accuracy(0.0))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(accs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    final = champions.read(open_store(uri), IDENT)
    assert final["run_id"] == "run2" and results[2].promoted is True
    # a loser lost to a champion at least as good as itself, never to a lost write
    assert all("does not beat champion" in why for ok, why, _ in results.values() if not ok)


def test_a_promotion_whose_answer_was_lost_still_counts(s3_bucket, monkeypatch):
    """S3 applied the conditional PUT but the response was lost; botocore's retry then
    gets 412. The run must see that it is the champion, not report that it lost."""
    st = open_store(f"s3://{s3_bucket}/nightly")
    real = type(st).write_if

    def applied_then_lost(self, key, data, version):
        real(self, key, data, version)
        raise PreconditionFailed("the retry of a PUT that had already succeeded")

    monkeypatch.setattr(type(st), "write_if", applied_then_lost)
    ok, why, _ = champions.promote(st, _candidate("r1", 0.5), promote_by_accuracy(0.0))
    assert ok and why == f"no champion yet for dataset {IDENT}"
    assert champions.read(st, IDENT)["run_id"] == "r1"
    assert len(champions.documents(st)[IDENT]["history"]) == 1  # recorded once


# ----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_endpoint_stopped_during_the_runs_upload(s3_server, s3_bucket, synthetic_archive, cache, prefect_harness,
                                                 monkeypatch, capsys):
    """The endpoint hangs while the run is being published: botocore retries, the run
    fails naming the endpoint, the champion is untouched and the local files are kept."""
    import tasks.publish
    from flows.train_cifar import train_cifar
    from run.cache import local_run_dir

    archive, md5 = synthetic_archive
    _, src = _mirror(archive, f"s3://{s3_bucket}/mirror/", capsys)  # the run reads its data from the mirror
    uri = f"s3://{s3_bucket}/nightly"
    st = open_store(uri)
    old = _candidate("old-champion", 0.0, md5=md5, test_size=140)
    champions.promote(st, old, promote_by_accuracy(0.0))  # easy to beat
    before = st.read_versioned(champions.key_for(champions.identity(old)))

    monkeypatch.setattr(s3mod, "READ_TIMEOUT_S", 3)  # a hung endpoint is noticed in seconds, not minutes
    monkeypatch.setattr(s3mod, "CONNECT_TIMEOUT_S", 3)
    monkeypatch.setattr(tasks.publish, "publish_run", tasks.publish.publish_run.with_options(retries=0))
    real_put = s3mod.S3Store.put_file

    def hang_at_report(self, key, path):
        if key.endswith("/report.md"):
            s3_server.pause()
        return real_put(self, key, path)

    monkeypatch.setattr(s3mod.S3Store, "put_file", hang_at_report)
    t0 = time.monotonic()
    with pytest.raises(StoreError) as err:  # waited out for 3 s, then given up
        train_cifar(data_source=src, data_md5=md5, store=uri, run_id="interrupted", store_outage_minutes=0.05, **TINY)
    assert time.monotonic() - t0 < 240
    msg = str(err.value)
    assert f"{uri}/runs/interrupted/report.md" in msg and "did not answer after 3 attempts" in msg
    assert f"{s3_server.endpoint} did not answer for" in msg

    s3_server.resume()
    assert st.read_versioned(champions.key_for(champions.identity(old))) == before  # same content, same ETag
    assert not st.exists("runs/interrupted/manifest.json")  # the run was never sealed
    local = local_run_dir("interrupted")
    for rel in ["model/model.pt2", "model/weights.safetensors", "model/metrics.json", "report.md"]:
        assert (local / rel).is_file(), rel
    # the variant's checkpoint was removed locally once its result record was stored
    assert not (local / "variants" / "none" / "checkpoint.safetensors").exists()
    assert st.exists(stored_key(st, "interrupted", Unit("none", 0), "checkpoint.safetensors"))


@pytest.mark.slow
def test_a_missing_bucket_fails_the_run_at_once(s3_server, cache, prefect_harness):
    from flows.train_cifar import train_cifar

    s3_server.ensure_running()
    t0 = time.monotonic()
    with pytest.raises(StoreError, match="no-such-bucket-here.*NoSuchBucket.*create it"):
        train_cifar(dataset="synthetic", synthetic_train=100, synthetic_test=50, store="s3://no-such-bucket-here/n",
                    **TINY)
    assert time.monotonic() - t0 < 30  # not retried by Prefect (fetch-dataset retries only I/O)


# ----------------------------------------------------------------------------------------
OUTAGE_RUN = dict(dataset="synthetic", synthetic_train=400, synthetic_test=200, variants=["none"], epochs=5,
                  patience=10, subset=300, device="cpu")


def _outage_after_epoch(monkeypatch, epoch: int, proxy, back_after_s: float | None) -> list[tuple[int, float]]:
    """The proxy refuses connections once `epoch` is trained (and accepts again
    `back_after_s` later); returns (epoch, when it ended) as training goes."""
    import tasks.training

    real_train = tasks.training.train
    ended: list[tuple[int, float]] = []

    def train_with_outage(cfg, data, device, workdir, on_epoch, **kwargs):
        def hook(row, ckpt):
            on_epoch(row, ckpt)
            ended.append((row["epoch"], time.monotonic()))
            if row["epoch"] == epoch:
                proxy.refuse()
                if back_after_s is not None:
                    timer = threading.Timer(back_after_s, proxy.accept)
                    timer.daemon = True
                    timer.start()

        return real_train(cfg, data, device, workdir, on_epoch=hook, **kwargs)

    monkeypatch.setattr(tasks.training, "train", train_with_outage)
    return ended


@pytest.fixture
def proxy(s3_server, monkeypatch):
    from tests.tcp_proxy import TcpProxy

    p = TcpProxy(s3_server.port)
    p.accept()
    monkeypatch.setenv("AWS_ENDPOINT_URL", p.endpoint)  # the run reaches S3 through it
    yield p
    p.close()


@pytest.mark.slow
def test_a_store_outage_mid_run_costs_no_work(s3_bucket, proxy, cache, prefect_harness, monkeypatch):
    """The endpoint refuses connections for 30 s after epoch 2: training goes on, the
    uploads catch up, the run completes with every artifact verified in the bucket."""
    from flows.train_cifar import train_cifar
    from run.cache import local_run_dir

    ended = _outage_after_epoch(monkeypatch, 2, proxy, back_after_s=30)
    t0 = time.monotonic()
    out = train_cifar(store=f"s3://{s3_bucket}/nightly", run_id="outage", **OUTAGE_RUN)
    refused_at = dict(ended)[2]
    assert time.monotonic() - t0 >= 30  # the outage happened inside the run
    assert any(refused_at < t < refused_at + 30 for e, t in ended if e > 2)  # epochs trained while refused

    objects = _objects(s3_bucket)
    manifest = json.loads(objects["nightly/runs/outage/manifest.json"])
    assert out["manifest"] == f"s3://{s3_bucket}/nightly/runs/outage/manifest.json"
    assert {"none/checkpoint.safetensors", "none/history.csv", "none/metrics.json"} <= set(manifest["artifacts"])
    for name, a in manifest["artifacts"].items():
        body = objects[a["uri"].removeprefix(f"s3://{s3_bucket}/")]
        assert hashlib.sha256(body).hexdigest() == a["sha256"] and len(body) == a["bytes"], name
    history_key = stored_key(open_store(f"s3://{s3_bucket}/nightly"), "outage", Unit("none", 0), "history.csv")
    history = objects[f"nightly/{history_key}"].decode().splitlines()
    assert [line.split(",")[0] for line in history[1:]] == ["1", "2", "3", "4", "5"]  # each epoch once
    assert manifest["variants"][0]["epochs_run"] == 5
    assert not local_run_dir("outage").exists()  # safely in S3: the local copies are gone


@pytest.mark.slow
def test_a_store_outage_past_the_window_fails_naming_the_endpoint(s3_bucket, proxy, cache, prefect_harness,
                                                                 monkeypatch):
    """Refused for longer than store_outage_minutes (0.3 min here): the run fails naming
    the endpoint and how long it tried; the local copies are whole; the champion untouched."""
    from cnn.checkpoint import read_history
    from flows.train_cifar import train_cifar
    from run.cache import local_run_dir

    uri = f"s3://{s3_bucket}/nightly"
    champions.promote(open_store(uri), _candidate("old-champion", 0.0), promote_by_accuracy(0.0))
    documents = {k: v for k, v in _objects(s3_bucket).items() if k.startswith("nightly/champions/")}
    assert len(documents) == 1
    _outage_after_epoch(monkeypatch, 2, proxy, back_after_s=None)
    t0 = time.monotonic()
    with pytest.raises(RuntimeError) as err:
        train_cifar(store=uri, run_id="gone", store_outage_minutes=0.3, **OUTAGE_RUN)
    assert time.monotonic() - t0 < 120
    msg = str(err.value)
    tried = int(re.search(rf"the S3 endpoint {re.escape(proxy.endpoint)} did not answer for (\d+) s", msg).group(1))
    assert 18 <= tried < 60, msg

    # every epoch trained is kept locally (how many depends on this machine's speed: the
    # variant stops at the first epoch that ends after the window)
    local = local_run_dir("gone") / "variants" / "none"
    epochs = [r["epoch"] for r in read_history(local / "checkpoint.safetensors")]
    assert epochs == list(range(1, len(epochs) + 1)) and len(epochs) >= 2
    assert len((local / "history.csv").read_text().splitlines()) == 1 + len(epochs)
    proxy.accept()
    assert {k: v for k, v in _objects(s3_bucket).items() if k.startswith("nightly/champions/")} == documents
    assert not open_store(uri).exists("runs/gone/variants/none/metrics.json")
    assert stored_key(open_store(uri), "gone", Unit("none", 0), "metrics.json") is None
