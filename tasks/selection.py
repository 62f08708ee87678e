"""select_variant: choose by validation only; the test split is not looked at here."""
from __future__ import annotations

from prefect import task

from tasks.results import VariantResult


def rank_key(result: VariantResult, metric: str) -> tuple[float, float]:
    """Smaller is better: validation accuracy (higher first) or loss, ties by lower loss."""
    if metric == "val_accuracy":
        return (-result.val_accuracy, result.val_loss)
    if metric == "val_loss":
        return (result.val_loss, -result.val_accuracy)
    raise ValueError(f"Invalid select_metric {metric!r}. Only val_accuracy and val_loss are supported.")


@task(name="select-variant")
def select_variant(results: list[VariantResult], metric: str) -> VariantResult:
    """The best variant by `metric`; diverged or failed variants are never chosen."""
    ok = [r for r in results if r.selectable]
    if not ok:
        why = "; ".join(f"{r.name}: {r.status}" + (f" ({r.error})" if r.error else "") for r in results)
        raise RuntimeError(f"no variant finished training, nothing to select: {why}")
    best = min(ok, key=lambda r: rank_key(r, metric))
    print(f"selected {best.name} by {metric}: val_acc {best.val_accuracy:.4f} val_loss {best.val_loss:.4f}")
    return best
