"""S3Store against a real S3 endpoint (moto's server on 127.0.0.1), through boto3."""
from __future__ import annotations

import hashlib
import os
import time
import traceback
import urllib.request
from pathlib import Path

import pytest

import store.s3 as s3mod
from store import PreconditionFailed, StoreError, open_store
from store.s3 import S3Store
from tests.s3_fixtures import aws_client, use_credentials

MiB = 1 << 20


def _write(path: Path, n: int, seed: int = 0) -> Path:
    path.write_bytes(hashlib.sha256(str(seed).encode()).digest() * (n // 32) + b"x" * (n % 32))
    return path


def _object(bucket: str, key: str) -> bytes:
    return aws_client().get_object(Bucket=bucket, Key=key)["Body"].read()


@pytest.fixture
def small_parts(monkeypatch):
    """Multipart from 5 MiB (S3's smallest part) so the tests stay small."""
    monkeypatch.setattr(s3mod, "MULTIPART_THRESHOLD", 5 * MiB)
    monkeypatch.setattr(s3mod, "MULTIPART_CHUNKSIZE", 5 * MiB)


def test_open_store_gives_s3(s3_bucket):
    st = open_store(f"s3://{s3_bucket}/team/nightly/")
    assert isinstance(st, S3Store)
    assert st.uri == f"s3://{s3_bucket}/team/nightly"
    assert st.uri_for("runs/r1/manifest.json") == f"s3://{s3_bucket}/team/nightly/runs/r1/manifest.json"


@pytest.mark.parametrize("size", [0, 1000, 12 * MiB], ids=["empty", "single-put", "multipart"])
def test_put_records_the_objects_sha256(s3_bucket, tmp_path, small_parts, size):
    st = S3Store(f"s3://{s3_bucket}/p")
    src = _write(tmp_path / "f.bin", size)
    info = st.put_file("runs/r1/model/weights.safetensors", src)

    body = _object(s3_bucket, "p/runs/r1/model/weights.safetensors")
    assert info == {"uri": f"s3://{s3_bucket}/p/runs/r1/model/weights.safetensors",
                    "sha256": hashlib.sha256(body).hexdigest(), "bytes": size}
    assert body == src.read_bytes()
    # S3 keeps the SHA-256 it checked on arrival (of the parts, for a multipart upload)
    head = aws_client().head_object(Bucket=s3_bucket, Key="p/runs/r1/model/weights.safetensors",
                                          ChecksumMode="ENABLED")
    assert head["ChecksumSHA256"]

    out = st.get_file("runs/r1/model/weights.safetensors", tmp_path / "back" / "f.bin")
    assert out.read_bytes() == src.read_bytes()


def test_list_and_exists_stay_inside_the_prefix(s3_bucket, tmp_path):
    src = _write(tmp_path / "f", 10)
    st = S3Store(f"s3://{s3_bucket}/a")
    for key in ["runs/r1/manifest.json", "runs/r1/variants/flip/history.csv", "runs/r10/manifest.json"]:
        st.put_file(key, src)
    S3Store(f"s3://{s3_bucket}/ab").put_file("runs/r1/other.json", src)  # a sibling prefix

    assert st.list("runs/r1") == ["runs/r1/manifest.json", "runs/r1/variants/flip/history.csv"]
    assert st.list("") == ["runs/r1/manifest.json", "runs/r1/variants/flip/history.csv", "runs/r10/manifest.json"]
    assert st.list("runs/none") == []
    assert st.exists("runs/r1/manifest.json")
    assert not st.exists("runs/r1/other.json")
    assert S3Store(f"s3://{s3_bucket}").list("ab") == ["ab/runs/r1/other.json"]


def test_read_versioned_and_conditional_writes(s3_bucket):
    st = S3Store(f"s3://{s3_bucket}/p")
    assert st.read_versioned("champion.json") == (None, None)

    st.write_if("champion.json", b"first", None)  # If-None-Match: *
    with pytest.raises(PreconditionFailed, match="champion.json"):
        st.write_if("champion.json", b"second first", None)  # it exists now

    data, v1 = st.read_versioned("champion.json")
    assert data == b"first" and v1
    st.write_if("champion.json", b"second", v1)  # If-Match: the ETag read
    with pytest.raises(PreconditionFailed):
        st.write_if("champion.json", b"stale", v1)  # a writer still holding the old ETag loses

    data, v2 = st.read_versioned("champion.json")
    assert data == b"second" and v2 != v1

    aws_client().delete_object(Bucket=s3_bucket, Key="p/champion.json")
    with pytest.raises(PreconditionFailed):
        st.write_if("champion.json", b"gone", v2)  # deleted since it was read


def test_an_oversized_champion_document_in_s3_is_refused_unread(s3_bucket):
    """A champion document padded past the limit by a store writer: refused by its size,
    naming the object and the limit, before its body is read (not a MemoryError)."""
    from store import MAX_DOCUMENT_BYTES, TooLarge
    from registry import champions

    ident = champions.identity({"dataset_name": "cifar10", "dataset_md5": "a" * 32, "split_seed": 0,
                               "test_size": 3500})
    body = b'{"identity": "x", "champion": {}, "history": [], "pad": "' + b"x" * MAX_DOCUMENT_BYTES + b'"}'
    aws_client().put_object(Bucket=s3_bucket, Key=f"p/{champions.key_for(ident)}", Body=body)
    st = open_store(f"s3://{s3_bucket}/p")
    with pytest.raises(TooLarge) as err:
        champions.read(st, ident)
    assert str(err.value) == (f"s3://{s3_bucket}/p/{champions.key_for(ident)}: {len(body):,} bytes, larger than a "
                              f"store document can be (limit {MAX_DOCUMENT_BYTES:,} bytes); refused")


def test_a_limited_download_counts_the_bytes_it_writes(s3_bucket, tmp_path, monkeypatch):
    """An object that grew after its size was checked (HEAD) stops at the limit: the
    partial download is removed and nothing is left at the destination."""
    from store import TooLarge

    st = S3Store(f"s3://{s3_bucket}/p")
    st.put_file("a.bin", _write(tmp_path / "a.bin", 3 * MiB))
    real_head = st.client.head_object
    monkeypatch.setattr(st.client, "head_object", lambda **kw: {**real_head(**kw), "ContentLength": 10})
    with pytest.raises(TooLarge, match=f"^s3://{s3_bucket}/p/a.bin: .* bytes, larger than this download can be "
                                       r"\(limit 1,048,576 bytes\); refused"):
        st.get_file("a.bin", tmp_path / "out" / "a.bin", limit=1 * MiB)
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize("key", ["runs/../../escape.json", "../x", "runs//x", "runs/./x", "runs\\..\\x", "/abs"])
def test_a_key_cannot_escape_the_prefix(s3_bucket, tmp_path, key):
    st = S3Store(f"s3://{s3_bucket}/team")
    src = _write(tmp_path / "f", 10)
    for call in (lambda: st.put_file(key, src), lambda: st.read_versioned(key), lambda: st.exists(key),
                 lambda: st.write_if(key, b"x", None), lambda: st.link_for(key)):
        with pytest.raises(ValueError, match="invalid store key part"):
            call()
    assert "Contents" not in aws_client().list_objects_v2(Bucket=s3_bucket)


@pytest.mark.parametrize("name", ["../other", "flip/../../x", "a/b", ""])
def test_run_and_variant_names_are_validated(name):
    from run.layout import Unit, run_key

    with pytest.raises(ValueError, match="not a valid name"):
        run_key(name, "manifest.json")
    with pytest.raises(ValueError, match="not a valid name"):
        Unit(name, 0).key("r1", "history.csv")


@pytest.mark.parametrize("uri", ["s3://Bad_Bucket/p", "s3://b/p", "s3://bucket/../p", "s3://bucket/a//b"])
def test_bad_store_uri_is_refused(uri):
    import re

    with pytest.raises(ValueError, match=re.escape(repr(uri))):  # names what was given
        S3Store(uri)


def test_presigned_link_downloads_and_expires(s3_bucket, tmp_path):
    st = S3Store(f"s3://{s3_bucket}/p")
    st.put_file("runs/r1/report.md", _write(tmp_path / "r", 100))
    link = st.link_for("runs/r1/report.md", expires_s=600)
    assert link.startswith(os.environ["AWS_ENDPOINT_URL"]) and "X-Amz-Expires=600" in link
    assert urllib.request.urlopen(link, timeout=10).read() == (tmp_path / "r").read_bytes()
    with pytest.raises(ValueError, match="expires_s"):
        st.link_for("runs/r1/report.md", expires_s=8 * 24 * 3600)


def test_missing_bucket_is_named_with_what_to_do(s3_server, tmp_path):
    s3_server.ensure_running()
    st = S3Store("s3://no-such-bucket-here/p")
    src = _write(tmp_path / "f", 10)
    calls = {"put_file": lambda: st.put_file("a.json", src), "get_file": lambda: st.get_file("a.json", tmp_path / "g"),
             "exists": lambda: st.exists("a.json"), "read_versioned": lambda: st.read_versioned("a.json"),
             "list": lambda: st.list("runs"), "write_if": lambda: st.write_if("a.json", b"x", None)}
    for name, call in calls.items():
        with pytest.raises(StoreError) as err:
            call()
        msg = str(err.value)
        assert "no-such-bucket-here" in msg and "NoSuchBucket" in msg and "create it" in msg, (name, msg)


def _assert_no_secret(err: BaseException, *secrets: str) -> None:
    text = "".join(traceback.format_exception(err))
    for secret in secrets:
        assert secret not in text


@pytest.mark.parametrize("case", ["wrong-secret", "unknown-key"])
def test_bad_credentials_fail_at_once_without_leaking(s3_bucket, s3_users, tmp_path, monkeypatch, case):
    key_id, secret = s3_users["writer"]["AWS_ACCESS_KEY_ID"], "wrong" + s3_users["writer"]["AWS_SECRET_ACCESS_KEY"]
    if case == "unknown-key":
        key_id, secret = "AKIAUNKNOWNKEY000000", "an-unknown-secret-value"
    use_credentials(monkeypatch, {"AWS_ACCESS_KEY_ID": key_id, "AWS_SECRET_ACCESS_KEY": secret})
    st = S3Store(f"s3://{s3_bucket}/p")
    src = _write(tmp_path / "f", 10)
    for call in (lambda: st.put_file("a.json", src), lambda: st.exists("a.json"), lambda: st.read_versioned("a.json")):
        t0 = time.monotonic()
        with pytest.raises(StoreError) as err:
            call()
        assert time.monotonic() - t0 < 5  # permanent: not retried
        msg = str(err.value)
        assert s3_bucket in msg
        assert ("SignatureDoesNotMatch" if case == "wrong-secret" else "InvalidAccessKeyId") in msg
        assert "AWS_SECRET_ACCESS_KEY" in msg or "AWS_ACCESS_KEY_ID" in msg
        _assert_no_secret(err.value, key_id, secret, s3_users["writer"]["AWS_SECRET_ACCESS_KEY"])


def test_access_denied_names_the_bucket(s3_bucket, s3_users, tmp_path, monkeypatch):
    use_credentials(monkeypatch, s3_users["nobody"])
    st = S3Store(f"s3://{s3_bucket}/p")
    with pytest.raises(StoreError) as err:
        st.put_file("a.json", _write(tmp_path / "f", 10))
    assert "AccessDenied" in str(err.value) and s3_bucket in str(err.value) and "s3:PutObject" in str(err.value)
    _assert_no_secret(err.value, *s3_users["nobody"].values())

    use_credentials(monkeypatch, s3_users["writer"])  # the same bucket with permission works
    assert S3Store(f"s3://{s3_bucket}/p").put_file("a.json", tmp_path / "f")["bytes"] == 10


def test_no_credentials_at_all(s3_bucket, monkeypatch, tmp_path):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(StoreError, match="no AWS credentials found"):
        S3Store(f"s3://{s3_bucket}/p").put_file("a.json", _write(tmp_path / "f", 10))


def test_a_file_changed_during_a_multipart_upload_is_caught(s3_bucket, tmp_path, small_parts, monkeypatch):
    # the composite of the parts' SHA-256 that S3 checked must match what was hashed
    real = s3mod._hash_file

    def stale_hash(path, part):
        whole, parts = real(path, part)
        return whole, [hashlib.sha256(b"before the change").digest()] + parts[1:]

    monkeypatch.setattr(s3mod, "_hash_file", stale_hash)
    with pytest.raises(StoreError, match="changed while it was uploaded"):
        S3Store(f"s3://{s3_bucket}/p").put_file("big.bin", _write(tmp_path / "big", 11 * MiB))


@pytest.mark.xfail(strict=True, reason="moto 5.2 stores x-amz-checksum-sha256 without checking it; "
                                       "AWS S3 refuses the PUT with 400 BadDigest")
def test_a_wrong_sha256_is_refused_by_the_endpoint(s3_bucket, tmp_path, monkeypatch):
    real = s3mod._hash_file

    def wrong(path, part):
        _, parts = real(path, part)
        return hashlib.sha256(b"not the content"), parts

    monkeypatch.setattr(s3mod, "_hash_file", wrong)
    with pytest.raises(StoreError, match="BadDigest"):
        S3Store(f"s3://{s3_bucket}/p").put_file("a.bin", _write(tmp_path / "a", 1000))


@pytest.mark.slow
def test_endpoint_stopped_mid_upload_retries_then_fails_clearly(s3_server, s3_bucket, tmp_path, small_parts,
                                                                 monkeypatch):
    monkeypatch.setattr(s3mod, "MAX_CONCURRENCY", 1)  # parts in order: the stop lands after part 1
    st = S3Store(f"s3://{s3_bucket}/p")
    attempts: dict[str, int] = {}

    def count(event_name, **kw):
        op = event_name.rsplit(".", 1)[-1]
        attempts[op] = attempts.get(op, 0) + 1

    def stop_after_first_part(http_response, parsed, **kw):
        if attempts.get("UploadPart") == 1:
            s3_server.stop()

    st.client.meta.events.register("before-send.s3.*", count)
    st.client.meta.events.register("after-call.s3.UploadPart", stop_after_first_part)
    with pytest.raises(StoreError) as err:
        st.put_file("runs/r1/variants/flip/checkpoint.pt", _write(tmp_path / "ckpt", 16 * MiB))
    msg = str(err.value)
    assert f"s3://{s3_bucket}/p/runs/r1/variants/flip/checkpoint.pt" in msg
    assert s3_server.endpoint in msg and "did not answer after 3 attempts" in msg
    assert attempts["UploadPart"] == 1 + 3  # part 1, then part 2 tried max_attempts times with backoff
    assert (tmp_path / "ckpt").stat().st_size == 16 * MiB  # the local file is untouched


# a password in AWS_ENDPOINT_URL ---------------------------------------------------------
def _traceback(err: BaseException) -> str:
    return "".join(traceback.format_exception(err))


def test_a_password_in_the_endpoint_is_shown_nowhere(s3_server, s3_bucket, monkeypatch, caplog, capsys, tmp_path):
    """`http://user:password@host:9000` (a common MinIO setup): the store works, and the
    password is in no error (its traceback included), log line, link or stored object."""
    import logging

    password = f"pw-{os.urandom(6).hex()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://minio:{password}@127.0.0.1:{s3_server.port}")
    shown = f"http://minio:***@127.0.0.1:{s3_server.port}"
    caplog.set_level(logging.DEBUG)  # boto3's own debug lines too
    st = open_store(f"s3://{s3_bucket}/p", outage_minutes=1)
    assert st.endpoint == shown
    st.put_file("runs/r1/report.md", _write(tmp_path / "r", 100))
    link = st.link_for("runs/r1/report.md", expires_s=600)
    assert password not in link and urllib.request.urlopen(link, timeout=10).read() == (tmp_path / "r").read_bytes()

    with pytest.raises(StoreError) as err:  # an error that names the endpoint
        open_store("s3://no-such-bucket-here/p", outage_minutes=1).exists("a.json")
    assert "NoSuchBucket" in str(err.value) and shown in str(err.value)
    with pytest.raises(ValueError) as bad:  # the endpoint given as the store by mistake
        open_store(f"http://minio:{password}@127.0.0.1:{s3_server.port}/bucket")

    printed = capsys.readouterr()
    for text in [_traceback(err.value), _traceback(bad.value), caplog.text, printed.out + printed.err]:
        assert password not in text
    assert all(password.encode() not in body for body in _objects_in(s3_bucket).values())


def _objects_in(bucket: str) -> dict[str, bytes]:
    s3 = aws_client()
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
    keys = [o["Key"] for p in pages for o in p.get("Contents", [])]
    return {k: s3.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}


def test_a_password_in_the_endpoint_is_scrubbed_from_outage_messages(s3_server, s3_bucket, monkeypatch, caplog, capsys):
    """The endpoint answers, then refuses: the warnings while it is waited for and the final
    StoreOutage name it as http://minio:***@host."""
    import logging

    from store import StoreOutage
    from tests.tcp_proxy import TcpProxy

    password = f"pw-{os.urandom(6).hex()}"
    proxy = TcpProxy(s3_server.port)
    proxy.accept()
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://minio:{password}@127.0.0.1:{proxy.port}")
        caplog.set_level(logging.DEBUG)
        st = open_store(f"s3://{s3_bucket}/p", outage_minutes=0.05)  # 3 s
        st.exists("warm")  # it answered
        proxy.refuse()
        with pytest.raises(StoreOutage) as err:
            st.read_versioned("champion.json")
    finally:
        proxy.close()
    assert f"the S3 endpoint http://minio:***@127.0.0.1:{proxy.port} did not answer for" in str(err.value)
    assert "trying again in" in caplog.text  # the outage's warnings were logged...
    printed = capsys.readouterr()
    for text in [_traceback(err.value), caplog.text, printed.out + printed.err]:
        assert password not in text  # ...without the password


def test_scrub_hides_passwords_tokens_and_signatures():
    from store import scrub

    assert scrub("http://minio:s3cr3t@minio.internal:9000/b") == "http://minio:***@minio.internal:9000/b"
    assert scrub('Could not connect to the endpoint URL: "https://tok3n@h/b/k"') == \
        'Could not connect to the endpoint URL: "https://***@h/b/k"'
    assert scrub("http://h:9000/b/k?X-Amz-Credential=AKIA1&X-Amz-Signature=abc&X-Amz-Security-Token=t&max-keys=1") \
        == "http://h:9000/b/k?X-Amz-Credential=***&X-Amz-Signature=***&X-Amz-Security-Token=***&max-keys=1"
    assert scrub("s3://bucket/a@b and http://h/x?email=a@b.c") == "s3://bucket/a@b and http://h/x?email=a@b.c"
    assert scrub("the key AKIAEXAMPLE echoed", "AKIAEXAMPLE", None) == "the key *** echoed"


# a store that ignores conditional writes -------------------------------------------------
def test_the_probe_passes_on_stores_that_honour_conditional_writes(s3_bucket, tmp_path):
    from store import LocalStore, require_conditional_writes
    from store.probe import PROBE_NOTE

    for st in [open_store(f"s3://{s3_bucket}/p", outage_minutes=1), LocalStore(tmp_path / "store")]:
        require_conditional_writes(st, "runs/r1/conditional-write-probe")
        require_conditional_writes(st, "runs/r1/conditional-write-probe")  # once per store: nothing more
        assert st.read_versioned("runs/r1/conditional-write-probe")[0] == PROBE_NOTE


@pytest.mark.parametrize("ignored,named", [(("if-none-match", "if-match"), "If-None-Match: *"),
                                           (("if-match",), "If-Match")], ids=["both", "if-match"])
def test_a_store_that_ignores_conditional_writes_is_refused(careless, s3_bucket, ignored, named):
    from store import require_conditional_writes

    proxy = careless(*ignored)
    st = open_store(f"s3://{s3_bucket}/p", outage_minutes=1)
    with pytest.raises(StoreError) as err:
        require_conditional_writes(st, "runs/r1/conditional-write-probe")
    msg = str(err.value)
    assert f"s3://{s3_bucket}/p (the S3 endpoint {proxy.endpoint}) does not honour conditional writes ({named})" \
        in msg and f"s3://{s3_bucket}/p/runs/r1/conditional-write-probe" in msg
    # what the probe found is real: through this endpoint a write that must lose lands
    st.write_if("champion.json", b"first", None)
    if "if-none-match" in ignored:
        st.write_if("champion.json", b"second", None)
        assert _object(s3_bucket, "p/champion.json") == b"second"
