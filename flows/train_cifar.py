"""The train-cifar flow and its command line.

    python -m flows.train_cifar --dataset synthetic --variants none,flip,flip-crop --epochs 5

fetch -> train every variant (parallel tasks, one lane per device slot) ->
select by validation -> test the selected model once -> publish.
"""
from __future__ import annotations

import atexit
import gc
import sys

from flows import api

if __name__ == "__main__":
    # registered first, so it runs after every other exit handler: shutdown then skips
    # collecting cycles among the objects of torch, Prefect and pandas (1.1 s here)
    atexit.register(gc.freeze)
# Run as the CLI with no Prefect API configured: the temporary API server boots in
# its own process while this one imports Prefect, torch and the project below (flows/api.py)
_API = api.start() if __name__ == "__main__" and not {"-h", "--help"} & set(sys.argv[1:]) else None

import argparse  # noqa: E402 - after the server start, on purpose
import platform
import subprocess
import typing
from datetime import datetime, timezone
from pathlib import Path

from prefect import allow_failure, flow
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import ValidationError

from flows.params import RunParams, describe_errors
from store import safe_name

D = RunParams()  # the defaults, from the one place they are written


def plan_lanes(variants: list[str], devices: list[str], per_device: int) -> list[tuple[str, list[str]]]:
    """Assign variants to lanes: each lane runs its variants one after another on one
    device, and a device has `per_device` lanes, so it never trains more at once."""
    lanes = [(d, []) for _ in range(per_device) for d in devices][: len(variants)]
    for i, v in enumerate(variants):
        lanes[i % len(lanes)][1].append(v)
    return lanes


def devices_for(device: str) -> list[str]:
    """The devices variants are spread over: every GPU for 'auto'/'cuda', else the one named."""
    import torch

    from cnn.train import pick_device

    dev = pick_device(device)
    if dev.type == "cuda" and dev.index is None:
        return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return [str(dev)]


