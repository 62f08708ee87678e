"""test_model: the only task that reads the test split, once, for the selected model and
the champion it faces (on the same images: the promotion is decided on their paired
difference, cnn.stats.promotion)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from prefect import task
from prefect.cache_policies import NO_CACHE
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from cnn.data import Splits
from cnn.evaluate import evaluate
from cnn.export import export_portable
from cnn.models import build_model
from cnn.stats import promotion
from cnn.config import TrainConfig, resolve_precision
from store import MAX_DOCUMENT_BYTES, MAX_MODEL_BYTES, Store, StoreError, open_store, safe_name
from registry import champions
from store.files import publishing, write_durably
from run.cache import local_run_dir
from run.layout import run_key
from tasks.data import load_dataset
from run.report import plot_confusion
from tasks.scoring import right

PORTABLE = "model.pt2"  # torch.export program: torch.export.load(path).module()
PREDICTIONS = "test_predictions.safetensors"  # tensor "predicted": (N_test,) uint8, the selected model's classes


def champion_model(store: Store, record: dict, num_classes: int, device: str, workdir: Path) -> tuple[nn.Module, TrainConfig]:
    """The champion's model, rebuilt from its run's model/config.json and weights.safetensors
    (nothing unpickled), on `device`; and its config."""
    workdir.mkdir(parents=True, exist_ok=True)
    # a few kB; bounded before it is downloaded (TooLarge: the champion is not loaded, naming it)
    cfg = TrainConfig(**json.loads(store.get_file(run_key(record["run_id"], "model", "config.json"),
                                                  workdir / "config.json", limit=MAX_DOCUMENT_BYTES).read_bytes()))
    model = build_model(cfg.model, num_classes=num_classes)
    model.load_state_dict(load_file(str(store.get_file(run_key(record["run_id"], "model", "weights.safetensors"),
                                                       workdir / "weights.safetensors",
                                                       limit=MAX_MODEL_BYTES))))
    return model.to(torch.device(device), memory_format=torch.channels_last), cfg


def face_champion(store: Store, current: dict, correct_new: np.ndarray, data: Splits, device: str, workdir: Path,
                  confidence: float, margin: float, amp: bool = False) -> dict:
    """The manifest's `test.champion_comparison`: the new model minus the champion `current`
    on the same test images, evaluated as the new model was (same device, precision,
    normalisation and batches), and whether that promotes it (`promote`, `reason`)."""
    who = safe_name(current["run_id"], "champion run id")  # read from the store: it names a local folder
    try:
        model, cfg = champion_model(store, current, len(data.classes), device, workdir / "champion" / who)
    except (FileNotFoundError, LookupError, ValueError, TypeError, RuntimeError, SafetensorError) as e:
        if isinstance(e, StoreError):
            raise  # the store, not the champion: Prefect's retry or the outage window decides
        return {"champion_run_id": who, "difference": None, "ci": None, "method": None, "promote": False,
                "reason": f"champion {who}'s model could not be loaded ({type(e).__name__}: {e}); not promoted"}
    # outside the try: a device fault (out of memory, a CUDA error) fails the task, not the champion
    old = evaluate(model, data.test_x, data.test_y, torch.device(device), tta=cfg.tta, amp=amp)["predicted"]
    d = promotion(correct_new, (old.long() == data.test_y).numpy(), confidence, margin, champion_run=who)
    print(f"against champion {who}: {d.reason}")
    return {"champion_run_id": who, "difference": d.difference, "ci": list(d.ci), "method": d.method,
            "promote": d.promote, "reason": d.reason}


def face_champion_again(store: Store, current: dict, run_id: str, dataset: dict, split_seed: int,
                        confidence: float, margin: float) -> dict:
    """face_champion for a champion that changed after the test (publish's race): the new
    model's stored test predictions against `current`'s model, on the CPU."""
    data = load_dataset(store, dataset, split_seed)
    raw = store.read_versioned(run_key(run_id, "model", PREDICTIONS))[0]
    if raw is None:
        return {"champion_run_id": current["run_id"], "difference": None, "ci": None, "method": None,
                "promote": False, "reason": f"champion {current['run_id']} appeared after the test and "
                f"{store.uri_for(run_key(run_id, 'model', PREDICTIONS))} is missing; not promoted"}
    correct = right(raw, store.uri_for(run_key(run_id, "model", PREDICTIONS)), data.test_y.numpy())
    return face_champion(store, current, correct, data, "cpu", local_run_dir(run_id), confidence, margin)


@task(name="test-model", cache_policy=NO_CACHE)
def test_model(cfg: TrainConfig, weights_key: str, dataset: dict, split_seed: int,
               run_id: str, store_uri: str, device: str, store_outage_minutes: float | None = None,
               promote_confidence: float = 0.95, promote_margin: float = 0.0, precision: str = "auto") -> dict:
    """Test the selected variant's best weights, and the champion of the same test images if
    there is one; write the model folder to the store. `precision` is the run's, resolved
    for `device`: with fan-out the variants trained in bf16 on GPUs and the test runs here."""
    amp = resolve_precision(precision, device) == "bf16"
    store = open_store(store_uri, outage_minutes=store_outage_minutes)
    out = local_run_dir(run_id, "model")
    out.mkdir(parents=True, exist_ok=True)
    store.get_file(weights_key, out / "weights.safetensors", limit=MAX_MODEL_BYTES)
    classes = dataset["classes"]
    model = build_model(cfg.model, num_classes=len(classes))
    model.load_state_dict(load_file(str(out / "weights.safetensors")))
    model = model.to(torch.device(device), memory_format=torch.channels_last)

    data = load_dataset(store, dataset, split_seed)
    m = evaluate(model, data.test_x, data.test_y, torch.device(device), tta=cfg.tta, amp=amp)
    metrics = {
        "variant": cfg.variant, "model": cfg.model, "n": m["n"], "loss": m["loss"], "accuracy": m["accuracy"],
        "per_class": dict(zip(classes, m["per_class"])),
    }
    print(f"test ({m['n']} images, {cfg.variant}): loss {m['loss']:.4f} accuracy {m['accuracy']:.4f}")
    with publishing(out / PREDICTIONS) as tmp:
        save_file({"predicted": m["predicted"].contiguous()}, str(tmp))
    ident = champions.identity({"dataset_name": dataset["name"], "dataset_md5": dataset["md5"],
                               "split_seed": split_seed, "test_size": m["n"]})
    current = champions.read(store, ident)
    if current is not None and current["run_id"] != run_id:  # a retried run is not compared with itself
        correct = (m["predicted"].long() == data.test_y).numpy()
        metrics["champion_comparison"] = face_champion(store, current, correct, data, device, out, promote_confidence,
                                                       promote_margin, amp)

    write_durably(out / "metrics.json", json.dumps(metrics, indent=2).encode())
    with publishing(out / "confusion_matrix.csv") as tmp:
        pd.DataFrame(m["confusion"], index=classes, columns=classes).rename_axis("true\\predicted").to_csv(tmp)
    plot_confusion(m["confusion"], classes, out / "confusion_matrix.png")
    write_durably(out / "classes.json", json.dumps(classes).encode())
    write_durably(out / "config.json", json.dumps(cfg.__dict__, indent=2).encode())
    export_portable(model, out / PORTABLE, tta=cfg.tta)

    artifacts = {}
    for name in ["weights.safetensors", PORTABLE, "classes.json", "config.json", "metrics.json",
                 "confusion_matrix.csv", "confusion_matrix.png", PREDICTIONS]:
        artifacts[f"model/{name}"] = store.put_file(run_key(run_id, "model", name), out / name)
    return {**metrics, "artifacts": artifacts}
