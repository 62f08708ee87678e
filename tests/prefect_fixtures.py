"""A real Prefect server for the tests: `prefect server start` on a free loopback port,
its own PREFECT_HOME, and helpers to run the CLI and stop every process started.

Used as a pytest plugin (tests/conftest.py): the `procs` and `server` fixtures are
module-scoped, so each test module that uses them gets a server of its own.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PREFECT = str(Path(sys.executable).with_name("prefect"))
# The bound on a server's start, a CLI command and a worker's registration. With make test's
# workers starting four servers, their workers and `prefect deploy` at once on 2 cores, a
# `prefect deploy` took over 120 s.
STARTUP_S = 360
GPU_POOL, CPU_POOL, LOCAL_POOL, VARIANT_POOL = ("train-cifar-gpu", "train-cifar-cpu", "train-cifar-local",
                                                "train-cifar-local-variants")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[:3]} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout}s:\n{log.read_text()[-3000:]}")


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, read from /proc (a worker starts each flow run in a
    session of its own, so stopping the worker's group alone could leave a run behind)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


# ---------------------------------------------------------------- one migrated database

# Each server a test starts (a module's `prefect server start`, a worker's test harness) would
# otherwise migrate an empty SQLite file to Prefect's schema: about 6 s of CPU each, a sixth
# of the suite's server CPU. The session migrates one file, in the background while the
# suite is collected (`start_migrating`, from tests/conftest.py), and each server starts on a
# copy of it, as on a database that `prefect server database upgrade` made. The CLI's
# new-user tests keep an empty home: their first run migrates, as a new user's does.
MIGRATED = "TRAIN_CIFAR_TEST_MIGRATED_DB"  # the folder, for every pytest-xdist worker


def start_migrating() -> subprocess.Popen:
    """Starts `prefect server database upgrade` into a folder of its own, named in the
    environment (so inherited by pytest-xdist's workers); the file appears there once whole."""
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="train-cifar-migrated-"))
    os.environ[MIGRATED] = str(folder)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")},
           "PREFECT_HOME": str(folder / "home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    script = ('"$0" server database upgrade -y > "$1/log" 2>&1 && mv "$1/home/prefect.db" "$1/prefect.db" '
              '|| touch "$1/failed"')
    return subprocess.Popen(["sh", "-c", script, PREFECT, str(folder)], env=env, stdin=subprocess.DEVNULL,
                            start_new_session=True)


def copy_migrated(dest: Path) -> None:
    """Puts a copy of the session's migrated database at `dest`, waiting for it (bounded)."""
    folder = Path(os.environ[MIGRATED])
    deadline = time.monotonic() + STARTUP_S
    while not (folder / "prefect.db").exists():
        if (folder / "failed").exists() or time.monotonic() > deadline:
            log = folder / "log"
            raise RuntimeError(f"prefect server database upgrade did not make {folder / 'prefect.db'}:\n"
                               f"{log.read_text()[-3000:] if log.exists() else '(no log)'}")
        time.sleep(0.5)
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(folder / "prefect.db", dest)


