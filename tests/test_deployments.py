"""Deployments against a real Prefect server, a real process worker and a real S3 endpoint.

One server (its own PREFECT_HOME, a free port) serves the whole module. The pools
and deployments are created with the same CLI commands as `make deploy`; the flow
runs are started with `prefect deployment run ... --watch` as a user would, and
everything is asserted through the Prefect client and the bucket.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.browser import Page
from tests.prefect_fixtures import (CPU_POOL, EXTRAS, GPU_POOL, LOCAL_POOL, REPO, TEST_IMAGE, TEST_IMAGE_ID, VARIANT_POOL, cli,
                                    client, create_pools, deploy_all, eventually, load_prefect_yaml, notification_webhook,
                                    settled, start_worker)

pytestmark = pytest.mark.slow

GPU_TEMPLATE = REPO / "deployments" / "gpu-job-template.json"
DOCKERFILE = REPO / "deployments" / "Dockerfile"


# ---------------------------------------------------------------- pools


@pytest.fixture(scope="module")
def pools(server) -> dict:
    create_pools(server)
    return server


def test_gpu_pool_accepts_the_template(pools):
    from prefect.utilities.templating import apply_values

    with client(pools) as c:
        pool = c.read_work_pool(GPU_POOL)
    assert pool.type == "kubernetes"
    tmpl = pool.base_job_template
    assert tmpl == json.loads(GPU_TEMPLATE.read_text())  # stored as written
    props = tmpl["variables"]["properties"]
    assert props["gpu_limit"]["type"] == "integer" and props["gpu_limit"]["default"] == 1
    assert props["node_selector"]["type"] == "object"
    assert props["tolerations"]["type"] == "array"
    config_text = json.dumps(tmpl["job_configuration"])
    unused = [name for name in props if "{{ " + name + " }}" not in config_text]
    assert not unused, f"variables never used in job_configuration: {unused}"

    # what a worker would submit for the GPU deployment's job variables
    job_vars = load_prefect_yaml()["train-variant/gpu"]["work_pool"]["job_variables"]
    values = {k: v["default"] for k, v in props.items() if "default" in v} | job_vars | {"image": "img:1"}
    manifest = apply_values(tmpl["job_configuration"]["job_manifest"], values)
    pod = manifest["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == job_vars["gpu_limit"]
    assert pod["nodeSelector"] == job_vars["node_selector"]
    assert pod["tolerations"] == job_vars["tolerations"]
    assert container["envFrom"] == job_vars["env_from"]
    assert container["image"] == "img:1"
    # requests, so the pod is not BestEffort; no Job retries, so that on a graceful
    # eviction the Kubernetes worker reschedules the flow run itself (it resumes)
    assert container["resources"]["requests"] == {"cpu": job_vars["cpu_request"], "memory": job_vars["memory_request"]}
    assert manifest["spec"]["backoffLimit"] == 0


def test_cpu_pool_gives_the_parent_a_burstable_pod(pools):
    from prefect.utilities.templating import apply_values

    with client(pools) as c:
        tmpl = c.read_work_pool(CPU_POOL).base_job_template
    props = tmpl["variables"]["properties"]
    assert "gpu_limit" not in props and "nvidia.com/gpu" not in json.dumps(tmpl)
    job_vars = load_prefect_yaml()["train-cifar/nightly"]["work_pool"]["job_variables"]
    values = {k: v["default"] for k, v in props.items() if "default" in v} | job_vars | {"image": "img:1"}
    container = apply_values(tmpl["job_configuration"]["job_manifest"], values)["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["requests"]["cpu"] and container["resources"]["requests"]["memory"]


# ---------------------------------------------------------------- deployments


def test_prefect_yaml_builds_the_gpu_image_with_the_dockerfile():
    """The Kubernetes deployments' Docker steps (not run here: no Docker daemon in tests)."""
    deployments = load_prefect_yaml()
    assert deployments["train-variant/gpu"]["build"] == deployments["train-cifar/nightly"]["build"]
    nightly = deployments["train-cifar/nightly"]
    build = {k: v for step in nightly["build"] for k, v in step.items()}
    docker = build["prefect_docker.deployments.steps.build_docker_image"]
    assert docker["id"] == "build-image" and docker["dockerfile"] == "deployments/Dockerfile"
    assert (REPO / docker["dockerfile"]).is_file()
    push = nightly["push"][0]["prefect_docker.deployments.steps.push_docker_image"]
    assert push["image_name"] == "{{ build-image.image_name }}" and push["tag"] == "{{ build-image.tag }}"
    assert nightly["work_pool"]["job_variables"]["image"] == "{{ build-image.image }}"
    # the pull step enters the folder where the Dockerfile put the code
    workdir = re.findall(r"^WORKDIR\s+(\S+)", DOCKERFILE.read_text(), re.M)[-1]
    assert nightly["pull"] == [{"prefect.deployments.steps.set_working_directory": {"directory": workdir}}]


