"""check-data: the splits a run will train and test on, checked before any training
(cnn/datachecks.py); the record goes into the manifest as `data_checks`, a table into
the Prefect UI. A failed check stops the run with a DataCheckFailed naming it.

A result is memoised in this machine's cache only, keyed by the prepared data's SHA-256
(from the run's DatasetRef, never the store) and everything else the checks depend on:
the store is writable by others, and a record there could claim a pass.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json

import torch
from PIL import Image
from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from cnn import datachecks as dc
from cnn.data import Splits
from cnn.device import pick_device, prepare_device
from run.cache import cache_dir, mark_used
from run.context import RunContext
from run.records import DatasetRef
from run.report import data_uri
from store.files import write_durably
from tasks.data import load_dataset, load_prepared

ARTIFACT_KEY = "data-checks"
THUMB_SCALE = 2  # 32 px images shown at 64 px


def thresholds(p) -> dc.Thresholds:
    return dc.Thresholds(class_balance_tolerance=p.class_balance_tolerance, max_blank_images=p.max_blank_images,
                         max_exact_duplicates=p.max_exact_duplicates, max_near_duplicates=p.max_near_duplicates)


def memo_path(ctx: RunContext):
    p = ctx.params
    key = {"version": dc.VERSION, "sha256": ctx.dataset.sha256, "split_seed": p.split_seed, "subset": p.subset,
           "thresholds": vars(thresholds(p)), "near_correlation": dc.NEAR_CORRELATION, "blank_std": dc.BLANK_STD,
           "max_shift": dc.MAX_SHIFT, "candidates": dc.NEAR_CANDIDATES}
    if p.purge_test_duplicates:  # only then: the memo of a run without purge is the one it always was
        key["purge_test_duplicates"] = True
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    return cache_dir() / "data-checks" / f"{name}.json"


def _memoised(path) -> dict | None:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    ok = (isinstance(record, dict) and isinstance(record.get("checks"), list)
          and record.get("digest") == dc.digest(record["checks"])
          and record.get("passed") == all(c.get("passed") for c in record["checks"]))
    if ok and "purged" in record:  # the list the digest covers, in the near-duplicate check
        near = [c for c in record["checks"] if c.get("name") == "near_duplicates"]
        ok = len(near) == 1 and near[0].get("purged") == record["purged"]
    return record if ok else None


@task(name="check-data", cache_policy=NO_CACHE)
def check_data(ctx: RunContext) -> dict:
    """Class balance, duplicates, near-duplicates, blank images and labels, before any GPU minute."""
    p = ctx.params
    splits = load_dataset(ctx.store, ctx.dataset, p.split_seed, p.subset)
    memo = memo_path(ctx)
    record = _memoised(memo)
    if record is not None and p.purge_test_duplicates != ("purged" in record):
        record = None
    if record is None:
        device = pick_device("auto" if p.variant_deployment else p.device)
        prepare_device(device)
        purged = None
        if p.purge_test_duplicates:  # against the whole hold-out and every train image, not the subset
            tensors, _ = load_prepared(ctx.store, ctx.dataset)
            purged = dc.holdout_near_duplicates(tensors["train_x"], tensors["holdout_x"], device)
        record, _ = dc.run_checks(splits, thresholds(p), device, purged)
        write_durably(memo, json.dumps(record, indent=1).encode())
    else:
        mark_used(memo)  # the cache's age rule counts from this use
        print(f"data checks of {ctx.dataset.sha256[:12]}: memoised in {memo}")
    for c in record["checks"]:
        count = f"{c['count']} ({c['fraction']:.2%})" if "fraction" in c else c["count"]
        print(f"data check {c['name']}: {count}, threshold {c['threshold']}: " + ("passed" if c["passed"] else "FAILED"))
    if "purged" in record:
        print(f"purge_test_duplicates: {len(record['purged'])} of {ctx.dataset.holdout} hold-out images have a "
              "near-duplicate in train and are dropped before the split into validation and test")
    _artifact(ctx, record, splits)
    error = dc.failure(record)
    if error is not None:
        raise error
    return record


def purged_dataset(dataset: DatasetRef, record: dict) -> DatasetRef:
    """The run's DatasetRef with the hold-out images check-data purged (none without
    purge_test_duplicates): every split of the run, a child's too, is made from it."""
    purged = tuple(record.get("purged", ()))
    if purged and dataset.holdout is not None and dataset.holdout - len(purged) < 2:
        raise dc.DataCheckFailed(f"purge_test_duplicates: {len(purged)} of the {dataset.holdout} hold-out images "
                                 "have a near-duplicate in train, leaving too few to validate and test on")
    return dataclasses.replace(dataset, purged=purged)