def stop_migrating(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    shutil.rmtree(os.environ.pop(MIGRATED), ignore_errors=True)


class Processes:
    """Background processes, each in its own process group; `stop_all` stops them and
    everything they started."""

    def __init__(self, logs: Path):
        self.logs = logs
        self.procs: list[subprocess.Popen] = []

    def start(self, name: str, cmd: list[str], env: dict, cwd: Path = REPO) -> tuple[subprocess.Popen, Path]:
        log = self.logs / f"{name}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        self.procs.append(proc)
        return proc, log

    def stop_all(self) -> None:
        for proc in reversed(self.procs):  # the worker before the server it reports to
            if proc.poll() is not None:
                continue
            tree = descendants(proc.pid)
            os.killpg(proc.pid, signal.SIGTERM)
            for pid in tree:
                _signal(pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
            for pid in tree:
                _signal(pid, signal.SIGKILL)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


@pytest.fixture(scope="module")
def procs(tmp_path_factory):
    p = Processes(tmp_path_factory.mktemp("logs"))
    try:
        yield p
    finally:
        p.stop_all()


@pytest.fixture(scope="module")
def server(procs, tmp_path_factory, request) -> dict:
    """A Prefect server (SQLite) on a free port; returns the env for CLI calls. A test module
    may set server settings of its own in SERVER_SETTINGS (a dict of PREFECT_SERVER_* variables)."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")},  # nothing of another server
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_UI_ENABLED": "true",
        "PREFECT_UI_API_URL": api,  # the browser's API, not the default 127.0.0.1:4200
        "PREFECT_LOGGING_LEVEL": "INFO",
        "PREFECT_CLI_WRAP_LINES": "false",
        "COLUMNS": "200",
        # the suite runs several servers, workers and trainings on 2 cores: there a SQLite write
        # that meets another (SQLITE_BUSY) is answered 503, for the client to retry, and five
        # retries (the default) ran out once in a full run; every client here (CLI, worker,
        # flow run) retries ten times, with Prefect's growing backoff
        "PREFECT_CLIENT_MAX_RETRIES": "10",
        # a run's scratch files (prepared tensors, checkpoints) stay in the test's folder
        "TRAIN_CIFAR_CACHE": str(tmp_path_factory.mktemp("cache")),
        **getattr(request.module, "SERVER_SETTINGS", {}),
    }
    copy_migrated(home / "prefect.db")
    proc, log = procs.start("server", [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                            {k: v for k, v in env.items() if k != "PREFECT_API_URL"})
    wait_http(f"{api}/health", STARTUP_S, proc, log)
    return env


def cli(env: dict, *args: str, timeout: float = STARTUP_S, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run([PREFECT, *args], env=env, cwd=REPO, capture_output=True, text=True,
                       timeout=timeout, stdin=subprocess.DEVNULL)
    if check and r.returncode != 0:
        raise AssertionError(f"prefect {' '.join(args)} exited {r.returncode}:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}")
    return r


def client(env: dict):
    from prefect.client.orchestration import SyncPrefectClient

    return SyncPrefectClient(env["PREFECT_API_URL"])


# ---------------------------------------------------------------- pools, deployments, workers

PREFECT_FILE = REPO / "deployments" / "prefect.yaml"
FLOW_OF_ENTRYPOINT = {"flows/train_cifar.py:train_cifar": "train-cifar", "flows/train_variant.py:train_variant": "train-variant"}
TEST_IMAGE = "ghcr.io/your-org/train-cifar:test"
TEST_IMAGE_ID = "sha256:" + "0" * 64  # what build_docker_image would give as the image's ID
# for the environment of every process that must know the suite's test-only variant and
# models (`scramble`, `tiny`, `paced`: tests/extras/sitecustomize.py), the deploying one too,
# so that the deployments' parameter schemas list them
EXTRAS = {"PYTHONPATH": str(REPO / "tests" / "extras")}


def load_prefect_yaml() -> dict:
    """The deployments of deployments/prefect.yaml as {"<flow>/<name>": deployment}, anchors resolved."""
    import yaml

    doc = yaml.safe_load(PREFECT_FILE.read_text())
    return {f"{FLOW_OF_ENTRYPOINT[d['entrypoint']]}/{d['name']}": d for d in doc["deployments"]}


def create_pools(env: dict) -> None:
    """The four pools, as `make deploy` creates them."""
    for kind in ("gpu", "cpu"):
        cli(env, "work-pool", "create", f"train-cifar-{kind}", "--type", "kubernetes", "--base-job-template",
            str(REPO / "deployments" / f"{kind}-job-template.json"))
    for pool in (LOCAL_POOL, VARIANT_POOL):
        cli(env, "work-pool", "create", pool, "--type", "process")


def deploy_all(env: dict, tmp: Path) -> None:
    """Every deployment: the local ones with exactly `make deploy`'s command; the
    Kubernetes ones from the same file with the Docker build and push left out (no
    Docker daemon here) and the image they would produce named directly."""
    import yaml

    cli(env, "deploy", "--prefect-file", str(PREFECT_FILE.relative_to(REPO)),
        "--name", "train-cifar/local", "--name", "train-variant/local")
    doc = yaml.safe_load(PREFECT_FILE.read_text())
    for d in doc["deployments"]:
        if d["name"] in ("nightly", "gpu"):
            d["build"] = d["push"] = None
            d["work_pool"]["job_variables"]["image"] = TEST_IMAGE
            d["work_pool"]["job_variables"]["env"]["TRAIN_CIFAR_IMAGE"] = TEST_IMAGE
            d["work_pool"]["job_variables"]["env"]["TRAIN_CIFAR_IMAGE_ID"] = TEST_IMAGE_ID
    no_docker = tmp / "prefect.yaml"
    no_docker.write_text(yaml.safe_dump(doc, sort_keys=False))
    cli(env, "deploy", "--prefect-file", str(no_docker), "--name", "train-cifar/nightly", "--name", "train-variant/gpu")


def start_worker(procs: Processes, env: dict, pool: str, name: str, *extra: str,
                 sigint_ignored: bool = False) -> tuple[subprocess.Popen, Path]:
    """The project's process worker as `make worker` starts it (`deployments/worker.py --pool
    <pool> --name <name> [extra]`), once it has registered. `sigint_ignored`: started as a
    shell without job control starts a background job, with SIGINT ignored."""
    env = {**env, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', os.environ['PATH'])}",
           "PREFECT_WORKER_QUERY_SECONDS": "2", "PREFECT_WORKER_PREFETCH_SECONDS": "2"}
    cmd = [sys.executable, str(REPO / "deployments" / "worker.py"), "--pool", pool, "--name", name, *extra]
    if sigint_ignored:
        cmd = ["bash", "-c", 'trap "" INT; exec "$@"', "worker", *cmd]  # exec keeps the ignored signal
    proc, log = procs.start(name, cmd, env)
    deadline = time.monotonic() + STARTUP_S
    with client(env) as c:
        while not any(w.name == name for w in c.read_workers_for_work_pool(pool)):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the worker {name} did not come up:\n{log.read_text()[-3000:]}")
            time.sleep(1)
    return proc, log


# ---------------------------------------------------------------- processes of a flow run


def run_processes(flow_run_id) -> list[int]:
    """The processes running this flow run: those whose environment names it."""
    needle = f"PREFECT__FLOW_RUN_ID={flow_run_id}".encode()
    pids = []
    for env in Path("/proc").glob("[0-9]*/environ"):
        try:
            if needle in env.read_bytes().split(b"\0"):
                pids.append(int(env.parent.name))
        except OSError:
            continue
    return sorted(pids)


def settled(flow_run_ids, timeout: float = 120) -> None:
    """Once these flow runs' processes are gone (bounded by `timeout`). A run's state is final
    before its process has sent its last log lines, which go in batches and are flushed as it
    exits: logs are read after this."""
    deadline = time.monotonic() + timeout
    while any(run_processes(i) for i in flow_run_ids) and time.monotonic() < deadline:
        time.sleep(0.5)


def eventually(read, ok, timeout: float = 60, every: float = 1.0):
    """`read()`'s value once `ok(value)` holds, or its last value after `timeout` seconds (for the
    test's own assertion to report): what the server records after a run ends (task run states
    come as events) may lag the run's final state on a busy machine."""
    deadline = time.monotonic() + timeout
    while not ok(value := read()) and time.monotonic() < deadline:
        time.sleep(every)
    return value


def top_process(flow_run_id) -> int:
    """The flow run's own process (`prefect flow-run execute`, a pod's main process), not
    the engine it started."""
    pids = run_processes(flow_run_id)
    tops = [p for p in pids if not any(p in descendants(q) for q in pids if q != p)]
    assert len(tops) == 1, f"expected one top process for {flow_run_id}, found {tops} of {pids}"
    return tops[0]


def kill(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


@contextlib.contextmanager
def notification_webhook(env: dict, block: str = "train-cifar-test"):
    """The automations of deployments/add_automations.py --block, sending through a
    custom-webhook block to an HTTP endpoint on loopback; yields what it receives."""
    import http.server
    import json
    import threading

    received: list[dict] = []

    class Hook(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}/hook"
        subprocess.run([sys.executable, "-c", (
            "import sys; from prefect.blocks.notifications import CustomWebhookNotificationBlock as B; "
            "B(name=sys.argv[2], url=sys.argv[1], "
            "json_data={'subject': '{{subject}}', 'body': '{{body}}'}).save(sys.argv[2])"), url, block],
            env=env, cwd=REPO, check=True, capture_output=True, timeout=60)
        r = subprocess.run([sys.executable, "deployments/add_automations.py", "--block", f"custom-webhook/{block}"],
                           env=env, cwd=REPO, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
        yield received
    finally:
        httpd.shutdown()
        thread.join(timeout=10)
