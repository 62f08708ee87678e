"""Training one repeat of one variant of a run: the unit of work, checkpointed to the store every epoch.

`train_unit` is the same whether it runs in a lane of the train-cifar flow (the
`train_variant` task below) or in a flow run of its own on another machine
(flows/train_variant.py). Everything it needs to restart is in the store, so any
machine can pick it up: a unit whose result record (`metrics.json`) is stored is not
trained again, an unfinished one resumes from its checkpoint, and a lease makes
sure that one writer at a time trains it.

A store outage costs no work: each epoch's checkpoint and history go up in the
background (store/uploader.py) and training goes on while the store is away; the
variant fails only when the store has been unreachable for longer than
`store_outage_minutes`. Its result record is written only once every upload before
it has landed, so a stored `metrics.json` never sits beside a stale checkpoint.
"""
from __future__ import annotations

import sys
from typing import Callable

import pandas as pd
import torch
from prefect import task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE
from prefect.states import Cancelled
from safetensors.torch import save_file

from cnn.checkpoint import read_history
from cnn.train import CHECKPOINT, STOP, Stopped, TrainConfig, train
from store import open_store
from store.files import publishing, write_durably
from store.lease import Lease
from store.uploader import Uploader
from tasks.cache import drop_local_copies
from tasks.common import Unit, current_owner, flow_run_is_over, local_run_dir
from tasks.data import load_dataset
from tasks.live import show_curves
from tasks.results import METRICS, VariantResult

LEASE = "lease.json"
PREDICTIONS = "val_predictions.safetensors"  # tensor "predicted": (N_val,) uint8, the best epoch's classes


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


def train_unit(cfg: TrainConfig, dataset: dict, split_seed: int, subset: int | None,
               run_id: str, store_uri: str, device: str, store_outage_minutes: float | None = None,
               repeated: bool = False) -> VariantResult:
    """Train `cfg.variant` with `cfg.seed` in run `run_id` (or return its stored result) on
    `dataset` (fetch_dataset's reference: key, md5 and the prepared copy's sha256);
    resume from its checkpoint in the store if there is one. `repeated`: the run trains
    several seeds of each variant, so this one's files go to variants/<variant>/seed-<seed>/.
    Store outages up to `store_outage_minutes` are waited out (None: none is)."""
    store = open_store(store_uri, outage_minutes=store_outage_minutes or 0)  # a PatientStore
    unit = Unit(cfg.variant, cfg.seed, repeated)
    done = VariantResult.read(store, run_id, unit)
    if done is not None:
        print(f"{unit.label}: already trained ({done.status}, {store.uri_for(unit.key(run_id, METRICS))}); not again")
        return done
    owner = current_owner()
    # the lease renews itself (and is renewed before each upload) on the store that fails
    # fast: its callers try again; only the claim waits out an outage
    with Lease(store.inner, unit.key(run_id, LEASE), owner, owner_is_gone=flow_run_is_over,
               outage=store.outage) as lease:
        out = _train_leased(cfg, unit, store, lease, dataset, split_seed, subset, run_id, device,
                            owner)
    # everything it wrote is in the store now, its SHA-256 checked there
    drop_local_copies(store, run_id, "variants", *unit.folder.split("/"))
    return out


