"""A store that stops answering is waited for, up to the outage window (store/outage.py,
store/uploader.py): against moto's server behind a loopback proxy that refuses
connections, and a paused (hung) moto."""
from __future__ import annotations

import re
import threading
import time

import pytest

import store.s3 as s3mod
from store import StoreError, StoreOutage, open_store
from store.lease import LeaseLost
from store.outage import Outage
from store.uploader import Uploader
from tests.s3_fixtures import aws_client, free_port, within
from tests.tcp_proxy import TcpProxy


@pytest.fixture
def proxy(s3_server, s3_bucket, monkeypatch):
    """A proxy in front of moto, and boto3 pointed at it (the bucket exists)."""
    p = TcpProxy(s3_server.port)
    p.accept()
    monkeypatch.setenv("AWS_ENDPOINT_URL", p.endpoint)
    yield p
    p.close()


def _back_after(seconds: float, action) -> threading.Timer:
    t = threading.Timer(seconds, action)
    t.daemon = True
    t.start()
    return t


def test_a_refused_endpoint_is_waited_for_within_the_window(proxy, s3_bucket, tmp_path):
    st = open_store(f"s3://{s3_bucket}/p", outage_minutes=1)
    (tmp_path / "f").write_bytes(b"x" * 1000)
    st.exists("warm")  # it answered: from now on a refusal is an outage
    proxy.refuse()
    _back_after(4, proxy.accept)
    t0 = time.monotonic()
    info = st.put_file("runs/r/a.bin", tmp_path / "f")
    assert time.monotonic() - t0 >= 4  # it did wait
    assert aws_client().get_object(Bucket=s3_bucket, Key="p/runs/r/a.bin")["Body"].read() == b"x" * 1000
    assert info["bytes"] == 1000 and st.outage.unreachable_s() == 0  # the clock stops at a success


def test_a_refused_endpoint_fails_after_the_window_naming_it(proxy, s3_bucket, tmp_path):
    st = open_store(f"s3://{s3_bucket}/p", outage_minutes=0.05)  # 3 s
    st.exists("warm")  # it answered: from now on a refusal is an outage
    proxy.refuse()
    t0 = time.monotonic()
    with pytest.raises(StoreOutage) as err:
        st.read_versioned("champion.json")
    took = time.monotonic() - t0
    msg = str(err.value)
    assert 3 <= took < 20, took
    assert f"the S3 endpoint {proxy.endpoint} did not answer for" in msg and "store_outage_minutes" in msg
    assert int(re.search(r"did not answer for (\d+) s", msg).group(1)) >= 3
    assert f"s3://{s3_bucket}/p/champion.json" in msg  # the last error names the object


@pytest.mark.slow
def test_a_hung_endpoint_is_covered_by_the_same_window(s3_server, s3_bucket, monkeypatch, tmp_path):
    """moto paused (SIGSTOP): connections open, nothing answers. Each request ends at its
    read timeout; the window counts from the first request that hung."""
    monkeypatch.setattr(s3mod, "READ_TIMEOUT_S", 1)
    monkeypatch.setattr(s3mod, "CONNECT_TIMEOUT_S", 1)
    # two writers, each with its own outage clock; the bucket is checked while the endpoint answers
    gives_up, waits = (open_store(f"s3://{s3_bucket}/p", outage_minutes=0.1) for _ in range(2))  # 6 s
    gives_up.exists("warm")
    waits.exists("warm")
    s3_server.pause()
    try:
        t0 = time.monotonic()
        with pytest.raises(StoreOutage, match=f"{s3_server.endpoint} did not answer for"):
            gives_up.exists("runs/r/metrics.json")
        assert 6 <= time.monotonic() - t0 < 30
        # paused, then back within the window: the call just takes longer
        _back_after(3, s3_server.resume)
        t0 = time.monotonic()
        assert waits.exists("runs/r/metrics.json") is False
        assert 3 <= time.monotonic() - t0 < 15
        assert waits.outage.unreachable_s() == 0
    finally:
        s3_server.resume()


def test_uploads_go_on_in_the_background_and_the_newest_one_lands(proxy, s3_bucket, tmp_path):
    st = open_store(f"s3://{s3_bucket}/p", outage_minutes=1)
    local = tmp_path / "history.csv"
    with Uploader(st.inner, st.outage, tmp_path / "staging") as up:
        proxy.refuse()
        for epoch in range(1, 4):  # three epochs while the store is away: none waits
            local.write_text(f"epoch {epoch}\n")
            t0 = time.monotonic()
            up.submit({"runs/r/history.csv": local})
            assert time.monotonic() - t0 < 1
            time.sleep(0.5)
        _back_after(2, proxy.accept)
        up.flush()
    body = aws_client().get_object(Bucket=s3_bucket, Key="p/runs/r/history.csv")["Body"].read()
    assert body == b"epoch 3\n"
    assert up.uploaded["runs/r/history.csv"]["bytes"] == len(body)
    assert not (tmp_path / "staging").exists()


