"""Intervals and paired comparisons: calibrated on simulated models whose truth is known."""
from __future__ import annotations

import numpy as np
import pytest

from cnn.stats import Comparison, paired_difference, promotion, sentence, variant_interval


def simulate(rng, n: int, accuracies: tuple[float, ...], repeats: tuple[int, ...], seed_sd: float):
    """Per-image outcomes (R, n) bool for models whose expected accuracy is known exactly.

    Image i has a difficulty u_i ~ U(0, 1), shared by every model (so most images are
    right for both, as with real networks). A repeat's seed moves its threshold
    t = accuracy + N(0, seed_sd) and adds per-image noise v ~ U(-0.05, 0.05);
    the image is right when u_i + v < t, which happens with probability t - v,
    so the expected accuracy over seeds and images is `accuracy` itself."""
    u = rng.random(n)
    out = []
    for accuracy, r in zip(accuracies, repeats):
        t = accuracy + rng.normal(0.0, seed_sd, (r, 1))
        out.append(u[None, :] + rng.uniform(-0.05, 0.05, (r, n)) < t)
    return out


def coverage(truth: float, intervals: list[tuple[float, float]]) -> float:
    return float(np.mean([low <= truth <= high for low, high in intervals]))


@pytest.mark.parametrize("repeats, seed_sd", [((1, 1), 0.0), ((2, 2), 0.003)])
def test_paired_interval_covers_the_true_difference_95_percent_of_the_time(repeats, seed_sd):
    # 0.905 vs 0.900 on 3,500 shared images; with 2 + 2 repeats the seeds add a spread
    # of 0.3 points, the same order as the images' (the hard case for 2 repeats)
    rng = np.random.default_rng(2024)
    cis = []
    for k in range(1000):
        a, b = simulate(rng, 3500, (0.905, 0.900), repeats, seed_sd)
        cis.append(paired_difference(a, b, rng_seed=k).ci)
    assert 0.92 <= coverage(0.005, cis) <= 0.98


def test_a_handful_of_wins_decides_as_the_exact_sign_test_does():
    # k images right for A and wrong for B, none the other way: the two-sided exact
    # sign test's p is 2 * 0.5**k, below 0.05 from k = 6 on
    rng = np.random.default_rng(4)
    b = rng.random(3500) < 0.9
    for k in range(0, 11):
        a = b.copy()
        a[np.flatnonzero(~b)[:k]] = True
        assert paired_difference(a[None], b[None]).distinguishable == (2 * 0.5**k < 0.05), k


def test_a_model_against_itself_is_never_distinguishable():
    for seed in range(6):
        rng = np.random.default_rng(seed)
        x = rng.random((1 + seed % 3, 500)) < 0.9
        for method in ("analytic", "bootstrap"):
            c = paired_difference(x, x, rng_seed=seed, n_boot=200, method=method)
            assert c.difference == 0.0 and not c.distinguishable
            assert c.ci[0] <= 0.0 <= c.ci[1]


def test_variant_interval_mean_is_the_mean_over_repeats_and_covers_the_truth():
    rng = np.random.default_rng(7)
    (x,) = simulate(rng, 6500, (0.93,), (3,), 0.002)
    mean, low, high = variant_interval(x, rng_seed=0)
    assert mean == pytest.approx(np.mean([row.mean() for row in x]))
    assert low < mean < high

    cis = [variant_interval(simulate(rng, 2000, (0.93,), (3,), 0.002)[0])[1:] for _ in range(300)]
    assert 0.90 <= coverage(0.93, cis) <= 0.99


def test_variant_interval_bootstrap_is_reproducible_and_agrees_with_the_analytic_one():
    rng = np.random.default_rng(3)
    (x,) = simulate(rng, 6500, (0.9,), (1,), 0.0)
    first = variant_interval(x, rng_seed=11, n_boot=2000, method="bootstrap")
    assert variant_interval(x, rng_seed=11, n_boot=2000, method="bootstrap") == first
    assert variant_interval(x, rng_seed=12, n_boot=2000, method="bootstrap") != first
    # one repeat: an image bootstrap of a proportion, about +/- 1.96 sqrt(p (1 - p) / n)
    _, low, high = variant_interval(x, method="analytic")
    p = x.mean()
    assert high - low == pytest.approx(2 * 1.96 * np.sqrt(p * (1 - p) / 6500), rel=0.02)
    assert first[2] - first[1] == pytest.approx(high - low, rel=0.1)