@pytest.fixture(scope="module")
def deployed(pools, tmp_path_factory) -> dict:
    deploy_all(pools, tmp_path_factory.mktemp("deploy"))
    return pools


def test_nightly_deployment(deployed):
    """The parent: on the CPU pool, on a schedule, one night at a time, fanning out to the GPU pool."""
    from prefect.client.schemas.objects import ConcurrencyLimitStrategy

    with client(deployed) as c:
        d = c.read_deployment_by_name("train-cifar/nightly")
    assert d.work_pool_name == CPU_POOL
    assert len(d.schedules) == 1 and d.schedules[0].active
    sched = d.schedules[0].schedule
    assert sched.cron == "0 2 * * *" and sched.timezone == "UTC"
    assert d.job_variables["cpu_request"] and d.job_variables["memory_request"]
    assert d.job_variables["image"] == TEST_IMAGE
    assert d.job_variables["env"]["TRAIN_CIFAR_IMAGE"] == TEST_IMAGE  # the fingerprint's image
    assert d.job_variables["env"]["TRAIN_CIFAR_IMAGE_ID"] == TEST_IMAGE_ID  # and its content's ID
    assert d.global_concurrency_limit is not None and d.global_concurrency_limit.limit == 1
    assert d.concurrency_options.collision_strategy == ConcurrencyLimitStrategy.ENQUEUE
    assert d.parameters["dataset"] == "cifar10" and d.parameters["store"].startswith("s3://")
    assert d.parameters["variant_deployment"] == "train-variant/gpu"
    assert d.enforce_parameter_schema
    assert d.pull_steps == [{"prefect.deployments.steps.set_working_directory": {"directory": "/opt/train-cifar"}}]


def test_gpu_variant_deployment(deployed):
    """The children: one GPU pod per variant, and nothing that would cancel a night's own children."""
    with client(deployed) as c:
        d = c.read_deployment_by_name("train-variant/gpu")
    assert d.work_pool_name == GPU_POOL and d.entrypoint == "flows/train_variant.py:train_variant"
    assert d.job_variables["gpu_limit"] == 1
    assert d.job_variables["cpu_request"] and d.job_variables["memory_request"]
    assert d.job_variables["node_selector"] and d.job_variables["tolerations"]
    assert d.job_variables["image"] == TEST_IMAGE
    assert d.global_concurrency_limit is None and d.concurrency_options is None
    assert d.schedules == [] and d.enforce_parameter_schema
    schema = d.parameter_openapi_schema
    assert set(schema["required"]) == {"run_id", "variant", "dataset_key", "dataset_md5", "dataset_sha256",
                                      "store"}


