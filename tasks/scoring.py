"""Each variant's repeats combined into one score with its 95% interval, and the selected
variant against the runner-up, paired on the same validation images. Only validation
predictions are read here."""
from __future__ import annotations

import numpy as np
from prefect import task
from prefect.cache_policies import NO_CACHE
from safetensors import SafetensorError
from safetensors.numpy import load as load_tensors

from cnn.stats import paired_difference, sentence, variant_interval
from run.context import RunContext
from run.records import UnitResult, VariantComparison, VariantScore
from store import Store
from tasks.data import load_dataset
from tasks.selection import order, rank_key


def val_labels(ctx: RunContext) -> np.ndarray:
    """(N_val,) int64: the validation split's true classes, in the order predictions are kept."""
    return load_dataset(ctx.store, ctx.dataset, ctx.params.split_seed).val_y.numpy()


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
    """(N,) bool: whether each image's stored predicted class is its label."""
    try:
        predicted = load_tensors(raw).get("predicted")
    except SafetensorError as e:
        raise ValueError(f"{where}: expected a safetensors file with tensor 'predicted', found an unreadable "
                         f"file ({e})") from None
    if predicted is None or predicted.dtype != np.uint8 or predicted.shape != labels.shape:
        found = "no tensor 'predicted'" if predicted is None else f"{predicted.dtype} {predicted.shape}"
        raise ValueError(f"{where}: expected 'predicted', uint8 {labels.shape}, found {found}")
    return predicted.astype(np.int64) == labels


def combine(name: str, repeats: list[UnitResult], correct: np.ndarray | None, metric: str) -> VariantScore:
    """Mean and interval over the selectable repeats (`correct`: (R_ok, N_val)), the model
    of the best by `metric`; with none selectable, the first one's failure."""
    listed = [r.repeat_summary() for r in repeats]
    artifacts = {k: v for r in repeats for k, v in r.artifacts.items()}
    ok = [r for r in repeats if r.selectable]
    if not ok:
        first = repeats[0]
        error = first.error if len(repeats) == 1 else "; ".join(
            f"seed {r.seed}: {r.status}" + (f" ({r.error})" if r.error else "") for r in repeats)
        return _score(first, listed, artifacts, error=error)
    best = min(ok, key=lambda r: order(r.val_accuracy, r.val_loss, metric))
    mean, low, high = variant_interval(correct)
    return _score(best, listed, artifacts, error=best.error, val_accuracy_mean=mean, val_accuracy_ci=[low, high],
                  val_loss_mean=float(np.mean([r.val_loss for r in ok])))


def _score(model: UnitResult, repeats: list[dict], artifacts: dict, **aggregate) -> VariantScore:
    return VariantScore(name=model.name, status=model.status, repeats=repeats, epochs_run=model.epochs_run,
                        best_epoch=model.best_epoch, val_loss=model.val_loss, val_accuracy=model.val_accuracy,
                        seconds=model.seconds, attempts=model.attempts, seed=model.seed, device=model.device,
                        config=model.config, weights_key=model.weights_key, artifacts=artifacts, pruned=model.pruned,
                        **aggregate)


@task(name="score-variants", cache_policy=NO_CACHE)
def score_variants(ctx: RunContext, units: list[UnitResult]) -> list[VariantScore]:
    groups: dict[str, list[UnitResult]] = {}
    for u in units:
        groups.setdefault(u.name, []).append(u)
    labels = val_labels(ctx) if any(u.selectable for u in units) else None
    out = []
    for name, repeats in groups.items():
        ok = [r for r in repeats if r.selectable]
        score = combine(name, repeats, outcomes(ctx.store, ok, labels) if ok else None, ctx.params.select_metric)
        if score.selectable:
            low, high = score.val_accuracy_ci
            print(f"{name}: val_acc {score.val_accuracy_mean:.4f} (95% interval {low:.4f} to {high:.4f}) "
                  f"over {len(ok)} of {len(repeats)} repeat(s)")
        out.append(score)
    return out


@task(name="compare-variants", cache_policy=NO_CACHE)
def compare_variants(ctx: RunContext, units: list[UnitResult], scores: list[VariantScore],
                     selected: VariantScore) -> VariantComparison | None:
    """The selected variant minus the runner-up; None when no other was selectable."""
    others = [s for s in scores if s.selectable and s.name != selected.name]
    if not others:
        return None
    runner_up = min(others, key=lambda s: rank_key(s, ctx.params.select_metric))
    labels = val_labels(ctx)
    a, b = (outcomes(ctx.store, [u for u in units if u.name == s.name and u.selectable], labels)
            for s in (selected, runner_up))
    c = paired_difference(a, b)
    said = sentence(selected.name, runner_up.name, c)
    print(said)
    return VariantComparison(selected=selected.name, runner_up=runner_up.name, difference=c.difference,
                             ci=list(c.ci), distinguishable=c.distinguishable, method=c.method, level=c.level,
                             n_images=c.n_images, sentence=said)