def test_paired_bootstrap_is_fast_and_close_to_the_analytic_interval():
    import time

    rng = np.random.default_rng(5)
    a, b = simulate(rng, 6500, (0.905, 0.900), (4, 4), 0.0)
    start = time.perf_counter()
    boot = paired_difference(a, b, rng_seed=1, n_boot=2000, method="bootstrap")
    assert time.perf_counter() - start < 1.0  # 6,500 images x 4 + 4 repeats x 2000 draws
    analytic = paired_difference(a, b)
    assert boot.difference == analytic.difference
    # resampling repeats and images both counts their interaction twice (Owen 2007):
    # the bootstrap errs wide here, where 4 repeats differ on many images
    width = analytic.ci[1] - analytic.ci[0]
    assert width <= boot.ci[1] - boot.ci[0] <= 1.6 * width


def test_a_handful_of_images_is_not_enough_to_promote_but_five_points_is():
    rng = np.random.default_rng(1)
    champion = rng.random(3500) < 0.9
    new = champion.copy()
    new[np.flatnonzero(~champion)[:5]] = True  # right on 5 images the champion missed, wrong on none more
    held = promotion(new, champion, confidence=0.95, margin=0.0, champion_run="20261201-abc")
    assert not held.promoted and held.difference == pytest.approx(5 / 3500)
    assert held.ci[0] <= 0.0 < held.ci[1]
    assert held.reason == ("new model beats champion 20261201-abc by +0.14 points (95% interval "
                           f"{held.ci[0] * 100:+.2f} to {held.ci[1] * 100:+.2f}) on 3,500 test images: "
                           "not enough to promote (needs the lower bound above +0.00 points)")
    old_rule = promotion(new, champion, confidence=0.0, margin=0.0)
    assert old_rule.promoted and old_rule.ci == (old_rule.difference, old_rule.difference)
    assert not promotion(champion, champion, confidence=0.0, margin=0.0).promoted

    better = champion.copy()
    better[np.flatnonzero(~champion)[:175]] = True  # +5 points on 3,500
    assert promotion(better, champion, confidence=0.95, margin=0.0).promoted
    assert not promotion(better, champion, confidence=0.95, margin=0.05).promoted  # the margin is a fraction


def test_sentences_say_whether_the_data_decide():
    close = Comparison(0.0042, (-0.0015, 0.0098), False, "m", 0.95, 6500)
    assert sentence("flip-crop", "flip-crop-cutout", close, 6500) == (
        "flip-crop beats flip-crop-cutout by +0.42 points (95% interval -0.15 to +0.98): "
        "not distinguishable on 6,500 images; more repeats or more data would decide")
    clear = Comparison(0.012, (0.0061, 0.0179), True, "m", 0.95, 6500)
    assert sentence("flip-crop", "none", clear) == (
        "flip-crop beats none by +1.20 points (95% interval +0.61 to +1.79): distinguishable on 6,500 images")
    behind = Comparison(-0.001, (-0.004, 0.002), False, "m", 0.95, 6500)
    assert sentence("flip", "crop", behind).startswith("flip trails crop by 0.10 points (95% interval -0.40 to +0.20)")


def test_bad_input_names_the_parameter():
    x = np.ones((2, 10), bool)
    with pytest.raises(ValueError, match="correct_a and correct_b must score the same images: found 10 and 9"):
        paired_difference(x, x[:, :9])
    with pytest.raises(ValueError, match=r"correct: expected a \(repeats, images\) bool array.*int64"):
        variant_interval(x.astype(np.int64))
    with pytest.raises(ValueError, match="confidence: expected a confidence in"):
        promotion(x[0], x[0], confidence=95, margin=0.0)
    with pytest.raises(ValueError, match="correct_new: expected one"):
        promotion(x, x, confidence=0.95, margin=0.0)
    with pytest.raises(ValueError, match="method: expected one of"):
        variant_interval(x, method="bca")
