"""Is the winner really better? Intervals and paired comparisons on per-image outcomes.

`correct[r, i]` is True when repeat r classified image i right at its best epoch.
Comparisons are paired: both sides were scored on the same images, so an image easy
(or hard) for both cancels out. Accuracies are fractions; sentences print points.

Method ("analytic"): repeats and images are crossed, so both sources of variation are
measured, as in a two-way random-effects layout (R repeats, n images):

    image part = s2(per-image value) / n - MS_interaction / (n R)     (n - 1 df)
    seed part  = s2(per-repeat accuracy) / R                          (R - 1 df)

The interaction is subtracted once because the seed part counts it too; for a
difference the seed part is pooled over both sides (the same recipe spreads alike).
The interval is estimate +/- sqrt(t_image^2 * image part + t_seed^2 * seed part)
(Banerjee 1960), erring wide: 2 repeats barely measure the seed spread. Pseudo-images
widen it when a handful of images decide: one each way for a difference (Bonett & Price
2012), z^2/2 right and wrong for one accuracy (Agresti & Coull 1998).

The percentile bootstrap (method="bootstrap", kept to cross-check) is too narrow: it
calls 4 wins to 0 losses a difference (an exact sign test needs 6, as does this
interval), and with 2 repeats it has 87% coverage where this interval keeps 94-95%.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

METHODS = ("analytic", "bootstrap")


@dataclass(frozen=True)
class Comparison:
    """A minus B on the same images, in accuracy fractions."""

    difference: float
    ci: tuple[float, float]
    distinguishable: bool  # the interval excludes 0
    method: str
    level: float
    n_images: int


@dataclass(frozen=True)
class Verdict:
    """Whether a new model replaces the champion, and the plain sentence why."""

    promoted: bool
    difference: float  # new minus champion, accuracy fraction
    ci: tuple[float, float]
    method: str
    reason: str


def variant_interval(correct: np.ndarray, rng_seed: int = 0, n_boot: int = 2000, level: float = 0.95,
                     method: str = "analytic") -> tuple[float, float, float]:
    """(mean accuracy over repeats, low, high); `rng_seed` and `n_boot` are for the bootstrap."""
    c = _outcomes(correct, "correct")
    _check_level(level)
    mean = float(c.mean())
    if method == "bootstrap":
        low, high = _bootstrap(c, None, rng_seed, n_boot, level)
    elif method == "analytic":
        z2 = _normal_quantile(level) ** 2
        low, high = _analytic(mean, c.mean(0), [c], level, pseudo=((1.0, z2 / 2), (0.0, z2 / 2)))
    else:
        raise ValueError(f"method: expected one of {METHODS}, found {method!r}")
    return mean, max(low, 0.0), min(high, 1.0)


def paired_difference(correct_a: np.ndarray, correct_b: np.ndarray, rng_seed: int = 0, n_boot: int = 2000,
                      level: float = 0.95, method: str = "analytic") -> Comparison:
    """A's accuracy minus B's, each the mean over its repeats; column i is the same image on both sides."""
    a, b = _outcomes(correct_a, "correct_a"), _outcomes(correct_b, "correct_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"correct_a and correct_b must score the same images: found {a.shape[1]} and "
                         f"{b.shape[1]} images")
    _check_level(level)
    n = a.shape[1]
    difference = float(a.mean() - b.mean())
    repeats = f"{a.shape[0]}x{b.shape[0]} repeats"
    if method == "bootstrap":
        low, high = _bootstrap(a, b, rng_seed, n_boot, level)
        label = f"paired bootstrap over {n:,} images and {repeats}, {n_boot} draws, {level:.0%}"
    elif method == "analytic":
        low, high = _analytic(difference, a.mean(0) - b.mean(0), [a, b], level, pseudo=((1.0, 1.0), (-1.0, 1.0)))
        label = f"paired t interval over {n:,} images and {repeats} (image and seed variance), {level:.0%}"
    else:
        raise ValueError(f"method: expected one of {METHODS}, found {method!r}")
    return Comparison(difference, (low, high), bool(low > 0 or high < 0), label, level, n)


def promotion(correct_new: np.ndarray, correct_champion: np.ndarray, confidence: float, margin: float,
              rng_seed: int = 0, champion_run: str | None = None, method: str = "analytic") -> Verdict:
    """Promote only when the interval's lower bound beats the champion by more than `margin`;
    with `confidence` 0 the interval is the point estimate."""
    _check_level(confidence, "confidence")
    if margin < 0:
        raise ValueError(f"margin: expected an accuracy fraction >= 0, found {margin!r}")
    new, old = (np.asarray(x) for x in (correct_new, correct_champion))
    for name, x in (("correct_new", new), ("correct_champion", old)):
        if x.ndim != 1:
            raise ValueError(f"{name}: expected one (n,) bool array over the test images, found shape {x.shape}")
    c = paired_difference(new[None], old[None], rng_seed, level=confidence, method=method)
    promoted = c.ci[0] > margin
    gap = _gap("new model", f"champion {champion_run}" if champion_run else "the champion", c.difference)
    where = f"on {c.n_images:,} test images"
    if confidence == 0:
        tail = "promoted" if promoted else "not promoted"
        reason = f"{gap} {where}: {tail} (needs more than {_points(margin)}; confidence 0 compares the point estimates)"
    else:
        tail = "promoted" if promoted else "not enough to promote"
        reason = (f"{gap} ({_interval(c)}) {where}: {tail} "
                  f"(needs the lower bound above {_points(margin)})")
    return Verdict(bool(promoted), c.difference, c.ci, c.method, reason)


def accuracy_interval(accuracy: float, n: int, level: float = 0.95) -> tuple[float, float]:
    """One model's test accuracy on n images, when only the fraction is kept (a trend's
    nights): the Agresti-Coull interval, z^2/2 pseudo-images right and wrong."""
    _check_level(level)
    if not 0 <= accuracy <= 1 or n < 1:
        raise ValueError(f"accuracy {accuracy!r} of n {n!r} images: expected a fraction and n >= 1")
    z2 = _normal_quantile(level) ** 2
    centre = (accuracy * n + z2 / 2) / (n + z2)
    half = (z2 * centre * (1 - centre) / (n + z2)) ** 0.5
    return max(0.0, centre - half), min(1.0, centre + half)


def sentence(selected: str, runner_up: str, comparison: Comparison, n_images: int | None = None) -> str:
    """The report's plain sentence for `selected` minus `runner_up`."""
    n = comparison.n_images if n_images is None else n_images
    if n != comparison.n_images:
        raise ValueError(f"n_images: the comparison was made on {comparison.n_images:,} images, found {n:,}")
    head = f"{_gap(selected, runner_up, comparison.difference)} ({_interval(comparison)})"
    if comparison.distinguishable:
        return f"{head}: distinguishable on {n:,} images"
    return f"{head}: not distinguishable on {n:,} images; more repeats or more data would decide"


