"""select_variant: choose by validation only; the test split is not looked at here.

A variant trained several times (repeats) is ranked by its mean over them; its model
is its best repeat's (tasks/scoring.py)."""
from __future__ import annotations

from prefect import task

from run.records import UnitResult


def rank_key(result: UnitResult, metric: str) -> tuple[float, float]:
    """Smaller is better: validation accuracy (higher first) or loss, ties by lower loss;
    a variant's means over its repeats where it has them, else its own values (one repeat's)."""
    acc = result.val_accuracy if result.val_accuracy_mean is None else result.val_accuracy_mean
    loss = result.val_loss if result.val_loss_mean is None else result.val_loss_mean
    if metric == "val_accuracy":
        return (-acc, loss)
    if metric == "val_loss":
        return (loss, -acc)
    raise ValueError(f"Invalid select_metric {metric!r}. Only val_accuracy and val_loss are supported.")


class NoVariantTrained(RuntimeError):
    """Every unit failed or diverged. Each one's error was logged with its own task run (a
    fault's traceback with it); this names them all, so its own traceback adds nothing."""


@task(name="select-variant")
def select_variant(results: list[UnitResult], metric: str) -> UnitResult:
    """The best variant by `metric` (its mean over repeats); diverged or failed variants are never chosen."""
    ok = [r for r in results if r.selectable]
    if not ok:
        why = "; ".join(f"{r.name}: {r.status}" + (f" ({r.error})" if r.error else "") for r in results)
        raise NoVariantTrained(f"no variant finished training, nothing to select: {why}")
    best = min(ok, key=lambda r: rank_key(r, metric))
    acc, loss = rank_key(best, "val_accuracy")
    print(f"selected {best.name} by {metric}: val_acc {-acc:.4f} val_loss {loss:.4f}"
          + (f" (means over {len(best.repeats)} repeats; tested: seed {best.seed}'s model)"
             if best.repeats and len(best.repeats) > 1 else ""))
    return best
