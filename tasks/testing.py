"""test_model: the only task that reads the test split, once, for the selected model."""
from __future__ import annotations

import json

import pandas as pd
import torch
from prefect import task
from prefect.cache_policies import NO_CACHE
from safetensors.torch import load_file

from cnn.data import load_splits
from cnn.evaluate import evaluate
from cnn.export import export_portable
from cnn.models import build_model
from cnn.train import TrainConfig
from store import open_store
from tasks.common import local_run_dir, materialize, run_key
from tasks.data import PREPARED_FILES
from tasks.report import plot_confusion

PORTABLE = "model.pt2"  # torch.export program: torch.export.load(path).module()


@task(name="test-model", cache_policy=NO_CACHE)
def test_model(cfg: TrainConfig, weights_key: str, dataset: dict, split_seed: int,
               run_id: str, store_uri: str, device: str, store_outage_minutes: float | None = None) -> dict:
    """Test the selected variant's best weights; write the model folder to the store."""
    store = open_store(store_uri, outage_minutes=store_outage_minutes)
    out = local_run_dir(run_id) / "model"
    out.mkdir(parents=True, exist_ok=True)
    store.get_file(weights_key, out / "weights.safetensors")
    classes = dataset["classes"]
    model = build_model(cfg.model, num_classes=len(classes))
    model.load_state_dict(load_file(str(out / "weights.safetensors")))
    model = model.to(torch.device(device), memory_format=torch.channels_last)

    data = load_splits(materialize(store, dataset["key"], PREPARED_FILES), split_seed)
    m = evaluate(model, data.test_x, data.test_y, torch.device(device), tta=cfg.tta,
                 amp=cfg.precision == "bf16")
    metrics = {
        "variant": cfg.variant, "model": cfg.model, "n": m["n"], "loss": m["loss"], "accuracy": m["accuracy"],
        "per_class": dict(zip(classes, m["per_class"])),
    }
    print(f"test ({m['n']} images, {cfg.variant}): loss {m['loss']:.4f} accuracy {m['accuracy']:.4f}")

    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    pd.DataFrame(m["confusion"], index=classes, columns=classes).rename_axis("true\\predicted").to_csv(
        out / "confusion_matrix.csv")
    plot_confusion(m["confusion"], classes, out / "confusion_matrix.png")
    (out / "classes.json").write_text(json.dumps(classes))
    (out / "config.json").write_text(json.dumps(cfg.__dict__, indent=2))
    export_portable(model, out / PORTABLE, tta=cfg.tta)

    artifacts = {}
    for name in ["weights.safetensors", PORTABLE, "classes.json", "config.json", "metrics.json",
                 "confusion_matrix.csv", "confusion_matrix.png"]:
        artifacts[f"model/{name}"] = store.put_file(run_key(run_id, "model", name), out / name)
    return {**metrics, "artifacts": artifacts}