def _analytic(centre: float, per_image: np.ndarray, sides: list[np.ndarray], level: float,
              pseudo: tuple[tuple[float, float], ...]) -> tuple[float, float]:
    """`sides` are the (R, n) outcomes behind `per_image`, each image's part of the estimate."""
    n = len(per_image)
    seed_var, seed_df, interaction = _seed_part(sides)
    image_var = max(0.0, _image_variance(per_image, pseudo) - interaction)
    t_seeds = _t_quantile(level, seed_df) if seed_df else 0.0
    half = (_t_quantile(level, max(n - 1, 1)) ** 2 * image_var + t_seeds**2 * seed_var) ** 0.5
    return centre - half, centre + half


def _image_variance(values: np.ndarray, pseudo: tuple[tuple[float, float], ...]) -> float:
    """With (value, weight) pseudo-images, so a handful of deciding images cannot give a near-zero width."""
    w = np.array([p[1] for p in pseudo])
    v = np.array([p[0] for p in pseudo])
    total = len(values) + w.sum()
    mean = (values.sum() + (w * v).sum()) / total
    var = ((values - mean) ** 2).sum() + (w * (v - mean) ** 2).sum()
    return float(var / total / total)


def _seed_part(sides: list[np.ndarray]) -> tuple[float, int, float]:
    """(seed variance, its degrees of freedom, the repeat x image interaction); pooled, 2 + 2
    repeats give 2 degrees of freedom and a side with one repeat still counts its seed's luck."""
    spreads, dfs, interaction = [], [], 0.0
    for c in sides:
        r, n = c.shape
        if r < 2:
            continue
        y = c.astype(np.float64)
        per_repeat, per_image = y.mean(1), y.mean(0)
        resid = y - per_repeat[:, None] - per_image[None, :] + y.mean()
        interaction += (resid**2).sum() / ((r - 1) * max(n - 1, 1)) / (n * r)
        spreads.append(per_repeat.var(ddof=1))
        dfs.append(r - 1)
    if not dfs:
        return 0.0, 0, 0.0
    pooled = float(np.dot(spreads, dfs) / sum(dfs))
    return pooled * sum(1 / c.shape[0] for c in sides), sum(dfs), interaction