def test_an_outage_past_the_window_stops_the_writer_at_its_next_epoch(proxy, s3_bucket, tmp_path):
    st = open_store(f"s3://{s3_bucket}/p", outage_minutes=0.05)  # 3 s
    local = tmp_path / "checkpoint.safetensors"
    local.write_bytes(b"weights")
    with Uploader(st.inner, st.outage, tmp_path / "staging") as up:
        proxy.refuse()
        up.submit({"runs/r/checkpoint.safetensors": local})
        deadline = time.monotonic() + 20
        with pytest.raises(StoreOutage, match=f"{proxy.endpoint} did not answer for"):
            while time.monotonic() < deadline:  # the epochs go on until the window has passed
                up.submit({"runs/r/checkpoint.safetensors": local})
                time.sleep(0.5)
    assert local.read_bytes() == b"weights"  # the local copy is the truth


def test_a_lost_lease_stops_the_writer(tmp_path):
    from store.local import LocalStore

    def lost():
        raise LeaseLost("taken over by flow run x; this writer stops")

    st = LocalStore(tmp_path / "store")
    (tmp_path / "f").write_text("1")
    with Uploader(st, Outage(60, "here"), tmp_path / "staging", before=lost) as up:
        up.submit({"runs/r/history.csv": tmp_path / "f"})
        with pytest.raises(LeaseLost):
            up.flush()
        with pytest.raises(LeaseLost):
            up.submit({"runs/r/history.csv": tmp_path / "f"})
    assert not st.exists("runs/r/history.csv")


def test_the_outage_clock_is_shared_and_stops_only_at_a_success():
    """One clock per store: a caller that comes later in the same outage gives up at the
    same moment as the first one; the first success starts a new outage from zero."""
    from store.base import StoreUnavailable

    down = {"on": True}

    def call():
        if down["on"]:
            raise StoreUnavailable("endpoint refused")
        return "ok"

    outage = Outage(0.4, "the S3 endpoint x")
    t0 = time.monotonic()
    with pytest.raises(StoreOutage, match="did not answer for"):
        outage.call(call)
    assert time.monotonic() - t0 >= 0.4
    t0 = time.monotonic()
    with pytest.raises(StoreOutage):  # still the same outage: no second window
        outage.call(call)
    assert time.monotonic() - t0 < 0.3
    down["on"] = False
    assert outage.call(call) == "ok" and outage.unreachable_s() == 0
    down["on"] = True
    _back_after(0.2, lambda: down.update(on=False))
    assert outage.call(call) == "ok"  # a new outage gets a whole window again


@pytest.mark.parametrize("op", ["read_versioned", "put_file", "write_if"])
def test_an_endpoint_that_never_answered_is_a_configuration_error(s3_server, monkeypatch, tmp_path, op):
    """AWS_ENDPOINT_URL with a typo in its port: nothing listens there. With a 10-minute
    window the store still fails after boto3's own retries, naming the endpoint and what to
    check, instead of waiting the window out."""
    port = free_port()  # bound, then closed: nothing listens on it
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    st = open_store("s3://bucket-name/p", outage_minutes=10)
    (tmp_path / "f").write_bytes(b"x")
    calls = {"read_versioned": lambda: st.read_versioned("champion.json"),
             "put_file": lambda: st.put_file("runs/r/f", tmp_path / "f"),
             "write_if": lambda: st.write_if("runs/r/probe", b"x", None)}
    with pytest.raises(StoreError) as err:
        within(60, calls[op])
    msg = str(err.value)
    assert not isinstance(err.value, StoreOutage)
    assert msg.startswith(f"the S3 endpoint http://127.0.0.1:{port} has not answered once since this process "
                          "started") and "check AWS_ENDPOINT_URL" in msg, msg
    assert "did not answer after 3 attempts" in msg  # boto3's own retries were made (AWS_MAX_ATTEMPTS=3)


def test_an_endpoint_that_answered_once_is_still_waited_for_in_a_later_task(proxy, s3_bucket):
    """Every task opens its own store: what answered is remembered for the process, so an
    endpoint that stops between two tasks is an outage, not a configuration error."""
    open_store(f"s3://{s3_bucket}/p", outage_minutes=1).exists("warm")  # an earlier task's store
    later = open_store(f"s3://{s3_bucket}/p", outage_minutes=1)
    proxy.refuse()
    _back_after(3, proxy.accept)
    assert within(60, lambda: later.exists("runs/r/metrics.json")) is False
    assert later.outage.unreachable_s() == 0
