"""score_variants and compare_variants: each variant's repeats combined into one score
with its 95% interval, and the selected variant against the runner-up, paired on the
same validation images (cnn/stats.py). Only validation predictions are read here."""
from __future__ import annotations

import dataclasses

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE
from safetensors import SafetensorError
from safetensors.numpy import load as load_tensors

from cnn.stats import paired_difference, sentence, variant_interval
from store import Store, open_store
from tasks.data import load_dataset
from run.records import UnitResult
from tasks.selection import rank_key


def val_labels(store: Store, dataset: dict, split_seed: int) -> np.ndarray:
    """(N_val,) int64: the validation split's true classes, in the order predictions are kept."""
    return load_dataset(store, dataset, split_seed).val_y.numpy()


def outcomes(store: Store, repeats: list[UnitResult], labels: np.ndarray) -> np.ndarray:
    """(R, N_val) bool: whether each repeat's best epoch classified each validation image right."""
    rows = []
    for r in repeats:
        raw = None if r.predictions_key is None else store.read_versioned(r.predictions_key)[0]
        if raw is None:
            raise LookupError(f"{r.name} seed {r.seed}: expected its validation predictions "
                              f"({r.predictions_key or 'no predictions_key in its metrics.json'}), found none; "
                              "delete its metrics.json to have it resumed, which writes them")
        rows.append(right(raw, store.uri_for(r.predictions_key), labels))
    return np.stack(rows)


def right(raw: bytes, where: str, labels: np.ndarray) -> np.ndarray:
    """(N,) bool from a stored predictions file (`where` names it in errors): whether each
    image's predicted class is its label."""
    try:
        predicted = load_tensors(raw).get("predicted")
    except SafetensorError as e:
        raise ValueError(f"{where}: expected a safetensors file with tensor 'predicted', found an unreadable "
                         f"file ({e})") from None
    if predicted is None or predicted.dtype != np.uint8 or predicted.shape != labels.shape:
        found = "no tensor 'predicted'" if predicted is None else f"{predicted.dtype} {predicted.shape}"
        raise ValueError(f"{where}: expected 'predicted', uint8 {labels.shape}, found {found}")
    return predicted.astype(np.int64) == labels


def combine(name: str, repeats: list[UnitResult], correct: np.ndarray | None, metric: str) -> UnitResult:
    """The variant's record: its best repeat by `metric` (whose model would be tested), with
    every repeat listed and the mean and interval over the selectable ones (`correct`,
    (R_ok, N_val) bool, in their order). No repeat selectable: the first one's failure."""
    listed = [r.repeat_summary() for r in repeats]
    artifacts = {k: v for r in repeats for k, v in r.artifacts.items()}
    ok = [r for r in repeats if r.selectable]
    if not ok:
        first = repeats[0]
        error = first.error if len(repeats) == 1 else "; ".join(
            f"seed {r.seed}: {r.status}" + (f" ({r.error})" if r.error else "") for r in repeats)
        return dataclasses.replace(first, repeats=listed, artifacts=artifacts, error=error)
    best = min(ok, key=lambda r: rank_key(r, metric))
    mean, low, high = variant_interval(correct)
    return dataclasses.replace(best, repeats=listed, artifacts=artifacts, val_accuracy_mean=mean,
                               val_accuracy_ci=[low, high], val_loss_mean=float(np.mean([r.val_loss for r in ok])))


@task(name="score-variants", cache_policy=NO_CACHE)
def score_variants(units: list[UnitResult], metric: str, dataset: dict, split_seed: int, store_uri: str,
                   store_outage_minutes: float | None = None) -> list[UnitResult]:
    """One record per variant, in the order the units came: its repeats' mean validation
    accuracy with its 95% interval, and its best repeat's model and metrics."""
    store = open_store(store_uri, outage_minutes=store_outage_minutes)
    groups: dict[str, list[UnitResult]] = {}
    for u in units:
        groups.setdefault(u.name, []).append(u)
    labels = val_labels(store, dataset, split_seed) if any(u.selectable for u in units) else None
    out = []
    for name, repeats in groups.items():
        ok = [r for r in repeats if r.selectable]
        record = combine(name, repeats, outcomes(store, ok, labels) if ok else None, metric)
        if record.val_accuracy_ci is not None:
            low, high = record.val_accuracy_ci
            print(f"{name}: val_acc {record.val_accuracy_mean:.4f} (95% interval {low:.4f} to {high:.4f}) "
                  f"over {len(ok)} of {len(repeats)} repeat(s)")
        out.append(record)
    return out


@task(name="compare-variants", cache_policy=NO_CACHE)
def compare_variants(units: list[UnitResult], results: list[UnitResult], selected: UnitResult, metric: str,
                     dataset: dict, split_seed: int, store_uri: str,
                     store_outage_minutes: float | None = None) -> dict | None:
    """The selected variant minus the runner-up (the next by `metric`), paired on the same
    validation images over all their repeats: the manifest's `comparison`; None when
    no other variant was selectable."""
    others = [r for r in results if r.selectable and r.name != selected.name]
    if not others:
        return None
    runner_up = min(others, key=lambda r: rank_key(r, metric))
    store = open_store(store_uri, outage_minutes=store_outage_minutes)
    labels = val_labels(store, dataset, split_seed)
    a, b = (outcomes(store, [u for u in units if u.name == r.name and u.selectable], labels)
            for r in (selected, runner_up))
    c = paired_difference(a, b)
    said = sentence(selected.name, runner_up.name, c)
    print(said)
    return {"selected": selected.name, "runner_up": runner_up.name, "difference": c.difference, "ci": list(c.ci),
            "distinguishable": c.distinguishable, "method": c.method, "level": c.level, "n_images": c.n_images,
            "sentence": said}
