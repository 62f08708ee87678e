"""Checks of the data before any training: class balance, exact and near duplicates,
blank images, labels outside the class list. Pure torch/numpy; tasks/data_checks.py
runs them in the flow.

Near-duplicates between train and validation/test are found in two steps, both
batched on the run's device: candidates by cosine similarity of shift-tolerant
features (the low-frequency magnitude spectrum of the blurred, standardised
grayscale image), the top `NEAR_CANDIDATES` train images per query;
then confirmed by the normalised correlation of the blurred grayscale images,
the best over shifts of up to `MAX_SHIFT` pixels, at least `NEAR_CORRELATION`.
Standardising makes both steps blind to brightness and contrast; the blur, to
JPEG's blocks and noise.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cnn.data import DataError, Splits

BLANK_STD = 1.0  # per-image pixel std (0..255) below which an image is blank: no real photo is that flat
MAX_SHIFT = 2
NEAR_CORRELATION = 0.995  # 0.99 flagged 0.6% of clean synthetic images (benchmarks/data_checks.py)
NEAR_CANDIDATES = 16
MAX_EXAMPLES = 10
# A change to what the checks compute changes this, so that no memoised result of an older
# version is reused (tasks/data_checks.py).
VERSION = 1


class DataCheckFailed(DataError):
    """The data failed a check: the run stops before training."""


@dataclass(frozen=True)
class Thresholds:
    class_balance_tolerance: float  # binomial standard deviations a class count may stray
    max_blank_images: int
    max_exact_duplicates: int
    max_near_duplicates: float  # fraction of validation + test images with a near-duplicate in train


@dataclass(frozen=True)
class NearPair:
    split: str  # val or test
    index: int  # in that split
    train_index: int
    correlation: float


def _check(name: str, count: int | float, threshold: int | float, passed: bool, examples: list, **extra) -> dict:
    return {"name": name, "count": count, "threshold": threshold, "passed": bool(passed), "examples": examples,
            **extra}


def _split_tensors(splits: Splits) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {"train": (splits.train_x, splits.train_y), "val": (splits.val_x, splits.val_y),
            "test": (splits.test_x, splits.test_y)}


# -- class balance ----------------------------------------------------------------------

def class_balance(splits: Splits, tolerance: float) -> dict:
    """Each split's count per class within `tolerance` binomial standard deviations of an
    equal share; a class with no training image fails whatever the tolerance."""
    k = len(splits.classes)
    examples, per_class = [], {}
    for split, (_, y) in _split_tensors(splits).items():
        n = len(y)
        counts = torch.bincount(y[(y >= 0) & (y < k)], minlength=k)[:k].tolist()
        per_class[split] = counts
        expected = n / k
        allowed = tolerance * math.sqrt(n * (1 / k) * (1 - 1 / k))
        for c, got in enumerate(counts):
            missing = split == "train" and got == 0
            if missing or abs(got - expected) > allowed:
                examples.append({"split": split, "class": splits.classes[c], "count": got,
                                 "expected": round(expected, 1),
                                 "allowed": [max(0, math.ceil(expected - allowed)), math.floor(expected + allowed)],
                                 **({"missing": True} if missing else {})})
    return _check("class_balance", len(examples), tolerance, not examples, examples, per_class=per_class)


# -- exact duplicates -------------------------------------------------------------------

def image_digests(x: torch.Tensor) -> list[bytes]:
    """A 128-bit digest of each image's bytes."""
    rows = x.reshape(len(x), -1).contiguous().numpy()
    return [hashlib.blake2b(r.tobytes(), digest_size=16).digest() for r in rows]


def exact_duplicates(splits: Splits, threshold: int) -> dict:
    """Images whose bytes equal an earlier image's, within and across splits (train, then
    val, then test): the count is the copies beyond the first of each."""
    first: dict[bytes, tuple[str, int, int]] = {}
    examples, count = [], 0
    for split, (x, y) in _split_tensors(splits).items():
        for i, d in enumerate(image_digests(x)):
            if d in first:
                count += 1
                if len(examples) < MAX_EXAMPLES:
                    s0, i0, y0 = first[d]
                    examples.append({"split": split, "index": i, "label": int(y[i]), "same_as_split": s0,
                                     "same_as_index": i0, "same_as_label": y0})
            else:
                first[d] = (split, i, int(y[i]))
    return _check("exact_duplicates", count, threshold, count <= threshold, examples)


# -- near duplicates ----------------------------------------------------------------------

_GRAY = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
_BLUR = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0]) / 16


