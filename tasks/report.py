"""The run's human-readable report: markdown tables and matplotlib figures."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402


def plot_confusion(confusion: list[list[int]], classes: list[str], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    im = ax.imshow(confusion, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i, row in enumerate(confusion):
        for j, n in enumerate(row):
            ax.text(j, i, n, ha="center", va="center", fontsize=7)
    fig.colorbar(im)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_curves(histories: dict[str, pd.DataFrame], path: Path) -> Path:
    """Validation loss and accuracy per epoch, one line per variant."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for name, h in histories.items():
        if len(h):
            a.plot(h["epoch"], h["val_loss"], marker=".", label=name)
            b.plot(h["epoch"], h["val_accuracy"], marker=".", label=name)
    a.set(xlabel="epoch", ylabel="validation loss")
    b.set(xlabel="epoch", ylabel="validation accuracy")
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def variants_table(variants: list[dict], selected: str | None) -> list[dict]:
    """One row per variant (the manifest's variant entries) for the UI's table artifact
    and the report; `attempts` counts the flow or task runs a variant took. The mean
    validation accuracy over its repeats and its 95% interval decide; the other numbers
    are its best repeat's."""
    def r(x, n=4):
        return None if x is None else round(x, n)

    def interval(ci):
        return "" if not ci else f"{ci[0]:.4f} to {ci[1]:.4f}"

    return [{"variant": v["name"], "selected": v["name"] == selected, "status": v["status"],
             "repeats": len(v.get("repeats") or [None]), "val_accuracy_mean": r(v.get("val_accuracy_mean")),
             "val_accuracy_95": interval(v.get("val_accuracy_ci")),
             "attempts": v.get("attempts", 1), "epochs_run": v.get("epochs_run"), "best_epoch": v.get("best_epoch"),
             "val_loss": r(v.get("val_loss")), "val_accuracy": r(v.get("val_accuracy")),
             "seconds": r(v.get("seconds"), 1), "note": v.get("error") or ""} for v in variants]


def render_markdown(manifest: dict, links: dict[str, str], folder: str | None = None) -> str:
    """The report shown in the Prefect UI (presigned `links`) and stored as report.md
    (`links` relative to the run's `folder`, a store URI: nothing that expires or signs)."""
    t, d = manifest["test"], manifest["dataset"]
    not_compared = ("" if manifest.get("compared_with") or "identity" not in d else
                    f"**Not compared** with any champion: dataset `{d['identity']}` had none.")
    rows = variants_table(manifest["variants"], manifest["selected"])
    comparison = manifest.get("comparison")
    versus = t.get("champion_comparison")
    lines = [
        f"# train-cifar run `{manifest['run_id']}`",
        "",
        f"Selected variant **{manifest['selected']}** ({manifest['params']['model']} model) by "
        f"{manifest['params']['select_metric']} on {d['sizes']['val']} validation images; "
        f"tested once on {d['sizes']['test']} held-out images.",
        "",
        f"**Test accuracy {t['accuracy']:.4f}**, test loss {t['loss']:.4f}. "
        f"Promoted to champion: **{'yes' if manifest['promoted'] else 'no'}** ({manifest['promotion_reason']}).",
        *([not_compared, ""] if not_compared else [""]),
        *([f"Against champion `{versus['champion_run_id']}` on the same test images: {versus['reason']}.", ""]
          if versus else []),
        "## Variants (validation)",
        "",
        pd.DataFrame(rows).to_markdown(index=False) if rows else "",
        "",
        *([f"Selected against the runner-up on the same validation images: {comparison['sentence']}.", ""]
          if comparison else []),
        "## Per-class test accuracy",
        "",
        pd.DataFrame({"class": list(t["per_class"]), "accuracy": [round(a, 4) for a in t["per_class"].values()]}
                     ).to_markdown(index=False),
        "",
        f"Dataset `{d['source']}` md5 `{d['md5']}`, split seed {d['split_seed']}, sizes {d['sizes']}. "
        f"Device {manifest['device']}; git {manifest['git_sha']}.",
        "",
        "## Files",
        "",
        *([f"In `{folder}`:", ""] if folder else []),
        *[f"- [{name}]({url})" for name, url in links.items()],
        "",
    ]
    return "\n".join(lines)
