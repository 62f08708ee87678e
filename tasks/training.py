"""Training one variant of one run: the unit of work, checkpointed to the store every epoch.

`train_unit` is the same whether it runs in a lane of the train-cifar flow (the
`train_variant` task below) or in a flow run of its own on another machine
(flows/train_variant.py). Everything it needs to restart is in the store, so any
machine can pick it up: a unit whose result record (`metrics.json`) is stored is not
trained again, an unfinished one resumes from its checkpoint, and a lease makes
sure that one writer at a time trains it.
"""
from __future__ import annotations

import json
import sys
from typing import Callable

import pandas as pd
import torch
from prefect import task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE
from safetensors.torch import save_file

from cnn.checkpoint import read_history
from cnn.data import DataError, load_splits
from cnn.train import CHECKPOINT, TrainConfig, train
from store import open_store
from store.lease import Lease
from tasks.common import current_owner, flow_run_is_over, local_run_dir, materialize, variant_key
from tasks.data import PREPARED_FILES
from tasks.results import METRICS, VariantResult

LEASE = "lease.json"


def _fmt(row: dict, variant: str, epochs: int, images: int) -> str:
    return (f"{variant} epoch {row['epoch']}/{epochs} train_loss {row['train_loss']:.3f} "
            f"val_loss {row['val_loss']:.3f} val_acc {row['val_accuracy']:.3f} {row['seconds']:.1f}s "
            f"({images / row['seconds']:.0f} images/s)")


def terminal_progress(variant: str, epochs: int, batch_size: int, images: int,
                      stream=None) -> Callable[[int, int, int, float], None] | None:
    """Lines within an epoch for a person at a terminal (a CPU epoch of CIFAR-10 is a minute
    or more of silence otherwise); None when the output is not a terminal, so that a
    deployment's logs keep one line per epoch."""
    if not (stream or sys.stdout).isatty():
        return None

    def show(epoch: int, step: int, steps: int, images_per_second: float) -> None:
        print(f"{variant} epoch {epoch}/{epochs}: {step * batch_size:,}/{images:,} images, "
              f"{images_per_second:,.0f} images/s")

    return show


def device_name(device: str) -> str:
    """The device as a person would name it: `cuda:0 (NVIDIA H200)`, `cpu (x86_64, 2 threads)`."""
    import platform

    if device.startswith("cuda"):
        return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def train_unit(cfg: TrainConfig, dataset_key: str, dataset_md5: str, split_seed: int, subset: int | None,
               run_id: str, store_uri: str, device: str) -> VariantResult:
    """Train `cfg.variant` of run `run_id` (or return its stored result); resume from
    its checkpoint in the store if there is one."""
    store = open_store(store_uri)
    v = cfg.variant
    done = VariantResult.read(store, run_id, v)
    if done is not None:
        print(f"{v}: already trained ({done.status}, {store.uri_for(variant_key(run_id, v, METRICS))}); not again")
        return done
    owner = current_owner()
    with Lease(store, variant_key(run_id, v, LEASE), owner, owner_is_gone=flow_run_is_over) as lease:
        return _train_leased(cfg, store, lease, dataset_key, dataset_md5, split_seed, subset, run_id, device, owner)


def _train_leased(cfg, store, lease: Lease, dataset_key, dataset_md5, split_seed, subset, run_id, device,
                  owner) -> VariantResult:
    v = cfg.variant
    workdir = local_run_dir(run_id) / "variants" / v
    workdir.mkdir(parents=True, exist_ok=True)
    ckpt_key = variant_key(run_id, v, CHECKPOINT)
    if store.exists(ckpt_key):
        # the store's checkpoint wins over a local one: another machine may have gone on since
        store.get_file(ckpt_key, workdir / CHECKPOINT)
        print(f"{v}: resuming from {store.uri_for(ckpt_key)}")

    prepared = materialize(store, dataset_key, PREPARED_FILES)
    found = json.loads((prepared / "meta.json").read_text()).get("md5")
    if found != dataset_md5:
        raise DataError(f"{store.uri_for(dataset_key)}: expected the dataset with MD5 {dataset_md5}, found {found}")
    data = load_splits(prepared, split_seed, subset)
    progress_id = create_progress_artifact(0.0, key=f"progress-{v}", description=f"{v}: epochs done of at most {cfg.epochs}")
    history_csv = workdir / "history.csv"
    artifacts: dict[str, dict] = {}

    def upload(history: list[dict]) -> None:
        """The checkpoint and the whole history so far, to the store, while the lease is ours."""
        lease.renew()  # LeaseLost if another writer took this unit over: write nothing more
        pd.DataFrame(history).to_csv(history_csv, index=False)
        artifacts[f"{v}/history.csv"] = store.put_file(variant_key(run_id, v, "history.csv"), history_csv)
        artifacts[f"{v}/{CHECKPOINT}"] = store.put_file(ckpt_key, workdir / CHECKPOINT)

    earlier: list[dict] = []  # epochs trained before a resume, so the CSV stays whole
    if (workdir / CHECKPOINT).exists():
        earlier = read_history(workdir / CHECKPOINT)  # the JSON part alone: nothing unpickled
    trained: list[dict] = []  # epochs trained by this call, each uploaded with its checkpoint

    def on_epoch(row: dict, ckpt_path) -> None:
        print(_fmt(row, v, cfg.epochs, len(data.train_y)))
        trained.append(row)
        upload(earlier + trained)
        update_progress_artifact(progress_id, 100.0 * row["epoch"] / cfg.epochs)

    result = train(cfg, data, torch.device(device), workdir, on_epoch=on_epoch,
                   on_progress=terminal_progress(v, cfg.epochs, cfg.batch_size, len(data.train_y)))
    update_progress_artifact(progress_id, 100.0, description=f"{v}: {result['status']} after {result['epochs_run']} epochs")
    # every epoch uploaded itself; only a divergence (its checkpoint is saved after the
    # last good epoch) or a resume with nothing left to train leaves the store behind
    if (result["status"] == "diverged" or not trained) and (workdir / CHECKPOINT).exists():
        upload(result["history"])
    weights_key = None
    if result["best_state"] is not None:
        save_file({k: t.contiguous() for k, t in result["best_state"].items()}, str(workdir / "best.safetensors"))
        weights_key = variant_key(run_id, v, "best.safetensors")
        artifacts[f"{v}/best.safetensors"] = store.put_file(weights_key, workdir / "best.safetensors")
    out = VariantResult(
        name=v, status=result["status"], epochs_run=result["epochs_run"], best_epoch=result["best_epoch"],
        val_loss=result["val_loss"], val_accuracy=result["val_accuracy"], seconds=result["seconds"], device=device_name(device),
        error=result["error"], weights_key=weights_key, config=cfg.__dict__, artifacts=artifacts,
        flow_run_id=owner)
    (workdir / METRICS).write_text(out.to_json())
    lease.renew()
    out.artifacts[f"{v}/{METRICS}"] = store.put_file(variant_key(run_id, v, METRICS), workdir / METRICS)
    return out


# never served from cache: a run always trains; resuming is the checkpoint's job
@task(name="train-variant", cache_policy=NO_CACHE, task_run_name="train-{cfg.variant}")
def train_variant(cfg: TrainConfig, dataset: dict, split_seed: int, subset: int | None,
                  run_id: str, store_uri: str, device: str) -> VariantResult:
    """Train one variant in this process; resume from its checkpoint in the store if one exists."""
    return train_unit(cfg, dataset["key"], dataset["md5"], split_seed, subset, run_id, store_uri, device)