def _artifact(ctx: RunContext, record: dict, splits: Splits) -> None:
    """Best-effort: an API hiccup must not fail the run that the checks passed."""
    try:
        create_markdown_artifact(render_markdown(record, splits), key=ARTIFACT_KEY,
                                 description=f"Run {ctx.run_id}: data checks before training")
    except Exception as e:  # noqa: BLE001
        print(f"run {ctx.run_id}: the data-checks artifact was not created ({type(e).__name__}: {e})")


def thumbnail(image: torch.Tensor) -> str:
    """A (3, 32, 32) uint8 image as a small PNG data URI."""
    img = Image.fromarray(image.permute(1, 2, 0).contiguous().numpy())
    img = img.resize((32 * THUMB_SCALE, 32 * THUMB_SCALE), Image.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="png", optimize=True)
    return data_uri(buf.getvalue())


def _image(splits: Splits, split: str, index: int) -> torch.Tensor:
    return {"train": splits.train_x, "val": splits.val_x, "test": splits.test_x}[split][index]


def _class(splits: Splits, label: int) -> str:
    return splits.classes[label] if 0 <= label < len(splits.classes) else f"label {label}"


def render_markdown(record: dict, splits: Splits) -> str:
    checks = {c["name"]: c for c in record["checks"]}
    lines = [f"# Data checks: {'passed' if record['passed'] else 'FAILED'}", "",
             "| check | count | threshold | result |", "|---|---|---|---|"]
    for c in record["checks"]:
        count = c["count"]
        if c["name"] == "near_duplicates":
            count = f"{count} ({c['fraction']:.2%} of validation + test)"
            if "purged" in c:
                count += f"; {len(c['purged'])} hold-out images dropped (purge_test_duplicates)"
        threshold = f"{c['threshold']:.2%}" if c["name"] == "near_duplicates" else c["threshold"]
        lines.append(f"| {c['name']} | {count} | {threshold} | {'passed' if c['passed'] else '**failed**'} |")
    per_class = checks["class_balance"]["per_class"]
    lines += ["", "Images per class:", "", "| split | " + " | ".join(splits.classes) + " |",
              "|---|" + "---|" * len(splits.classes)]
    lines += [f"| {s} | " + " | ".join(str(n) for n in counts) + " |" for s, counts in per_class.items()]
    near = checks["near_duplicates"]["examples"]
    if near:
        lines += ["", "Closest near-duplicates (validation/test image beside its train match):", "",
                  "| image | train match | correlation | labels |", "|---|---|---|---|"]
        for e in near:
            lines.append(f"| ![{e['split']} {e['index']}]({thumbnail(_image(splits, e['split'], e['index']))}) "
                         f"{e['split']} {e['index']} "
                         f"| ![train {e['train_index']}]({thumbnail(_image(splits, 'train', e['train_index']))}) "
                         f"train {e['train_index']} | {e['correlation']:.4f} "
                         f"| {_class(splits, e['label'])} / {_class(splits, e['train_label'])} |")
    blank = checks["blank_images"]["examples"]
    if blank:
        lines += ["", "Blank images:", "", "| image | split | index | std |", "|---|---|---|---|"]
        lines += [f"| ![blank]({thumbnail(_image(splits, e['split'], e['index']))}) | {e['split']} | {e['index']} "
                  f"| {e['std']} |" for e in blank]
    for name in ("exact_duplicates", "labels_outside_classes"):
        if checks[name]["examples"]:
            lines += ["", f"{name}, first examples: " + "; ".join(
                ", ".join(f"{k} {v}" for k, v in e.items()) for e in checks[name]["examples"])]
    return "\n".join(lines) + "\n"