def blurred_gray(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """(N, 32, 32) float32: grayscale, 5x5 binomial blur (replicated edges), as sums of
    shifted slices (cheaper on a CPU than a one-channel convolution)."""
    g = torch.einsum("nchw,c->nhw", x.to(device, torch.float32), _GRAY.to(device).flatten())
    g = F.pad(g[:, None], (2, 2, 2, 2), mode="replicate")[:, 0]
    w = _BLUR.tolist()
    g = sum(w[i] * g[:, :, i:i + 32] for i in range(5))
    return sum(w[i] * g[:, i:i + 32, :] for i in range(5))


def _standardise(v: torch.Tensor) -> torch.Tensor:
    v = v - v.mean(-1, keepdim=True)
    return v / v.norm(dim=-1, keepdim=True).clamp_min(1e-6)


def candidate_features(g: torch.Tensor) -> torch.Tensor:
    """(N, D) unit vectors, nearly unchanged by a shift of 1-2 px (the magnitude spectrum
    ignores where things are), brightness and contrast (the image is standardised first):
    the lowest 8 frequencies each way of the magnitude spectrum, without its DC term."""
    n = len(g)
    spec = torch.fft.rfft2(_standardise(g.reshape(n, -1)).view(n, 32, 32)).abs()
    low = torch.cat([spec[:, :8, :8], spec[:, -7:, :8]], dim=1).reshape(n, -1)[:, 1:]
    return _standardise(low)


def shift_correlation(q: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Best normalised correlation of each query's centre (32 - 2 * MAX_SHIFT)^2 with the
    same-sized windows of its candidate at every shift: q (M, 32, 32), c (M, 32, 32) -> (M,).
    Each window's norm from integral images; its dot product one shift at a time (an
    unfolded (M, 25, 784) copy cost more in memory traffic on the 2-core CPU)."""
    s, size = MAX_SHIFT, 32 - 2 * MAX_SHIFT
    m, area, n = len(q), size * size, 2 * s + 1
    qc = _standardise(q[:, s:s + size, s:s + size].reshape(m, -1)).view(m, size, size)

    def box(v: torch.Tensor) -> torch.Tensor:  # the sum of every size x size window, (M, n, n)
        ii = F.pad(v.double().cumsum(1).cumsum(2), (1, 0, 1, 0))
        return (ii[:, size:, size:] - ii[:, :-size, size:] - ii[:, size:, :-size] + ii[:, :-size, :-size]).float()

    total = box(c)
    norm = (box(c * c) - total * total / area).clamp_min(1e-6).sqrt()
    # qc sums to 0, so a window's mean drops out of the dot product
    dots = torch.stack([(qc * c[:, dy:dy + size, dx:dx + size]).sum((1, 2)) for dy in range(n) for dx in range(n)], 1)
    return (dots / norm.reshape(m, -1)).amax(1)


def near_duplicates(train_x: torch.Tensor, query_x: torch.Tensor, device: torch.device,
                    correlation: float = NEAR_CORRELATION, k: int = NEAR_CANDIDATES,
                    chunk: int = 1024) -> list[tuple[int, int, float]]:
    """(query index, train index, correlation) of each query image with a near-duplicate in
    train: its best confirmed match."""
    if len(train_x) == 0 or len(query_x) == 0:
        return []
    k = min(k, len(train_x))
    train_g = torch.cat([blurred_gray(train_x[i:i + 4096], device) for i in range(0, len(train_x), 4096)])
    train_f = candidate_features(train_g)
    found = []
    for start in range(0, len(query_x), chunk):
        qg = blurred_gray(query_x[start:start + chunk], device)
        top = (candidate_features(qg) @ train_f.T).topk(k, dim=1).indices  # (m, k)
        q_idx = torch.arange(len(qg), device=device).repeat_interleave(k)
        t_idx = top.reshape(-1)
        corr = torch.cat([shift_correlation(qg[q_idx[i:i + 4096]], train_g[t_idx[i:i + 4096]])
                          for i in range(0, len(q_idx), 4096)])
        best: dict[int, tuple[int, float]] = {}
        for q, t, c in zip(q_idx.tolist(), t_idx.tolist(), corr.tolist()):
            if c >= correlation and c > best.get(q, (0, -1.0))[1]:
                best[q] = (t, c)
        found += [(start + q, t, c) for q, (t, c) in sorted(best.items())]
    return found


def near_duplicate_pairs(splits: Splits, device: torch.device) -> list[NearPair]:
    """Validation and test images with a near-duplicate in train, worst (most alike) first;
    train's features computed once for both."""
    n_val = len(splits.val_x)
    found = near_duplicates(splits.train_x, torch.cat([splits.val_x, splits.test_x]), device)
    pairs = [NearPair("val", i, j, c) if i < n_val else NearPair("test", i - n_val, j, c) for i, j, c in found]
    return sorted(pairs, key=lambda p: (-p.correlation, p.split, p.index))


def holdout_near_duplicates(train_x: torch.Tensor, holdout_x: torch.Tensor, device: torch.device) -> list[int]:
    """Sorted indices into the whole hold-out (before its split into validation and test)
    of the images with a near-duplicate among all of `train_x` (not a subset's): what
    purge_test_duplicates drops, the same whatever the split seed or subset."""
    return sorted({q for q, _, _ in near_duplicates(train_x, holdout_x, device)})


def near_duplicates_check(splits: Splits, pairs: list[NearPair], threshold: float,
                          purged: list[int] | None = None) -> dict:
    """With `purged` (purge_test_duplicates on), the near-duplicates are still counted but
    pass whatever their number: the hold-out images in `purged` are dropped before the split."""
    n = len(splits.val_y) + len(splits.test_y)
    fraction = len(pairs) / n if n else 0.0
    examples = [{"split": p.split, "index": p.index, "label": int(_labels(splits, p.split)[p.index]),
                 "train_index": p.train_index, "train_label": int(splits.train_y[p.train_index]),
                 "correlation": round(p.correlation, 4)} for p in pairs[:MAX_EXAMPLES]]
    by_split = {s: sum(p.split == s for p in pairs) for s in ("val", "test")}
    if purged is None:
        return _check("near_duplicates", len(pairs), threshold, fraction <= threshold, examples,
                      fraction=round(fraction, 6), by_split=by_split)
    return _check("near_duplicates", len(pairs), threshold, True, examples, fraction=round(fraction, 6),
                  by_split=by_split, purged=list(purged))


def _labels(splits: Splits, split: str) -> torch.Tensor:
    return _split_tensors(splits)[split][1]


# -- blank images and labels ---------------------------------------------------------------

def blank_images(splits: Splits, threshold: int) -> dict:
    """Images whose pixel standard deviation is below BLANK_STD (constant, or nearly)."""
    examples, count = [], 0
    for split, (x, y) in _split_tensors(splits).items():
        flat = x.reshape(len(x), -1)
        std = torch.cat([flat[i:i + 4096].float().std(1) for i in range(0, len(x), 4096)] or [torch.zeros(0)])
        idx = torch.nonzero(std < BLANK_STD).flatten().tolist()
        count += len(idx)
        examples += [{"split": split, "index": i, "label": int(y[i]), "std": round(float(std[i]), 3)}
                     for i in idx[:MAX_EXAMPLES - len(examples)]]
    return _check("blank_images", count, threshold, count <= threshold, examples)


def labels_outside_classes(splits: Splits) -> dict:
    """Labels that name no class: none may."""
    k = len(splits.classes)
    examples, count = [], 0
    for split, (_, y) in _split_tensors(splits).items():
        idx = torch.nonzero((y < 0) | (y >= k)).flatten().tolist()
        count += len(idx)
        examples += [{"split": split, "index": i, "label": int(y[i])} for i in idx[:MAX_EXAMPLES - len(examples)]]
    return _check("labels_outside_classes", count, 0, count == 0, examples, classes=k)


# -- all of them ------------------------------------------------------------------------

def digest(checks: list[dict]) -> str:
    return hashlib.sha256(json.dumps(checks, sort_keys=True).encode()).hexdigest()


def run_checks(splits: Splits, thresholds: Thresholds, device: torch.device | str = "cpu",
               purged: list[int] | None = None) -> tuple[dict, list[NearPair]]:
    """The record {checks, passed, digest} and every near-duplicate pair (worst first).
    With `purged` (the hold-out indices purge_test_duplicates drops, holdout_near_duplicates),
    the near-duplicate check passes and records them, and so does the record, as `purged`."""
    device = torch.device(device)
    pairs = near_duplicate_pairs(splits, device)
    checks = [
        labels_outside_classes(splits),
        class_balance(splits, thresholds.class_balance_tolerance),
        blank_images(splits, thresholds.max_blank_images),
        exact_duplicates(splits, thresholds.max_exact_duplicates),
        near_duplicates_check(splits, pairs, thresholds.max_near_duplicates, purged),
    ]
    record = {"checks": checks, "passed": all(c["passed"] for c in checks), "digest": digest(checks)}
    if purged is not None:
        record["purged"] = list(purged)
    return record, pairs


def failure(record: dict) -> DataCheckFailed | None:
    """The error naming each failed check, its count and threshold; None if all passed."""
    failed = [c for c in record["checks"] if not c["passed"]]
    if not failed:
        return None
    what = {"class_balance": "class counts outside {t:g} binomial standard deviations (or a class missing "
                             "from train)",
            "blank_images": "blank images, more than max_blank_images {t}",
            "exact_duplicates": "exact duplicate images, more than max_exact_duplicates {t}",
            "near_duplicates": "validation/test images with a near-duplicate in train ({f:.2%}), more than "
                               "max_near_duplicates {t:.2%}",
            "labels_outside_classes": "labels outside the {k} classes, more than {t}"}
    parts = [f"{c['name']}: {c['count']} " + what[c["name"]].format(t=c["threshold"], f=c.get("fraction", 0),
                                                                       k=c.get("classes"))
             for c in failed]
    return DataCheckFailed("data check(s) failed before training: " + "; ".join(parts)
                           + ". Fix the data, or raise the threshold if this is expected")
