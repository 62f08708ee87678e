"""Training one unit (one repeat of one variant), checkpointed to the store every epoch.

Everything a restart needs is in the store, so any machine can pick a unit up: a
stored `metrics.json` means done, otherwise it resumes from the newest checkpoint.
A lease fences writers: files go up as objects of the writer's generation and become
current only through the lease, so a writer that lost it changes nothing current.
Uploads run in the background through outages; `metrics.json` goes up last, only
after every earlier upload landed, so it never sits beside a stale checkpoint.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from typing import Callable

import pandas as pd
import torch
from prefect import task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE
from prefect.states import Cancelled
from safetensors.torch import save_file

from cnn.checkpoint import CHECKPOINT, read_history, read_progress
from cnn.config import TrainConfig
from cnn.train import STOP, Stopped, train
from store import MAX_MODEL_BYTES
from store.files import publishing, write_durably
from store.lease import Lease, committed
from store.uploader import Uploader
from run.cache import drop_local_copies, local_run_dir
from run.context import RunContext
from run.budget import Budget
from run.layout import BEST_WEIGHTS, HISTORY, LEASE, PAUSED, UNIT_RESULT, VAL_PREDICTIONS, Unit, stored_key
from run.owner import current_owner, flow_run_is_over
from tasks.data import load_dataset
from run.live import show_curves
from run.records import UnitResult



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
    import platform

    if device.startswith("cuda"):
        return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def train_unit(ctx: RunContext, cfg: TrainConfig, device: str, repeated: bool = False,
               until: int | None = None) -> UnitResult:
    """Train one unit, or return its stored result. `repeated`: the run trains several
    seeds per variant, so files go to variants/<variant>/seed-<seed>/. `until`: a halving
    rung; the unit pauses after that epoch (its record is PAUSED, not UNIT_RESULT)."""
    store, run_id = ctx.store, ctx.run_id
    unit = Unit(cfg.variant, cfg.seed, repeated)
    facts = unit_facts(ctx, cfg)
    refuse_other_parameters(ctx, unit, facts)
    done = UnitResult.read(store, run_id, unit)
    if done is not None:
        where = store.uri_for(stored_key(store, run_id, unit, UNIT_RESULT))
        print(f"{unit.label}: already trained ({done.status}, {where}); not again")
        return done
    paused = None if until is None else UnitResult.read(store, run_id, unit, PAUSED)
    if paused is not None and paused.epochs_run >= until:
        print(f"{unit.label}: already at epoch {paused.epochs_run} (rung at {until}); not again")
        return paused
    owner = current_owner()
    # the lease renews itself (and is renewed before each upload) on the store that fails
    # fast: its callers try again; only the claim waits out an outage
    with Lease(store.inner, unit.key(run_id, LEASE), owner, owner_is_gone=flow_run_is_over,
               outage=store.outage) as lease:
        out = _train_leased(ctx, cfg, unit, lease, device, owner, facts, until)
    if out.status != "paused":  # a paused unit resumes from its local checkpoint, if it stays here
        drop_local_copies(store, run_id, "variants", *unit.folder.split("/"))
    return out


_NOT_THE_MODEL = {"compile"}


def unit_facts(ctx: RunContext, cfg: TrainConfig) -> dict:
    """What a unit's model depends on, recorded in its lease with its files."""
    p = ctx.params
    facts = {"config": dataclasses.asdict(cfg), "dataset_md5": ctx.dataset.md5, "split_seed": p.split_seed,
             "subset": p.subset}
    if ctx.dataset.purged:  # the validation split it selected its best epoch on (purge_test_duplicates)
        facts["purged"] = ctx.dataset.purged_tag
    return facts


def refuse_other_parameters(ctx: RunContext, unit: Unit, facts: dict) -> None:
    """Refuse a reused run id whose stored unit has other parameters: it would otherwise
    return, or resume, another model."""
    store, run_id = ctx.store, ctx.run_id
    stored = (committed(store, unit.key(run_id, LEASE)) or {}).get("unit")
    if not isinstance(stored, dict):
        return
    diffs = [f"{k} {stored[k]!r} (stored) vs {facts[k]!r} (asked)" for k in facts
             if k != "config" and k in stored and stored[k] != facts[k]]
    if stored.get("purged") != facts.get("purged"):  # absent: nothing purged, on either side
        diffs.append(f"purged hold-out {stored.get('purged')!r} (stored) vs {facts.get('purged')!r} (asked)")
    config = stored.get("config") if isinstance(stored.get("config"), dict) else {}
    diffs += [f"{k} {config.get(k)!r} (stored) vs {v!r} (asked)" for k, v in facts["config"].items()
              if k not in _NOT_THE_MODEL and k in config and config[k] != v]
    if diffs:
        raise ValueError(f"run {run_id}: unit {unit.label} in the store ({store.uri_for(unit.key(run_id, LEASE))}) "
                         f"was trained with other parameters: {'; '.join(diffs)}. A run id names one set of "
                         "parameters: start a new run (another --run-id), or repeat the parameters it was started with")


