"""train_variant: one augmentation variant, checkpointed to the store every epoch."""
from __future__ import annotations

import json

import pandas as pd
import torch
from prefect import task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE
from safetensors.torch import save_file

from cnn.checkpoint import read_history
from cnn.data import load_splits
from cnn.train import CHECKPOINT, TrainConfig, train
from store import open_store
from tasks.common import local_run_dir, materialize, variant_key
from tasks.data import PREPARED_FILES


def _fmt(row: dict, variant: str, epochs: int) -> str:
    return (f"{variant} epoch {row['epoch']}/{epochs} train_loss {row['train_loss']:.3f} "
            f"val_loss {row['val_loss']:.3f} val_acc {row['val_accuracy']:.3f} {row['seconds']:.1f}s")


# never served from cache: a run always trains; resuming is the checkpoint's job
@task(name="train-variant", cache_policy=NO_CACHE, task_run_name="train-{cfg.variant}")
def train_variant(cfg: TrainConfig, dataset: dict, split_seed: int, subset: int | None,
                  run_id: str, store_uri: str, device: str) -> dict:
    """Train one variant; resume from its checkpoint in the store if one exists."""
    store = open_store(store_uri)
    v = cfg.variant
    workdir = local_run_dir(run_id) / "variants" / v
    workdir.mkdir(parents=True, exist_ok=True)
    ckpt_key = variant_key(run_id, v, CHECKPOINT)
    if not (workdir / CHECKPOINT).exists() and store.exists(ckpt_key):
        store.get_file(ckpt_key, workdir / CHECKPOINT)  # a retry on another machine resumes here
        print(f"{v}: resuming from {store.uri_for(ckpt_key)}")

    data = load_splits(materialize(store, dataset["key"], PREPARED_FILES), split_seed, subset)
    progress_id = create_progress_artifact(0.0, key=f"progress-{v}", description=f"{v}: epochs done of at most {cfg.epochs}")
    history_csv = workdir / "history.csv"
    artifacts: dict[str, dict] = {}

    def upload(history: list[dict]) -> None:
        """The checkpoint and the whole history so far, to the store."""
        pd.DataFrame(history).to_csv(history_csv, index=False)
        artifacts[f"{v}/history.csv"] = store.put_file(variant_key(run_id, v, "history.csv"), history_csv)
        artifacts[f"{v}/{CHECKPOINT}"] = store.put_file(ckpt_key, workdir / CHECKPOINT)

    earlier: list[dict] = []  # epochs trained before a resume, so the CSV stays whole
    if (workdir / CHECKPOINT).exists():
        earlier = read_history(workdir / CHECKPOINT)  # the JSON part alone: nothing unpickled
    trained: list[dict] = []  # epochs trained by this call, each uploaded with its checkpoint

    def on_epoch(row: dict, ckpt_path) -> None:
        print(_fmt(row, v, cfg.epochs))
        trained.append(row)
        upload(earlier + trained)
        update_progress_artifact(progress_id, 100.0 * row["epoch"] / cfg.epochs)

    result = train(cfg, data, torch.device(device), workdir, on_epoch=on_epoch)
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
    metrics = {
        "name": v, "status": result["status"], "epochs_run": result["epochs_run"],
        "best_epoch": result["best_epoch"], "val_loss": result["val_loss"],
        "val_accuracy": result["val_accuracy"], "seconds": result["seconds"], "device": device,
        "error": result["error"],
    }
    (workdir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    artifacts[f"{v}/metrics.json"] = store.put_file(variant_key(run_id, v, "metrics.json"), workdir / "metrics.json")
    return {**metrics, "weights_key": weights_key, "artifacts": artifacts}
