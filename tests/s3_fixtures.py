"""A real S3 endpoint for the tests: moto's server in its own process on 127.0.0.1.

Tests talk to it through boto3 exactly as production talks to AWS: the endpoint
comes from AWS_ENDPOINT_URL, credentials from the environment. Being a separate
process, a test can stop it (kill: the endpoint is gone; pause: it hangs) and
`MotoServer.ensure_running()` brings it back for the next test.
"""
from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

STARTUP_TIMEOUT_S = 30

# `python -m moto.server`, serving one request at a time. moto checks If-Match and
# If-None-Match and then writes without a lock, so on its threaded server two
# concurrent conditional PUTs can both succeed; S3 makes each one atomic, and so
# does a single-threaded moto. (The racing-champion tests depend on it.)
_LAUNCH = (
    "import sys, werkzeug.serving as ws, moto.server as ms; "
    "ms.run_simple = lambda *a, **k: ws.run_simple(*a, **{**k, 'threaded': False}); "
    "ms.main(sys.argv[1:])"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MotoServer:
    """moto's server on 127.0.0.1:<port>; its state lives only in that process."""

    def __init__(self, log_path: Path):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _LAUNCH, "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto server exited with {self.proc.returncode}; see {self.log_path}:\n"
                                   + self.log_path.read_text()[-2000:])
            try:
                urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=1).read()
                return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"moto server on {self.endpoint} did not answer within {STARTUP_TIMEOUT_S}s; "
                           f"see {self.log_path}")

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        """Kill the endpoint (as a crash would). Its buckets are gone with it."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.resume()  # a paused process must run to act on SIGTERM
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        self.log.close()

    def pause(self) -> None:
        """Freeze the endpoint: connections open but nothing answers (a hung server)."""
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.running():
            self.proc.send_signal(signal.SIGCONT)

    def ensure_running(self) -> None:
        """Restart the endpoint on the same port if a test stopped it; resume it if paused."""
        if self.running():
            self.resume()
        else:
            self.stop()
            self.start()

    def set_auth(self, enforced: bool) -> None:
        """Make moto check signatures and IAM policies (off: any credentials pass)."""
        req = urllib.request.Request(f"{self.endpoint}/moto-api/reset-auth", data=b"0" if enforced else b"inf",
                                     method="POST", headers={"Content-Type": "text/plain"})
        urllib.request.urlopen(req, timeout=10).read()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """The moto server, with the environment pointing boto3 at it (and nowhere else)."""
    tmp = tmp_path_factory.mktemp("moto")
    server = MotoServer(tmp / "moto.log")
    mp = pytest.MonkeyPatch()
    try:
        for var in ["AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3",
                    "AWS_ENDPOINT_URL_IAM", "AWS_CA_BUNDLE", "HTTP_PROXY", "HTTPS_PROXY", "http_proxy",
                    "https_proxy", "ALL_PROXY", "all_proxy"]:
            mp.delenv(var, raising=False)
        mp.setenv("AWS_ENDPOINT_URL", server.endpoint)
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        mp.setenv("AWS_REGION", "us-east-1")
        mp.setenv("AWS_MAX_ATTEMPTS", "3")  # retries stay real, the failure tests stay short
        # no developer's ~/.aws config may leak in
        mp.setenv("AWS_CONFIG_FILE", str(tmp / "aws-config"))
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp / "aws-credentials"))
        mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
        mp.setenv("NO_PROXY", "127.0.0.1,localhost")
        server.start()
        yield server
    finally:
        server.stop()
        mp.undo()


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A fresh, empty bucket on a running endpoint (restarted if an earlier test stopped it)."""
    s3_server.ensure_running()
    name = f"test-{uuid.uuid4().hex[:12]}"
    aws_client("s3").create_bucket(Bucket=name)
    return name


@pytest.fixture
def s3_users(s3_server):
    """Two IAM users, one allowed everything on S3 and one allowed nothing, with moto
    checking signatures and permissions for the duration of the test."""
    s3_server.ensure_running()
    iam = aws_client("iam")
    users = {}
    for role, policy in [("writer", {"Effect": "Allow", "Action": "s3:*", "Resource": "*"}), ("nobody", None)]:
        name = f"{role}-{uuid.uuid4().hex[:8]}"
        iam.create_user(UserName=name)
        if policy:
            iam.put_user_policy(UserName=name, PolicyName="s3",
                                PolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": [policy]}))
        key = iam.create_access_key(UserName=name)["AccessKey"]
        users[role] = {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}
    s3_server.set_auth(True)
    try:
        yield users
    finally:
        if s3_server.running():
            s3_server.resume()
            s3_server.set_auth(False)


@pytest.fixture
def careless(s3_server, s3_bucket, monkeypatch):
    """moto behind a proxy that drops the conditional headers a test names: an S3-compatible
    endpoint that accepts conditional writes and overwrites anyway."""
    from tests.tcp_proxy import TcpProxy

    proxies = []

    def endpoint(*strip: str) -> TcpProxy:
        p = TcpProxy(s3_server.port, strip=set(strip))
        p.accept()
        proxies.append(p)
        monkeypatch.setenv("AWS_ENDPOINT_URL", p.endpoint)
        return p

    yield endpoint
    for p in proxies:
        p.close()


def within(seconds: float, fn):
    """`fn()`'s result or exception, or a failed test if it takes longer than `seconds`
    (in a daemon thread, so a call that would wait out a 10-minute window cannot hold pytest)."""
    out: dict = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            out["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"still waiting after {seconds} s"
    if "error" in out:
        raise out["error"]
    return out["value"]


def use_credentials(monkeypatch, creds: dict) -> None:
    for name, value in creds.items():
        monkeypatch.setenv(name, value)


def aws_client(service: str = "s3"):
    """A client on a fresh session: it reads the credentials in the environment now
    (boto3's default session keeps the first ones it found)."""
    import boto3

    return boto3.session.Session().client(service)


__all__ = ["MotoServer", "aws_client", "aws_env", "free_port", "use_credentials", "within"]


AWS_VARS = ["AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_REGION",
            "AWS_MAX_ATTEMPTS", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_EC2_METADATA_DISABLED", "NO_PROXY"]


def aws_env() -> dict:
    """The S3 settings a worker process needs to reach the test endpoint (as set by `s3_server`)."""
    import os

    return {k: os.environ[k] for k in AWS_VARS if k in os.environ}
