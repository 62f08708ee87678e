"""The run's report: markdown tables and matplotlib figures. The figures are also
inlined as data URIs into the Prefect UI's artifacts, so they are drawn small (low DPI,
a palette of few colours): a few tens of KB each.
"""
from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure  # no pyplot: its global state is not thread-safe, and lanes are threads
from PIL import Image

from run.layout import CONFUSION_PNG, CURVES, MODEL, RUNGS_PLOT, TREND_PLOT, VARIANTS_PLOT
from store.files import write_durably

DPI = 80
COLOURS = 64  # plots are a few flat colours and their antialiased edges

# relative to the run's folder -> title in the report
VARIANTS, CONFUSION = VARIANTS_PLOT, f"{MODEL}/{CONFUSION_PNG}"
REPORT_IMAGES = {CURVES: "Validation curves", VARIANTS: "Validation accuracy by variant",
                 CONFUSION: "Confusion matrix (test)", TREND_PLOT: "Test accuracy night by night"}
# only in the report of a run with halving on
HALVING_IMAGES = {RUNGS_PLOT: "Successive halving: validation accuracy per rung"}
TITLES = {**REPORT_IMAGES, **HALVING_IMAGES}


def save_png(fig: Figure, path: Path | None = None) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, facecolor="white")
    img = Image.open(buf).convert("RGB").quantize(colors=COLOURS, method=Image.Quantize.FASTOCTREE)
    out = io.BytesIO()
    img.save(out, format="png", optimize=True)
    if path is not None:
        write_durably(path, out.getvalue())
    return out.getvalue()


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def plot_confusion(confusion: list[list[int]], classes: list[str], path: Path) -> Path:
    fig = Figure(figsize=(6.5, 5.5))
    ax = fig.subplots()
    im = ax.imshow(confusion, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    dark = 0.6 * max(max(row) for row in confusion)  # where Blues is too dark for black digits
    for i, row in enumerate(confusion):
        for j, n in enumerate(row):
            ax.text(j, i, n, ha="center", va="center", fontsize=7, color="white" if n > dark else "black")
    fig.colorbar(im)
    fig.tight_layout()
    save_png(fig, path)
    return path


def _repeats(h: pd.DataFrame | list[pd.DataFrame]) -> list[pd.DataFrame]:
    return [f for f in ([h] if isinstance(h, pd.DataFrame) else list(h)) if len(f)]


def draw_curves(histories: dict[str, pd.DataFrame | list[pd.DataFrame]], figsize=(11, 4)) -> Figure:
    """Validation loss and accuracy per epoch, one line per variant; with repeats, their
    mean and a band from the lowest to the highest (an early-stopped repeat counts up
    to its last epoch)."""
    fig = Figure(figsize=figsize)
    a, b = fig.subplots(1, 2)
    for name, h in histories.items():
        frames = _repeats(h)
        if not frames:
            continue
        per_epoch = pd.concat(frames).groupby("epoch")[["val_loss", "val_accuracy"]]
        mean = per_epoch.mean()
        label = name if len(frames) == 1 else f"{name} (mean of {len(frames)})"
        for ax, col in ((a, "val_loss"), (b, "val_accuracy")):
            line, = ax.plot(mean.index, mean[col], marker=".", label=label)
            if len(frames) > 1:
                ax.fill_between(mean.index, per_epoch.min()[col], per_epoch.max()[col],
                                color=line.get_color(), alpha=0.2, linewidth=0)
    a.set(xlabel="epoch", ylabel="validation loss")
    b.set(xlabel="epoch", ylabel="validation accuracy")
    if b.lines:
        b.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_curves(histories: dict[str, pd.DataFrame | list[pd.DataFrame]], path: Path) -> Path:
    save_png(draw_curves(histories), path)
    return path


def plot_variants(variants: list[dict], selected: str | None, path: Path) -> Path:
    """Each variant's mean validation accuracy with its 95% interval where repeats gave
    them (else its `val_accuracy` alone); the selected one in red."""
    shown = [v for v in variants if v.get("val_accuracy_mean", v.get("val_accuracy")) is not None]
    fig = Figure(figsize=(6.5, 1.0 + 0.35 * max(1, len(shown))))
    ax = fig.subplots()
    for y, v in enumerate(reversed(shown)):  # the first variant on top
        x = v.get("val_accuracy_mean", v.get("val_accuracy"))
        ci = v.get("val_accuracy_ci")
        colour = "tab:red" if v["name"] == selected else "tab:blue"
        xerr = None if not ci else [[x - ci[0]], [ci[1] - x]]
        ax.errorbar([x], [y], xerr=xerr, fmt="o", color=colour, capsize=4,
                    markersize=8 if v["name"] == selected else 6)
    ax.set_yticks(range(len(shown)), [v["name"] + (" (selected)" if v["name"] == selected else "")
                                      for v in reversed(shown)])
    ax.set_ylim(-0.7, len(shown) - 0.3)
    missing = [v["name"] for v in variants if v not in shown]
    ax.set_xlabel("validation accuracy" + ("  (no model: " + ", ".join(missing) + ")" if missing else ""))
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    save_png(fig, path)
    return path


def plot_trend(entries: list[dict], path: Path, identity: str | None = None) -> Path:
    """A dataset identity's trend (registry/trends.py), oldest left: each trained run's test
    accuracy with its 95% interval, promotions as stars, regressions as red crosses, the
    champion's accuracy after each night as a step line; nights that trained nothing
    (skipped, superseded, failed) as grey marks along the bottom."""
    fig = Figure(figsize=(9, 3.4))
    ax = fig.subplots()
    pct = lambda x: 100 * x  # noqa: E731
    trained = [(i, e) for i, e in enumerate(entries) if e.get("test")]
    if trained:
        xs = [i for i, _ in trained]
        ys = [pct(e["test"]["accuracy"]) for _, e in trained]
        cis = [e["test"].get("ci") or [e["test"]["accuracy"]] * 2 for _, e in trained]
        err = [[y - pct(c[0]) for y, c in zip(ys, cis)], [pct(c[1]) - y for y, c in zip(ys, cis)]]
        ax.errorbar(xs, ys, yerr=err, fmt="o", color="tab:blue", capsize=3, markersize=5,
                    label="test accuracy (95% interval)")
        for marks, colour, symbol, size, label in (
                ([(i, e) for i, e in trained if e.get("promoted")], "tab:green", "*", 15, "promoted"),
                ([(i, e) for i, e in trained if e.get("regression")], "tab:red", "X", 12, "regression")):
            if marks:
                ax.plot([i for i, _ in marks], [pct(e["test"]["accuracy"]) for _, e in marks], symbol,
                        color=colour, markersize=size, label=label, linestyle="none")
    champion = [(i, pct(e["champion"]["accuracy"])) for i, e in enumerate(entries) if e.get("champion")]
    if champion:
        ax.step(*zip(*champion), where="post", color="tab:green", alpha=0.6, label="champion")
    bottom = ax.get_xaxis_transform()  # x in nights, y in the axes' height
    for status, symbol in (("skipped", "o"), ("superseded", ">"), ("failed", "v")):
        xs = [i for i, e in enumerate(entries) if e["status"] == status]
        if xs:
            ax.plot(xs, [0.04] * len(xs), symbol, transform=bottom, color="grey", markerfacecolor="none",
                    linestyle="none", label=status)
    labels = [(e.get("night") or e["at"][:10])[5:] for e in entries]
    if len(set(labels)) < len(labels):  # several runs a day: their times tell them apart
        labels = [e["at"][5:16].replace("T", " ") for e in entries]
    step = max(1, len(entries) // 12)
    ax.set_xticks(range(0, len(entries), step), labels[::step], fontsize=7)
    ax.set_xlim(-0.7, max(len(entries), 1) - 0.3)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"Night by night: {identity}" if identity else "Night by night", fontsize=8)
    ax.grid(alpha=0.3)
    if entries:
        ax.legend(fontsize=7, loc="best")
    else:
        ax.text(0.5, 0.5, "no nights recorded yet", transform=ax.transAxes, ha="center")
    fig.tight_layout()
    save_png(fig, path)
    return path


def shown_status(row: dict) -> str:
    """`pruned at rung k` and `stopped by budget` as a reader says them; the others as stored."""
    if row["status"] == "pruned" and row.get("pruned"):
        return f"pruned at rung {row['pruned']['rung']}"
    return "stopped by budget" if row["status"] == "stopped_by_budget" else row["status"]


def plot_rungs(rungs: list[dict], path: Path, final: dict[str, tuple[int, float]] | None = None) -> Path:
    """Each unit's validation accuracy (best so far) at each rung, a line per unit that ends
    with a cross where it was stopped, and each rung's cutoff (the lowest score that went on).
    `final`: label -> (epochs run, best validation accuracy) of the units that went on to the end."""
    fig = Figure(figsize=(6.5, 3.6))
    ax = fig.subplots()
    stopped = {s["variant"]: r["rung"] for r in rungs for s in r["stops"]}
    labels = list(dict.fromkeys(label for r in rungs for label in r.get("units", {})))
    for i, label in enumerate(labels):
        head, _, seed = label.rpartition("-s")  # a repeat's label is <variant>-s<seed>
        variant = head if head and seed.isdigit() and label not in stopped else label
        points = [(r["epoch"], r["units"][label]) for r in rungs if r.get("units", {}).get(label) is not None]
        if variant not in stopped and label in (final or {}) and final[label][1] is not None:
            points.append(final[label])
        if not points:
            continue
        colour = f"C{i % 10}"
        ax.plot(*zip(*points), "-o", color=colour, label=label, markersize=4)
        if variant in stopped:
            ax.plot(*points[-1], "x", color=colour, markersize=11, markeredgewidth=2)
    for r in rungs:
        if r["stops"]:
            cut = r["stops"][0]["cutoff"]
            ax.hlines(cut, r["epoch"] - 0.3, r["epoch"] + 0.3, colors="black", linestyles="dashed")
            ax.annotate(f"cutoff {cut:.3f}", (r["epoch"] + 0.32, cut), fontsize=7, va="center")
    ticks = {r["epoch"]: f"rung {r['rung']}\nepoch {r['epoch']}" for r in rungs}
    ticks.update({e: f"end\nepoch {e}" for e, _ in (final or {}).values() if e not in ticks})
    ax.set_xticks(list(ticks), list(ticks.values()))
    ax.set_ylabel("validation accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    save_png(fig, path)
    return path


def halving_lines(manifest: dict) -> list[str]:
    """The rungs and the budget in sentences (absent when the run had neither)."""
    lines = []
    halving, budget = manifest.get("halving"), manifest.get("budget")
    if halving:
        lines += ["## Successive halving", "",
                  f"Rungs at {', '.join(str(r['epoch']) for r in halving['rungs']) or 'no epoch'} "
                  f"(first rung {halving['min_epochs']} epoch(s), factor {halving['factor']}).", ""]
        for r in halving["rungs"]:
            lines.append(f"- Rung {r['rung']} (epoch {r['epoch']}): {', '.join(r['kept'])} went on.")
            lines += [f"  - {s['sentence']}." for s in r["stops"]]
        lines.append("")
    if budget:
        ended = (f"it stopped {', '.join(budget['stopped'])}" if budget["ended_run"] else "no unit was stopped by it")
        lines += [f"Budget: {budget['used_s']:.1f} of {budget['limit_s']:.1f} device seconds used "
                  f"({budget['gpu_hours']:g} GPU hours); {ended}.", ""]
    return lines


def variants_table(variants: list[dict], selected: str | None) -> list[dict]:
    """One row per variant for the UI's table and the report: the mean and interval
    decide, the other numbers are the best repeat's."""
    def r(x, n=4):
        return None if x is None else round(x, n)

    def interval(ci):
        return "" if not ci else f"{ci[0]:.4f} to {ci[1]:.4f}"

    return [{"variant": v["name"], "selected": v["name"] == selected, "status": shown_status(v),
             "repeats": len(v.get("repeats") or [None]), "val_accuracy_mean": r(v.get("val_accuracy_mean")),
             "val_accuracy_95": interval(v.get("val_accuracy_ci")),
             "attempts": v.get("attempts", 1), "epochs_run": v.get("epochs_run"), "best_epoch": v.get("best_epoch"),
             "val_loss": r(v.get("val_loss")), "val_accuracy": r(v.get("val_accuracy")),
             "seconds": r(v.get("seconds"), 1), "note": v.get("error") or ""} for v in variants]


def render_markdown(manifest: dict, links: dict[str, str], folder: str | None = None,
                    images: dict[str, str] | None = None) -> str:
    """The report for the Prefect UI (presigned `links`, data-URI `images`) or for
    report.md (relative ones: nothing that expires or signs). `images` maps
    REPORT_IMAGES' names to where each is shown from; one left out is not shown."""
    if images is None:
        images = {name: name for name in {**REPORT_IMAGES, **(HALVING_IMAGES if manifest.get("halving") else {})}}

    def image(name: str) -> list[str]:
        return [f"![{TITLES[name]}]({images[name]})", ""] if name in images else []

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
        *([f"**Regression**: {manifest['regression']['sentence']}.", ""] if manifest.get("regression") else []),
        *image(TREND_PLOT),
        "## Variants (validation)",
        "",
        *image(CURVES),
        *image(VARIANTS),
        pd.DataFrame(rows).to_markdown(index=False) if rows else "",
        "",
        *([f"Selected against the runner-up on the same validation images: {comparison['sentence']}.", ""]
          if comparison else []),
        *halving_lines(manifest),
        *(image(RUNGS_PLOT) if manifest.get("halving") else []),
        "## Per-class test accuracy",
        "",
        pd.DataFrame({"class": list(t["per_class"]), "accuracy": [round(a, 4) for a in t["per_class"].values()]}
                     ).to_markdown(index=False),
        "",
        *image(CONFUSION),
        *changed_lines(manifest),
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


def _short(value) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 80 else text[:77] + "..."


def changed_lines(manifest: dict) -> list[str]:
    """What changed since the champion's run, by fingerprint part (run/fingerprint.py)."""
    fp, changed = manifest.get("fingerprint"), manifest.get("changed_since_champion")
    if not fp:
        return []
    head = f"Fingerprint `{fp['digest'][:12]}`"
    champion = manifest.get("fingerprint_compared_with")
    if changed is None or champion is None:
        return [f"{head}; no champion to compare it with.", ""]
    if not changed:
        return [f"{head}: the same as the champion's run `{champion}` (trained anyway: force).", ""]
    lines = [f"{head}. Changed since the champion's run `{champion}`:", ""]
    for part, both in changed.items():
        lines.append(f"- **{part}**: champion {_short(both['champion'])}, now {_short(both['now'])}")
    return [*lines, ""]


def render_skipped(record: dict, uri: str) -> str:
    """The UI's page of a run that trained nothing: what it matched."""
    m = record["matched"]
    what = "the champion's run" if m["why"] == "champion" else "the run that claimed this scheduled night"
    return "\n".join([
        f"# train-cifar run `{record['run_id']}`: skipped",
        "",
        f"Nothing that decides the model changed since {what}: nothing was trained.",
        "",
        "| matched run | its date | fingerprint digest |",
        "|---|---|---|",
        f"| `{m['run_id']}` | {m['created_at'] or 'unknown'} | `{record['digest']}` |",
        "",
        f"Record: `{uri}`. Run with `force=true` to train anyway.",
        "",
    ])