def test_local_deployments(deployed):
    with client(deployed) as c:
        d = c.read_deployment_by_name("train-cifar/local")
        v = c.read_deployment_by_name("train-variant/local")
    assert d.work_pool_name == LOCAL_POOL
    assert d.schedules == []
    assert d.parameters["dataset"] == "synthetic"
    # the process worker runs the code where it was deployed from: this repository
    assert d.pull_steps == [{"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}]
    assert d.entrypoint == "flows/train_cifar.py:train_cifar"
    # the variant worker runs what a Kubernetes pod runs, so a SIGTERM reschedules the run
    assert v.work_pool_name == VARIANT_POOL and v.pull_steps == d.pull_steps
    assert v.job_variables == {"command": "prefect flow-run execute",
                               "env": {"PREFECT_FLOW_RUN_EXECUTE_SIGTERM_BEHAVIOR": "reschedule"}}


def test_a_worker_started_with_sigint_ignored_still_stops_on_sigterm(pools, procs):
    """A shell without job control (a script's `make worker &`, nohup) starts a background job
    with SIGINT ignored. Prefect's handler turns SIGTERM into a SIGINT to the worker itself;
    inherited as ignored, the worker never stopped on SIGTERM and went on taking runs."""
    proc, log = start_worker(procs, pools, VARIANT_POOL, "sigint-ignored", sigint_ignored=True)
    assert "worker stopped" in sigterm_and_wait(proc, log)


def sigterm_and_wait(proc, log, timeout: float = 120) -> str:
    """SIGTERM to the worker's process group; its log once it has exited (else it is killed
    and the test fails, showing the log)."""
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"the worker did not exit within {timeout:g} s of SIGTERM:\n{log.read_text()[-2000:]}")
    return log.read_text()


def test_a_stopped_worker_exits_though_a_thread_is_left_running(pools, procs):
    """Python's exit waits on every thread that is not a daemon; one left blocked in a call
    without a timeout held a stopped worker past the 180 s its test waited. The worker gives
    such threads --exit-grace-seconds, then names them and exits 1."""
    env = {**pools, **EXTRAS, "TRAIN_CIFAR_TEST_STUCK_THREAD": "1"}  # tests/extras/sitecustomize.py
    proc, log = start_worker(procs, env, VARIANT_POOL, "stuck-thread", "--exit-grace-seconds", "3")
    text = sigterm_and_wait(proc, log)
    assert proc.returncode == 1, text[-2000:]
    assert "worker stopped" in text
    assert "after 3 s its exit still waits on threads ['stuck-for-the-test']" in text, text[-2000:]
    assert 'Thread 0x' in text and 'in wait' in text  # the stacks, for whoever reads the log


def test_the_worker_refuses_a_grace_that_is_not_positive():
    out = subprocess.run([sys.executable, str(REPO / "deployments" / "worker.py"), "--pool", "p",
                          "--exit-grace-seconds", "0"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "--exit-grace-seconds: expected a number of seconds above 0, found 0" in out.stderr


@pytest.mark.parametrize("grace", ["inf", "nan"])
def test_the_worker_refuses_a_grace_that_is_no_bound(grace):
    out = subprocess.run([sys.executable, str(REPO / "deployments" / "worker.py"), "--pool", "p",
                          "--exit-grace-seconds", grace], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert re.search(r"--exit-grace-seconds: expected a (finite )?number of seconds( above 0)?, found " + grace,
                     out.stderr), out.stderr


# ---------------------------------------------------------------- runs through a worker



@pytest.fixture(scope="module")
def worker(deployed, s3_server, procs) -> dict:
    """A process worker for the local pool, with the S3 settings a worker needs
    (here: the moto endpoint's, from tests/s3_fixtures.py)."""
    from tests.s3_fixtures import aws_env

    env = {**deployed, **aws_env()}
    proc, log = start_worker(procs, env, LOCAL_POOL, "local")
    return {**env, "worker_log": str(log)}


def run_deployment(env: dict, *params: str, timeout: float = 420):
    """`prefect deployment run train-cifar/local --watch -p ...`; returns (flow run, CLI output)."""
    args = ["deployment", "run", "train-cifar/local", "--watch"]
    for p in params:
        args += ["-p", p]
    try:
        r = cli(env, *args, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as e:
        log = Path(env["worker_log"]).read_text()[-4000:]
        raise AssertionError(f"the run did not finish in {timeout}s; worker log:\n{log}") from e
    out = r.stdout + r.stderr
    m = re.search(r"UUID:\s*([0-9a-f-]{36})", out)
    assert m, f"no flow run id in the CLI output:\n{out[-4000:]}"
    with client(env) as c:
        return c.read_flow_run(uuid.UUID(m.group(1))), out


@pytest.fixture(scope="module")
def failure_webhook(deployed):
    """The automation of deployments/notify-on-failure.yaml, sending to loopback."""
    with notification_webhook(deployed) as received:
        yield received


def test_bad_parameter_fails_the_run_naming_it(worker, failure_webhook):
    """A value out of the schema's bounds (from RunParams) is refused by the server before
    any run exists; one only the flow can check (device's form) fails the run, naming it."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId

    refused = cli(worker, "deployment", "run", "train-cifar/local", "-p", "epochs=0", check=False)
    said = " ".join((refused.stdout + refused.stderr).split())  # the console wraps long lines
    assert refused.returncode != 0, said
    assert "Validation failed for field 'epochs'" in said and "less than the minimum of 1" in said, said
    assert "UUID:" not in said  # no flow run was created

    run, out = run_deployment(worker, "device=tpu")
    assert run.state.is_failed(), f"{run.state!r}\n{out[-3000:]}"  # Failed, not Crashed
    assert "device" in run.state.message
    settled([run.id])  # its last log lines are sent as its process exits
    with client(worker) as c:
        logs = c.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])))
        task_runs = c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))
    assert any("device: expected auto, cpu, cuda or cuda:N, found 'tpu'" in log.message for log in logs)
    assert task_runs == []  # nothing trained

    # the failure automation told someone, with the reason
    deadline = time.monotonic() + 60
    while not failure_webhook and time.monotonic() < deadline:
        time.sleep(1)
    assert failure_webhook, "the failure automation sent nothing within 60s"
    note = failure_webhook[0]
    assert run.name in note["subject"] and "Failed" in note["subject"]
    assert "device" in note["body"]


@pytest.fixture(scope="module")
def trained(worker, s3_server):
    """A small synthetic run of train-cifar/local through the worker, to an s3:// store."""
    from tests.s3_fixtures import aws_client

    s3_server.ensure_running()
    s3_bucket = f"test-{uuid.uuid4().hex[:12]}"
    aws_client("s3").create_bucket(Bucket=s3_bucket)
    run, out = run_deployment(
        worker, "dataset=synthetic", "synthetic_train=600", "synthetic_test=200", "epochs=2",
        'variants=["none","flip"]', f"store=s3://{s3_bucket}/runs")
    return run, out, s3_bucket


def test_local_deployment_trains_to_s3(worker, trained):
    import boto3

    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter, FlowRunFilterId

    run, out, s3_bucket = trained
    assert run.state.is_completed(), f"{run.state!r}\n{out[-4000:]}"
    assert run.parameters["epochs"] == 2 and run.parameters["variants"] == ["none", "flip"]

    def recorded():
        with client(worker) as c:
            return (c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id]))),
                    c.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id]))))

    # task run states reach the server as events, after the run's own final state
    task_runs, artifacts = eventually(recorded, lambda got: sum(t.name.startswith("train-") for t in got[0]) >= 2
                                      and all(t.state.is_completed() for t in got[0]))
    trained = sorted(t.name for t in task_runs if t.name.startswith("train-"))
    assert trained == ["train-flip", "train-none"], [t.name for t in task_runs]
    assert all(t.state.is_completed() for t in task_runs)
    kinds = {a.key: a.type for a in artifacts if a.key}
    assert kinds.get("progress-none") == "progress" and kinds.get("progress-flip") == "progress"
    assert kinds.get("variant-comparison") == "table"
    assert kinds.get("report") == "markdown"

    s3 = boto3.client("s3")  # the moto endpoint, through the environment like the worker
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=s3_bucket)
            for o in page.get("Contents", [])]
    manifests = [k for k in keys if re.fullmatch(r"runs/runs/[^/]+/manifest\.json", k)]
    assert len(manifests) == 1, keys
    run_prefix = manifests[0].removesuffix("manifest.json")
    assert f"{run_prefix}model/weights.safetensors" in keys
    body = s3.get_object(Bucket=s3_bucket, Key=manifests[0])["Body"].read()
    manifest = json.loads(body)
    assert manifest["flow_run_id"] == str(run.id)
    assert [v["name"] for v in manifest["variants"]] == ["none", "flip"]


