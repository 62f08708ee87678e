"""select_variant: by validation only, a variant ranked by its mean over its repeats."""
from __future__ import annotations

from prefect import task

from run.records import VariantScore


def order(accuracy: float, loss: float, metric: str) -> tuple[float, float]:
    """Smaller is better: validation accuracy (higher first) or loss, ties by lower loss."""
    if metric == "val_accuracy":
        return (-accuracy, loss)
    if metric == "val_loss":
        return (loss, -accuracy)
    raise ValueError(f"Invalid select_metric {metric!r}. Only val_accuracy and val_loss are supported.")


def rank_key(score: VariantScore, metric: str) -> tuple[float, float]:
    """A selectable variant's place by `metric`: its means over its repeats."""
    return order(score.val_accuracy_mean, score.val_loss_mean, metric)


class NoVariantTrained(RuntimeError):
    """Every unit failed or diverged. Each one's error was logged with its own task run (a
    fault's traceback with it); this names them all, so its own traceback adds nothing."""


@task(name="select-variant")
def select_variant(scores: list[VariantScore], metric: str) -> VariantScore:
    ok = [s for s in scores if s.selectable]
    if not ok:
        why = "; ".join(f"{s.name}: {s.status}" + (f" ({s.error})" if s.error else "") for s in scores)
        raise NoVariantTrained(f"no variant finished training, nothing to select: {why}")
    # a variant successive halving stopped is chosen only if none that went on has a model
    best = min([s for s in ok if s.status != "pruned"] or ok, key=lambda s: rank_key(s, metric))
    print(f"selected {best.name} by {metric}: val_acc {best.val_accuracy_mean:.4f} val_loss {best.val_loss_mean:.4f}"
          + (f" (means over {len(best.repeats)} repeats; tested: seed {best.seed}'s model)"
             if len(best.repeats) > 1 else ""))
    return best
