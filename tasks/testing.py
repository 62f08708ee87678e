"""test_model: the only task that reads the test split, once, for the selected model and
the champion it faces (same images: promotion rests on their paired difference)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from prefect import task
from prefect.cache_policies import NO_CACHE
from safetensors import SafetensorError
from safetensors.torch import save_file

from cnn.config import TrainConfig
from cnn.data import Splits
from cnn.evaluate import evaluate
from cnn.export import export_portable
from cnn.stats import promotion
from registry import champions
from run.cache import local_run_dir
from run.context import RunContext
from run.layout import (CLASSES, CONFIG, CONFUSION_CSV, CONFUSION_PNG, MODEL_FILES, PORTABLE, TEST_METRICS,
                        TEST_PREDICTIONS, WEIGHTS, model_key)
from run.model import rebuild
from run.records import ChampionComparison, TestResult, VariantScore
from run.report import plot_confusion
from store import MAX_DOCUMENT_BYTES, Store, StoreError, safe_name
from store.files import publishing, write_durably
from tasks.data import load_dataset
from tasks.scoring import right


def champion_model(store: Store, record: dict, num_classes: int, device: str, workdir: Path) -> tuple[nn.Module, TrainConfig]:
    """Rebuilt from config.json and weights.safetensors: nothing unpickled."""
    workdir.mkdir(parents=True, exist_ok=True)
    key = model_key(record["run_id"], CONFIG)
    # a few kB; bounded before it is downloaded (TooLarge: the champion is not loaded, naming it)
    config = json.loads(store.get_file(key, workdir / CONFIG, limit=MAX_DOCUMENT_BYTES).read_bytes())
    model, cfg = rebuild(store, config, store.uri_for(key), model_key(record["run_id"], WEIGHTS), workdir, num_classes)
    return model.to(torch.device(device), memory_format=torch.channels_last), cfg


def face_champion(ctx: RunContext, current: dict, correct_new: np.ndarray, data: Splits, device: str,
                  workdir: Path, amp: bool = False) -> ChampionComparison:
    """The champion is evaluated as the new model was (device, precision, normalisation, batches)."""
    who = safe_name(current["run_id"], "champion run id")  # read from the store: it names a local folder
    try:
        model, cfg = champion_model(ctx.store, current, len(data.classes), device, workdir / "champion" / who)
    except (FileNotFoundError, LookupError, ValueError, TypeError, RuntimeError, SafetensorError) as e:
        if isinstance(e, StoreError):
            raise  # the store, not the champion: Prefect's retry or the outage window decides
        return ChampionComparison(who, False, f"champion {who}'s model could not be loaded "
                                              f"({type(e).__name__}: {e}); not promoted")
    # outside the try: a device fault (out of memory, a CUDA error) fails the task, not the champion
    old = evaluate(model, data.test_x, data.test_y, torch.device(device), tta=cfg.tta, amp=amp)["predicted"]
    v = promotion(correct_new, (old.long() == data.test_y).numpy(), ctx.params.promote_confidence,
                  ctx.params.promote_margin, champion_run=who)
    print(f"against champion {who}: {v.reason}")
    return ChampionComparison(who, v.promoted, v.reason, difference=v.difference, ci=list(v.ci), method=v.method)


def face_champion_again(ctx: RunContext, current: dict) -> ChampionComparison:
    """For a champion that changed after the test: the stored test predictions, on the CPU."""
    store = ctx.store
    data = load_dataset(store, ctx.dataset, ctx.params.split_seed)
    where = store.uri_for(model_key(ctx.run_id, TEST_PREDICTIONS))
    raw = store.read_versioned(model_key(ctx.run_id, TEST_PREDICTIONS))[0]
    if raw is None:
        return ChampionComparison(current["run_id"], False, f"champion {current['run_id']} appeared after the test "
                                                            f"and {where} is missing; not promoted")
    correct = right(raw, where, data.test_y.numpy())
    return face_champion(ctx, current, correct, data, "cpu", local_run_dir(ctx.run_id))


def champion_identity(ctx: RunContext) -> str:
    """The dataset identity the run's model is tested, compared and published under
    (tasks/publish.py champion_record builds the same from the manifest)."""
    ds = ctx.dataset
    return champions.identity({"dataset_name": ds.name, "dataset_md5": ds.md5, "split_seed": ctx.params.split_seed,
                               "test_size": ds.split_sizes()[1], "dataset_purged": ds.purged_tag})


@task(name="test-model", cache_policy=NO_CACHE)
def test_model(ctx: RunContext, selected: VariantScore, device: str) -> TestResult:
    """Test the selected model and the champion, if any; store the model folder. Precision
    is resolved for `device`: with fan-out the variants trained in bf16 on GPUs."""
    store = ctx.store
    out = local_run_dir(ctx.run_id, "model")
    out.mkdir(parents=True, exist_ok=True)
    classes = ctx.dataset.classes
    model, cfg = rebuild(store, selected.config, f"variant {selected.name}'s config", selected.weights_key, out,
                         len(classes))
    model = model.to(torch.device(device), memory_format=torch.channels_last)

    data = load_dataset(store, ctx.dataset, ctx.params.split_seed)
    amp = ctx.precision(device) == "bf16"
    m = evaluate(model, data.test_x, data.test_y, torch.device(device), tta=cfg.tta, amp=amp)
    result = TestResult(variant=cfg.variant, model=cfg.model, n=m["n"], loss=m["loss"], accuracy=m["accuracy"],
                        per_class=dict(zip(classes, m["per_class"])))
    print(f"test ({m['n']} images, {cfg.variant}): loss {m['loss']:.4f} accuracy {m['accuracy']:.4f}")
    with publishing(out / TEST_PREDICTIONS) as tmp:
        save_file({"predicted": m["predicted"].contiguous()}, str(tmp))
    current = champions.read(store, champion_identity(ctx))
    if current is not None and current["run_id"] != ctx.run_id:  # a retried run is not compared with itself
        correct = (m["predicted"].long() == data.test_y).numpy()
        result = dataclasses.replace(result, champion_comparison=face_champion(ctx, current, correct, data, device,
                                                                               out, amp))

    write_durably(out / TEST_METRICS, json.dumps(result.to_dict(), indent=2).encode())
    with publishing(out / CONFUSION_CSV) as tmp:
        pd.DataFrame(m["confusion"], index=classes, columns=classes).rename_axis("true\\predicted").to_csv(tmp)
    plot_confusion(m["confusion"], classes, out / CONFUSION_PNG)
    write_durably(out / CLASSES, json.dumps(classes).encode())
    write_durably(out / CONFIG, json.dumps(cfg.__dict__, indent=2).encode())
    export_portable(model, out / PORTABLE, tta=cfg.tta)
    artifacts = {f"model/{name}": store.put_file(model_key(ctx.run_id, name), out / name) for name in MODEL_FILES}
    return dataclasses.replace(result, artifacts=artifacts)