# ---------------------------------------------------------------- the UI, in a real browser


def test_the_ui_shows_the_run(trained, worker, tmp_path):
    """The flow run page lists one task run per variant and their epoch logs; the
    comparison table and report are there as artifacts."""
    import shutil

    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    assert exe, "the UI test needs Chromium: apt-get install chromium (make test installs it: make browser)"
    run, _, _ = trained
    ui = worker["PREFECT_API_URL"].removesuffix("/api")
    epoch_line = r"{} epoch 2/2 train_loss [0-9.]+ val_loss [0-9.]+ val_acc [0-9.]+"
    # the UI renders after its API calls, the run's name and logs last on a busy machine:
    # each page is read once all it is checked for is there
    with Page(f"{ui}/runs/flow-run/{run.id}", tmp_path / "profile") as browser:
        page = browser.wait_for_text(run.name, "Completed", "train-none", "train-flip",
                                     patterns=tuple(epoch_line.format(v) for v in ("none", "flip")))
        browser.screenshot(tmp_path / "run.png")
    assert run.name in page and "Completed" in page
    for variant in ("none", "flip"):
        assert f"train-{variant}" in page
        assert re.search(epoch_line.format(variant), page), page[-3000:]
    assert (tmp_path / "run.png").stat().st_size > 10_000  # a rendered page, not a blank one
    for key in ("variant-comparison", "report", "progress-none", "progress-flip"):
        with Page(f"{ui}/artifacts/key/{key}", tmp_path / "profile") as browser:
            art = browser.wait_for_text(f"Artifact: {key}", run.name)
        assert f"Artifact: {key}" in art and run.name in art, art[-2000:]