def _checkpoint_epochs(path, cfg: TrainConfig) -> int | None:
    try:
        config, epochs = read_progress(path)
    except ValueError as e:
        print(f"warning: ignoring {path}: {e}")
        return None
    if config != dataclasses.asdict(cfg):
        print(f"warning: ignoring {path}: written with another config ({config}), not this unit's")
        return None
    return epochs


def _resume_from(store, run_id: str, unit: Unit, cfg: TrainConfig, workdir) -> None:
    """Leave in `workdir` the newest checkpoint, this machine's or the store's (the
    store's on a tie: it is the current one)."""
    local = workdir / CHECKPOINT
    ours = _checkpoint_epochs(local, cfg) if local.exists() else None
    if local.exists() and ours is None:
        # not resumed from; kept to look at until the unit is done
        local.replace(local.with_name(f"{CHECKPOINT}.ignored"))
    key = stored_key(store, run_id, unit, CHECKPOINT)
    theirs = None
    if key is not None:
        fetched = store.get_file(key, workdir / f".{CHECKPOINT}.store", limit=MAX_MODEL_BYTES)
        try:
            config, theirs = read_progress(fetched)
        except ValueError as e:
            fetched.unlink()
            raise ValueError(f"{store.uri_for(key)}: {e}") from None
        if config != dataclasses.asdict(cfg):
            fetched.unlink()
            raise ValueError(f"{store.uri_for(key)}: checkpoint was written with a different config; "
                             f"expected {dataclasses.asdict(cfg)}, found {config}")
        if ours is None or theirs >= ours:
            os.replace(fetched, local)
            print(f"{unit.label}: resuming from {store.uri_for(key)} (epoch {theirs})")
            return
        fetched.unlink()
    if ours is not None:
        behind = "has none" if theirs is None else f"is at epoch {theirs}"
        print(f"{unit.label}: resuming from {local} (epoch {ours}); the store {behind}")


def _train_leased(ctx: RunContext, cfg: TrainConfig, unit: Unit, lease: Lease, device: str, owner,
                  facts: dict, until: int | None = None) -> UnitResult:
    store, run_id, v = ctx.store, ctx.run_id, unit.label
    workdir = local_run_dir(run_id, "variants", *unit.folder.split("/"))
    workdir.mkdir(parents=True, exist_ok=True)
    _resume_from(store, run_id, unit, cfg, workdir)

    data = load_dataset(store, ctx.dataset, ctx.params.split_seed, ctx.params.subset)
    progress_id = create_progress_artifact(0.0, key=f"progress-{v}", description=f"{v}: epochs done of at most {cfg.epochs}")
    history_csv = workdir / HISTORY

    def publish(files: dict) -> dict[str, dict]:
        return lease.publish(files, unit=facts)

    # uploads go to the store that fails fast: the uploader does its own waiting, in the background
    budget = None if ctx.params.budget_gpu_hours is None else Budget(store, run_id, ctx.params.budget_gpu_hours * 3600)
    with Uploader(lease.store, store.outage, workdir / ".uploading", send=publish) as uploader:
        result, artifacts = _train_epochs(cfg, unit, data, device, workdir, uploader, progress_id, history_csv,
                                          # the checkpoint first: the history never claims an epoch it lacks
                                          {CHECKPOINT: workdir / CHECKPOINT, HISTORY: history_csv},
                                          until=until, budget=budget)
    final: dict = {}
    predicted = result["best_predictions"]
    for name, tensors in {BEST_WEIGHTS: result["best_state"],
                          VAL_PREDICTIONS: None if predicted is None else {"predicted": predicted}}.items():
        if tensors is not None:
            with publishing(workdir / name) as tmp:
                save_file({k: t.contiguous() for k, t in tensors.items()}, str(tmp))
            final[name] = workdir / name
    stored = store.outage.call(publish, final) if final else {}
    artifacts.update({f"{unit.folder}/{name}": _artifact(rec) for name, rec in stored.items()})
    out = UnitResult(
        name=cfg.variant, status=result["status"], epochs_run=result["epochs_run"], best_epoch=result["best_epoch"],
        val_loss=result["val_loss"], val_accuracy=result["val_accuracy"], seconds=result["seconds"], device=device_name(device),
        error=result["error"], weights_key=stored.get(BEST_WEIGHTS, {}).get("key"), config=cfg.__dict__,
        artifacts=artifacts, flow_run_id=owner, seed=cfg.seed, predictions_key=stored.get(VAL_PREDICTIONS, {}).get("key"))
    # the record last: once it is current, the unit is done (or, paused at a rung, known to be there)
    name = PAUSED if out.status == "paused" else UNIT_RESULT
    write_durably(workdir / name, out.to_json().encode())
    record = store.outage.call(publish, {name: workdir / name})[name]
    out.artifacts[f"{unit.folder}/{name}"] = _artifact(record)
    return out