def git_sha() -> str:
    import os

    if os.environ.get("GIT_SHA"):
        return os.environ["GIT_SHA"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def new_run_id() -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    fid = flow_run.get_id()
    return f"{stamp}-{str(fid)[:8]}" if fid else stamp


def versions() -> dict:
    import prefect
    import torch
    import torchvision

    return {"python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "prefect": prefect.__version__}


def device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


@flow(name="train-cifar", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=16))
def train_cifar(
    dataset: typing.Literal["cifar10", "synthetic"] = D.dataset,
    data_dir: str | None = D.data_dir,
    data_source: str | None = D.data_source,
    data_md5: str | None = D.data_md5,
    synthetic_train: int = D.synthetic_train,
    synthetic_test: int = D.synthetic_test,
    model: str = D.model,
    variants: list[str] = D.variants,
    epochs: int = D.epochs,
    patience: int = D.patience,
    batch_size: int | None = D.batch_size,
    lr: float | None = D.lr,
    subset: int | None = D.subset,
    seed: int = D.seed,
    split_seed: int = D.split_seed,
    select_metric: typing.Literal["val_accuracy", "val_loss"] = D.select_metric,
    store: str = D.store,
    device: str = D.device,
    compile: bool = D.compile,
    precision: typing.Literal["auto", "fp32", "bf16"] = D.precision,
    variants_per_gpu: int = D.variants_per_gpu,
    promote_margin: float = D.promote_margin,
    run_id: str | None = D.run_id,
) -> dict:
    """Train one CNN per augmentation variant, select by validation, test once, publish."""
    from cnn.data import split_sizes
    from cnn.train import make_config, resolve_precision
    from tasks.data import fetch_dataset
    from tasks.publish import publish_run
    from tasks.selection import select_variant
    from tasks.testing import test_model
    from tasks.training import train_variant

    # validate everything before any data is touched; a ValueError fails the run
    try:
        p = RunParams(**{k: v for k, v in locals().items() if k in RunParams.model_fields})
    except ValidationError as e:  # one line per parameter, naming it; the run ends Failed
        raise ValueError(f"invalid parameter(s):\n{describe_errors(e)}") from None
    run_id = safe_name(p.run_id or new_run_id(), "run_id")
    devices = devices_for(p.device)
    store_uri = p.store if p.store.startswith("s3://") else str(Path(p.store).expanduser().resolve())
    cfgs = {v: make_config(p.model, v, epochs=p.epochs, patience=p.patience, seed=p.seed,
                           batch_size=p.batch_size, lr=p.lr, compile=p.compile,
                           precision=resolve_precision(p.precision, devices[0])) for v in p.variants}
    created_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    print(f"run {run_id}: {len(p.variants)} variant(s) of {p.model} on {', '.join(devices)} -> {store_uri}")

    ds = fetch_dataset(p.dataset, p.data_dir, p.data_source, p.data_md5, p.synthetic_train,
                       p.synthetic_test, store_uri)
    train_size = min(ds["train"], p.subset or ds["train"])

    # one lane per device slot; a lane's variants run in turn, lanes run side by side.
    # The CPU gets one lane: each variant already uses every core, and training several
    # at once in threads measured 1-9% slower (benchmarks/README.md, cpu_lanes)
    per_device = 1
    if devices[0].startswith("cuda"):  # as many as asked for, and as fit in the GPU's free memory
        import torch

        from cnn.train import variants_that_fit

        per_device = variants_that_fit(cfgs[p.variants[0]], torch.device(devices[0]), train_size, p.variants_per_gpu)
        if per_device < p.variants_per_gpu:
            print(f"variants_per_gpu {p.variants_per_gpu}: only {per_device} fit in {devices[0]}'s free memory")
    lanes = plan_lanes(p.variants, devices, per_device)
    # a single CPU lane trains in this, the flow's own thread: up to 10% faster than in
    # a task-runner thread (benchmarks/README.md, cpu_lanes); other lanes are submitted
    here = len(lanes) == 1 and not devices[0].startswith("cuda")
    runs = {}
    for dev, names in lanes:
        previous = None
        for v in names:
            args = (cfgs[v], ds, p.split_seed, p.subset, run_id, store_uri, dev)
            wait = [allow_failure(previous)] if previous else None
            previous = runs[v] = (train_variant(*args, wait_for=wait, return_state=True) if here
                                  else train_variant.submit(*args, wait_for=wait))
    results = [variant_result(v, r if here else (r.wait() or r.state)) for v, r in runs.items()]

    selected = select_variant(results, p.select_metric)
    chosen = next(r for r in results if r["name"] == selected)
    test = test_model(cfgs[selected], chosen["weights_key"], ds, p.split_seed, run_id, store_uri, devices[0])

    n_val, n_test = split_sizes(ds["holdout"])
    manifest = {
        "run_id": run_id,
        "created_at": created_at,
        "git_sha": git_sha(),
        "params": p.model_dump(),
        "configs": {v: cfgs[v].__dict__ for v in p.variants},
        "dataset": {"name": ds["name"], "source": ds["source"], "md5": ds["md5"],
                    "sizes": {"train": train_size, "val": n_val, "test": n_test},
                    "split_seed": p.split_seed, "classes": ds["classes"]},
        "selected": selected,
        "versions": versions(),
        "device": device_name(devices[0]),
        "flow_run_id": str(flow_run.get_id()) if flow_run.get_id() else None,
    }
    out = publish_run(manifest, test, results, p.promote_margin, store_uri)
    _summary(results, selected, out)
    return out


def variant_result(name: str, state) -> dict:
    """A finished train-variant's metrics, or a `failed` row saying why (the others go on)."""
    if state.is_completed():
        return state.result()
    try:
        state.result()
        err = f"ended {state.type.value}"
    except Exception as e:  # noqa: BLE001 - any failure of one variant is reported, not raised
        err = f"{type(e).__name__}: {e}"
    print(f"{name}: failed: {err}")
    return {"name": name, "status": "failed", "epochs_run": None, "best_epoch": None, "val_loss": None,
            "val_accuracy": None, "seconds": None, "error": err, "artifacts": {}, "weights_key": None}


def _summary(results: list[dict], selected: str, out: dict) -> None:
    print("variant              status         epochs  best  val_loss  val_acc  seconds")
    for r in results:
        fmt = lambda x, f: "-" if x is None else format(x, f)  # noqa: E731
        print(f"{r['name']:<20} {r['status']:<14} {fmt(r['epochs_run'], 'd'):>6}  {fmt(r['best_epoch'], 'd'):>4}  "
              f"{fmt(r['val_loss'], '.4f'):>8}  {fmt(r['val_accuracy'], '.4f'):>7}  {fmt(r['seconds'], '.1f'):>7}"
              + ("  <- selected" if r["name"] == selected else ""))
    print(f"test accuracy {out['test_accuracy']:.4f}; promoted: {out['promoted']}")


def build_parser() -> argparse.ArgumentParser:
    """Flags mirror RunParams: names, help and defaults come from its fields."""
    ap = argparse.ArgumentParser(prog="python -m flows.train_cifar", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for name, field in RunParams.model_fields.items():
        flag = "--" + name.replace("_", "-")
        default = field.get_default(call_default_factory=True)
        if field.annotation is bool:
            ap.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=field.description)
        elif name == "variants":
            ap.add_argument(flag, default=",".join(default), metavar="A,B,...", help=field.description + " (comma-separated)")
        elif typing.get_origin(field.annotation) is typing.Literal:
            ap.add_argument(flag, choices=typing.get_args(field.annotation), default=default, help=field.description)
        else:
            ap.add_argument(flag, default=default, help=field.description, metavar=name.upper())
    return ap


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit:  # a refused flag: argparse has said which
        api.stop(_API, graceful=False)
        raise
    raw = {k: v for k, v in vars(args).items()}
    try:
        params = RunParams.model_validate(raw, strict=False)
    except ValidationError as e:
        print(f"error: invalid parameter\n{describe_errors(e, flag_style=True)}", file=sys.stderr)
        api.stop(_API, graceful=False)  # it was never used
        return 2
    try:
        api.ready(_API)
        with api.using(_API):
            out = train_cifar(**params.model_dump())
    except Exception as e:  # the flow already logged the traceback; end with the reason
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(out["manifest"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
