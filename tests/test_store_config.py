"""A store configured wrong is refused at the start of a run, before any data is touched:
an endpoint where nothing listens (a typo in AWS_ENDPOINT_URL), and an S3-compatible
endpoint that ignores conditional writes. Whatever is printed names the endpoint without
the password it may carry. Against moto's server on 127.0.0.1, through the flows."""
from __future__ import annotations

import logging
import os
import traceback

import pytest

from store import StoreError, StoreOutage, open_store
from registry import champions
from tests.judges import promote_by_accuracy
from tests.s3_fixtures import aws_client, free_port, within

TINY = dict(dataset="synthetic", synthetic_train=100, synthetic_test=50, variants=["none"], epochs=1, subset=60,
            device="cpu")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TRAIN_CIFAR_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _keys(bucket: str) -> set[str]:
    pages = aws_client().get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return {o["Key"] for p in pages for o in p.get("Contents", [])}


@pytest.mark.slow
def test_a_typo_in_the_endpoint_fails_the_run_at_once_naming_it(s3_server, cache, prefect_harness, monkeypatch,
                                                               caplog, capsys):
    """Nothing listens at AWS_ENDPOINT_URL (and it carries a password): with a 10-minute
    outage window the run fails after boto3's retries, saying what to check, not after 10 min."""
    from flows.train_cifar import train_cifar

    password = f"pw-{os.urandom(6).hex()}"
    port = free_port()  # bound, then closed: nothing listens on it
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://minio:{password}@127.0.0.1:{port}")
    caplog.set_level(logging.INFO)
    with pytest.raises(StoreError) as err:
        within(120, lambda: train_cifar(store="s3://bucket-name/nightly", store_outage_minutes=10, run_id="typo",
                                        **TINY))
    msg = str(err.value)
    assert not isinstance(err.value, StoreOutage)
    assert f"the S3 endpoint http://minio:***@127.0.0.1:{port} has not answered once" in msg, msg
    assert "check AWS_ENDPOINT_URL" in msg
    assert not (cache / "runs").exists() and not (cache / "prepared").exists()  # nothing fetched or trained
    printed = capsys.readouterr()
    for text in ["".join(traceback.format_exception(err.value)), caplog.text, printed.out + printed.err]:
        assert password not in text


@pytest.mark.slow
def test_a_run_on_a_store_that_ignores_conditional_writes_stops_before_any_data(careless, s3_bucket, cache,
                                                                               prefect_harness):
    from flows.train_cifar import train_cifar

    proxy = careless("if-none-match", "if-match")
    with pytest.raises(StoreError) as err:
        train_cifar(store=f"s3://{s3_bucket}/nightly", run_id="careless", **TINY)
    msg = str(err.value)
    assert f"(the S3 endpoint {proxy.endpoint}) does not honour conditional writes (If-None-Match: *)" in msg
    # the probe's own object is all the run wrote: no dataset, checkpoint, lease or champion
    assert _keys(s3_bucket) == {"nightly/runs/careless/conditional-write-probe"}
    assert not (cache / "runs").exists() and not (cache / "prepared").exists()


@pytest.mark.slow
def test_a_train_variant_child_refuses_such_a_store_before_training(careless, s3_bucket, cache, prefect_harness):
    """A child's store settings are its pod's own: it probes too, before its lease or its data."""
    from flows.train_variant import train_variant

    careless("if-match")
    with pytest.raises(StoreError, match=r"does not honour conditional writes \(If-Match\)"):
        train_variant(run_id="r1", variant="none", dataset_key="datasets/synthetic/" + "0" * 32,
                      dataset_md5="0" * 32, dataset_sha256="0" * 64, store=f"s3://{s3_bucket}/nightly", epochs=1, device="cpu")
    assert _keys(s3_bucket) == {"nightly/runs/r1/conditional-write-probe"}


def test_a_rollback_refuses_such_a_store_and_changes_nothing(careless, s3_bucket, capsys):
    from cli import champion as champion_cli

    uri = f"s3://{s3_bucket}/nightly"
    st = open_store(uri)  # moto itself, honouring conditional writes
    for run_id, accuracy in [("r1", 0.5), ("r2", 0.6)]:
        champions.promote(st, {"run_id": run_id, "model_uri": f"{uri}/runs/{run_id}/model",
                              "test": {"accuracy": accuracy}, "dataset_name": "cifar10", "dataset_md5": "a" * 32,
                              "split_seed": 0, "test_size": 140}, promote_by_accuracy(0.0))
    before = {k: aws_client().get_object(Bucket=s3_bucket, Key=k)["Body"].read() for k in _keys(s3_bucket)}

    careless("if-none-match", "if-match")
    assert champion_cli.main(["--store", uri, "rollback", "--to", "r1"]) == 1
    assert "does not honour conditional writes (If-None-Match: *)" in capsys.readouterr().err
    after = {k: aws_client().get_object(Bucket=s3_bucket, Key=k)["Body"].read() for k in _keys(s3_bucket)}
    assert {k: v for k, v in after.items() if "/probe/" not in k} == before  # the champion is as it was