def _normal_quantile(level: float) -> float:
    """Two-sided: 1.96 for 0.95; 0 for level 0."""
    return NormalDist().inv_cdf(0.5 + level / 2)


@functools.lru_cache(maxsize=256)
def _t_quantile(level: float, df: float) -> float:
    """Two-sided Student t quantile. With T = sqrt(df) tan(theta), theta's density is
    cos(theta)^(df - 1), bounded for df >= 1: a fine grid is within 1e-4 of exact."""
    if df > 1e4:  # within 1e-4 of the normal; the grid below is too coarse for its narrow peak
        return _normal_quantile(level)
    theta = np.linspace(0.0, np.pi / 2, 20_001)
    density = np.cos(theta) ** (max(df, 1.0) - 1)
    cdf = np.concatenate([[0.0], np.cumsum((density[1:] + density[:-1]) / 2)])
    angle = np.interp(level * cdf[-1], cdf, theta)
    return float(df**0.5 * np.tan(angle))


def _bootstrap(a: np.ndarray, b: np.ndarray | None, rng_seed: int, n_boot: int, level: float) -> tuple[float, float]:
    """Resamples images (the same for every repeat and both sides) and each side's repeats."""
    if n_boot < 1:
        raise ValueError(f"n_boot: expected a number of draws >= 1, found {n_boot!r}")
    sides = [a] if b is None else [a, b]
    point = float(a.mean() - (b.mean() if b is not None else 0.0))
    if level == 0:
        return point, point
    rng = np.random.default_rng(rng_seed)
    n = a.shape[1]
    # an image is its column of outcomes over all repeats; there are few distinct
    # columns, so resampling n images is one multinomial draw over the columns
    columns, counts = np.unique(np.concatenate(sides).T, axis=0, return_counts=True)
    draws = rng.multinomial(n, counts / n, size=n_boot)
    acc = draws @ columns.astype(np.float64) / n
    means, start = [], 0
    for c in sides:
        picks = rng.integers(0, c.shape[0], (n_boot, c.shape[0]))
        means.append(np.take_along_axis(acc[:, start : start + c.shape[0]], picks, 1).mean(1))
        start += c.shape[0]
    stats = means[0] - (means[1] if b is not None else 0.0)
    low, high = np.quantile(stats, [0.5 - level / 2, 0.5 + level / 2])
    return float(low), float(high)


def _outcomes(x: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype != bool or x.ndim != 2 or x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"{name}: expected a (repeats, images) bool array with at least one of each, "
                         f"found dtype {x.dtype} shape {x.shape}")
    return x


def _check_level(level: float, name: str = "level") -> None:
    if not 0 <= level < 1:
        raise ValueError(f"{name}: expected a confidence in [0, 1) such as 0.95, found {level!r}")


def _points(fraction: float) -> str:
    return f"{fraction * 100:+.2f} points"


def _gap(first: str, second: str, difference: float) -> str:
    """'a beats b by +0.42 points', 'a trails b by 0.10 points', 'a ties with b'."""
    if difference > 0:
        return f"{first} beats {second} by {_points(difference)}"
    if difference < 0:
        return f"{first} trails {second} by {-difference * 100:.2f} points"
    return f"{first} ties with {second}"


def _interval(c: Comparison) -> str:
    if c.level == 0:
        return "no interval: confidence 0"
    return f"{c.level:.0%} interval {c.ci[0] * 100:+.2f} to {c.ci[1] * 100:+.2f}"