def _train_leased(cfg, unit: Unit, store, lease: Lease, dataset, split_seed, subset, run_id,
                  device, owner) -> VariantResult:
    v = unit.label
    workdir = local_run_dir(run_id, "variants", *unit.folder.split("/"))
    workdir.mkdir(parents=True, exist_ok=True)
    ckpt_key = unit.key(run_id, CHECKPOINT)
    if store.exists(ckpt_key):
        # the store's checkpoint wins over a local one: another machine may have gone on since
        store.get_file(ckpt_key, workdir / CHECKPOINT)
        print(f"{v}: resuming from {store.uri_for(ckpt_key)}")

    data = load_dataset(store, dataset, split_seed, subset)  # checked against the run's SHA-256 of it
    progress_id = create_progress_artifact(0.0, key=f"progress-{v}", description=f"{v}: epochs done of at most {cfg.epochs}")
    history_csv = workdir / "history.csv"
    history_key = unit.key(run_id, "history.csv")
    # uploads go to the store that fails fast: the uploader does its own waiting, in the
    # background; the lease is renewed before each (LeaseLost: this writer stops)
    with Uploader(store.inner, store.outage, workdir / ".uploading", before=lease.renew) as uploader:
        result, artifacts = _train_epochs(cfg, unit, data, device, workdir, uploader, progress_id, history_csv,
                                          # the checkpoint first: the history never claims an epoch it lacks
                                          {ckpt_key: workdir / CHECKPOINT, history_key: history_csv})
    weights_key = predictions_key = None
    if result["best_state"] is not None:
        with publishing(workdir / "best.safetensors") as tmp:
            save_file({k: t.contiguous() for k, t in result["best_state"].items()}, str(tmp))
        weights_key = unit.key(run_id, "best.safetensors")
        artifacts[f"{unit.folder}/best.safetensors"] = store.put_file(weights_key, workdir / "best.safetensors")
    if result["best_predictions"] is not None:
        with publishing(workdir / PREDICTIONS) as tmp:
            save_file({"predicted": result["best_predictions"].contiguous()}, str(tmp))
        predictions_key = unit.key(run_id, PREDICTIONS)
        artifacts[f"{unit.folder}/{PREDICTIONS}"] = store.put_file(predictions_key, workdir / PREDICTIONS)
    out = VariantResult(
        name=cfg.variant, status=result["status"], epochs_run=result["epochs_run"], best_epoch=result["best_epoch"],
        val_loss=result["val_loss"], val_accuracy=result["val_accuracy"], seconds=result["seconds"], device=device_name(device),
        error=result["error"], weights_key=weights_key, config=cfg.__dict__, artifacts=artifacts,
        flow_run_id=owner, seed=cfg.seed, predictions_key=predictions_key)
    write_durably(workdir / METRICS, out.to_json().encode())
    store.outage.call(lease.renew)  # LeaseLost if another writer took over meanwhile
    out.artifacts[f"{unit.folder}/{METRICS}"] = store.put_file(unit.key(run_id, METRICS), workdir / METRICS)
    return out


def _train_epochs(cfg, unit: Unit, data, device, workdir, uploader: Uploader, progress_id, history_csv,
                  files: dict) -> tuple[dict, dict[str, dict]]:
    """Train, handing each epoch's checkpoint and history (`files`: key -> local path) to
    the uploader; (the training result, the stored files' records once all have landed)."""
    v = unit.label
    earlier: list[dict] = []  # epochs trained before a resume, so the CSV stays whole
    if (workdir / CHECKPOINT).exists():
        earlier = read_history(workdir / CHECKPOINT)  # the JSON part alone: nothing unpickled
    trained: list[dict] = []  # epochs trained by this call, each uploaded with its checkpoint

    def upload(history: list[dict]) -> None:
        pd.DataFrame(history).to_csv(history_csv, index=False)  # the local copy first: it is the truth
        uploader.submit(files)  # raises if the store was gone for longer than the window, or the lease lost

    def on_epoch(row: dict, ckpt_path) -> None:
        print(_fmt(row, v, cfg.epochs, len(data.train_y)))
        trained.append(row)
        upload(earlier + trained)
        update_progress_artifact(progress_id, 100.0 * row["epoch"] / cfg.epochs)
        show_curves(v, earlier + trained, cfg.epochs)  # the UI's picture, redrawn every 30 s at most

    result = train(cfg, data, torch.device(device), workdir, on_epoch=on_epoch,
                   on_progress=terminal_progress(v, cfg.epochs, cfg.batch_size, len(data.train_y)))
    update_progress_artifact(progress_id, 100.0, description=f"{v}: {result['status']} after {result['epochs_run']} epochs")
    show_curves(v, result["history"], cfg.epochs, status=result["status"])
    # every epoch uploaded itself; only a divergence (its checkpoint is saved after the
    # last good epoch) or a resume with nothing left to train leaves the store behind
    if (result["status"] == "diverged" or not trained) and (workdir / CHECKPOINT).exists():
        upload(result["history"])
    uploader.flush()  # within the outage window, before anything claims the variant is done
    names = {key: f"{unit.folder}/{path.name}" for key, path in files.items()}
    return result, {names[key]: rec for key, rec in uploader.uploaded.items()}


# never served from cache: a run always trains; resuming is the checkpoint's job
@task(name="train-variant", cache_policy=NO_CACHE, task_run_name="train-{label}")
def train_variant(cfg: TrainConfig, dataset: dict, split_seed: int, subset: int | None,
                  run_id: str, store_uri: str, device: str, store_outage_minutes: float | None = None,
                  repeated: bool = False, label: str = "") -> VariantResult:
    """Train one repeat of one variant in this process; resume from its checkpoint in the store if one exists."""
    # the run is stopping (Ctrl-C at the command line): start nothing; stop what trains at
    # its next batch, its last finished epoch stored for a resume. Cancelled, not failed.
    if STOP.is_set():
        return Cancelled(message="not started: the run is stopping")
    try:
        return train_unit(cfg, dataset, split_seed, subset, run_id, store_uri, device,
                          store_outage_minutes, repeated)
    except Stopped as e:
        return Cancelled(message=f"{e}; the last finished epoch is kept")