def _artifact(rec: dict) -> dict:
    return {k: rec[k] for k in ("uri", "sha256", "bytes")}


def _train_epochs(cfg, unit: Unit, data, device, workdir, uploader: Uploader, progress_id, history_csv,
                  files: dict, until: int | None = None, budget: Budget | None = None) -> tuple[dict, dict[str, dict]]:
    """Train, handing each epoch's `files` to the uploader; (result, stored artifacts)."""
    v = unit.label
    earlier: list[dict] = []  # epochs before a resume, so the CSV stays whole
    if (workdir / CHECKPOINT).exists():
        earlier = read_history(workdir / CHECKPOINT)  # the JSON part alone: nothing unpickled
    trained: list[dict] = []

    def upload(history: list[dict]) -> None:
        pd.DataFrame(history).to_csv(history_csv, index=False)
        uploader.submit(files)  # raises past the outage window, or on a lost lease

    def on_epoch(row: dict, ckpt_path) -> None:
        print(_fmt(row, v, cfg.epochs, len(data.train_y)))
        trained.append(row)
        upload(earlier + trained)
        update_progress_artifact(progress_id, 100.0 * row["epoch"] / cfg.epochs)
        show_curves(v, earlier + trained, cfg.epochs)
        if budget is not None:
            budget.book(v, used(), row["seconds"])

    def used() -> float:
        return sum(r["seconds"] for r in earlier + trained)

    def may_start(epoch: int, last_seconds: float | None) -> bool:
        if budget.may_start(v, used(), last_seconds):
            return True
        print(f"{v}: epoch {epoch} not started: the run's budget of {budget.limit_s:.0f} device seconds would be "
              f"passed ({used():.1f} s used by this unit)")
        return False

    result = train(cfg, data, torch.device(device), workdir, on_epoch=on_epoch,
                   on_progress=terminal_progress(v, cfg.epochs, cfg.batch_size, len(data.train_y)),
                   until=until, may_start=None if budget is None else may_start)
    # a unit paused at a halving rung is not done: its bar stays where it is
    done = 100.0 * result["epochs_run"] / cfg.epochs if result["status"] == "paused" else 100.0
    update_progress_artifact(progress_id, done, description=f"{v}: {result['status']} after {result['epochs_run']} epochs")
    show_curves(v, result["history"], cfg.epochs, status=result["status"])
    # every epoch uploaded itself; only a divergence (its checkpoint is saved after the
    # last good epoch) or a resume with nothing left to train leaves the store behind
    if (result["status"] == "diverged" or not trained) and (workdir / CHECKPOINT).exists():
        upload(result["history"])
    uploader.flush()
    return result, {f"{unit.folder}/{name}": _artifact(rec) for name, rec in uploader.uploaded.items()}


# never served from cache: a run always trains; resuming is the checkpoint's job
@task(name="train-in-lane", cache_policy=NO_CACHE, task_run_name="train-{label}")
def train_in_lane(ctx: RunContext, cfg: TrainConfig, device: str, repeated: bool = False,
                  label: str = "", until: int | None = None) -> UnitResult:
    # Ctrl-C: start nothing; what trains stops at its next batch, its last epoch stored.
    if STOP.is_set():
        return Cancelled(message="not started: the run is stopping")
    try:
        return train_unit(ctx, cfg, device, repeated, until)
    except Stopped as e:
        return Cancelled(message=f"{e}; the last finished epoch is kept")
