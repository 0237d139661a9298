"""Chapter 4's statistics against hand-computed cases and printed statistical tables."""

import math

import pytest

from mctlib.stats import (area_under_curve, describe_difference, describe_interval, iterations_to_threshold, paired,
                          std_interval, successive_noise, summary_stats, t_interval, verdict)


def test_t_interval_matches_the_printed_t_table():
    # 1..5: mean 3, s = sqrt(2.5), sem = s / sqrt(5); t(0.975, 4) = 2.776 in every printed table.
    out = t_interval([1, 2, 3, 4, 5])
    assert out["n"] == 5 and out["df"] == 4
    assert out["t"] == pytest.approx(2.7764, abs=1e-4)
    half = 2.7764451 * math.sqrt(2.5) / math.sqrt(5)
    assert out["low"] == pytest.approx(3 - half, abs=1e-6) and out["high"] == pytest.approx(3 + half, abs=1e-6)
    # t(0.975, 2) = 4.303: two degrees of freedom widen the interval a lot
    assert t_interval([0.10, 0.11, 0.12])["t"] == pytest.approx(4.3027, abs=1e-4)


def test_one_value_gives_no_interval_and_nan_is_left_out():
    one = t_interval([0.3])
    assert one["n"] == 1 and math.isnan(one["low"]) and math.isnan(one["high"])
    assert summary_stats([0.1, float("nan"), 0.3])["n"] == 2
    assert summary_stats([float("nan")])["n"] == 0
    assert verdict(one, 0.01) == "no interval"
    assert "single seed" in describe_interval(one)


def test_paired_differences_by_seed_and_the_verdicts():
    a, b = {0: 1.0, 1: 2.0, 2: 3.0, 7: 9.0}, {0: 2.0, 1: 4.0, 2: 3.0, 5: 1.0}
    out = paired(a, b)  # seeds 0, 1, 2 only: differences 1, 2, 0
    assert out["seeds"] == [0, 1, 2] and out["differences"] == [1.0, 2.0, 0.0]
    assert out["mean"] == pytest.approx(1.0) and out["std"] == pytest.approx(1.0)
    half = 4.3026527 / math.sqrt(3)
    assert out["low"] == pytest.approx(1 - half, abs=1e-6) and out["high"] == pytest.approx(1 + half, abs=1e-6)
    assert verdict(out, margin=0.5) == "inconclusive"   # crosses zero and reaches past ±0.5
    assert verdict(out, margin=5.0) == "equivalent"     # (-1.48, 3.48) lies inside ±5
    up = paired({0: 0.0, 1: 0.0, 2: 0.0}, {0: 0.10, 1: 0.11, 2: 0.12})
    assert up["low"] == pytest.approx(0.11 - 4.3026527 * 0.01 / math.sqrt(3), abs=1e-9)
    assert verdict(up, 0.01) == "higher"
    down = paired({0: 0.10, 1: 0.11, 2: 0.12}, {0: 0.0, 1: 0.0, 2: 0.0})
    assert verdict(down, 0.01) == "lower"
    same = paired({0: 0.5, 1: 0.6}, {0: 0.5, 1: 0.6})
    assert verdict(same, 0.01) == "equivalent"
    assert paired({0: 1.0, 1: float("nan")}, {0: 2.0, 1: 3.0})["seeds"] == [0]


def test_describe_difference_states_the_interval_and_the_margin():
    up = paired({0: 0.0, 1: 0.0, 2: 0.0}, {0: 0.10, 1: 0.11, 2: 0.12})
    text = describe_difference(up, margin=0.01)
    assert text.startswith("+11.00 points (95 % CI +8.52 to +13.48; 3 seeds)")
    assert "excludes zero (higher)" in text
    wide = paired({0: 1.0, 1: 2.0, 2: 3.0}, {0: 2.0, 1: 4.0, 2: 3.0})
    assert "neither a difference nor an equivalence" in describe_difference(wide, margin=0.005)
    assert "margin of ±1 point," in describe_difference(wide, margin=0.01)
    assert "margin of ±2 points," in describe_difference(wide, margin=0.02)


def test_std_interval_matches_the_chi_square_table():
    # chi2(0.975, 4) = 11.143 and chi2(0.025, 4) = 0.4844 in the printed tables.
    out = std_interval([1, 2, 3, 4, 5])
    s = math.sqrt(2.5)
    assert out["std_low"] == pytest.approx(s * math.sqrt(4 / 11.1433), rel=1e-4)
    assert out["std_high"] == pytest.approx(s * math.sqrt(4 / 0.484419), rel=1e-4)
    assert math.isnan(std_interval([1.0])["std_low"])


def test_area_under_curve_by_hand():
    # trapezoids: 10 * (0.5 + 0.7) / 2 + 20 * (0.7 + 0.7) / 2 = 20, over a span of 30
    assert area_under_curve([0, 10, 30], [0.5, 0.7, 0.7]) == pytest.approx(20 / 30)
    # order of the points does not matter; a flat curve's area is its level
    assert area_under_curve([30, 0, 10], [0.7, 0.5, 0.7]) == pytest.approx(20 / 30)
    assert area_under_curve([0, 50], [0.8, 0.8]) == pytest.approx(0.8)
    with pytest.raises(ValueError, match="at least two points"):
        area_under_curve([0], [0.5])


def test_iterations_to_threshold():
    assert iterations_to_threshold([0, 10, 30], [0.5, 0.7, 0.8], 0.75) == 30
    assert iterations_to_threshold([0, 10, 30], [0.5, 0.7, 0.8], 0.5) == 0
    assert iterations_to_threshold([0, 10, 30], [0.5, 0.7, 0.8], 0.9) == math.inf


def test_successive_noise_ignores_a_trend_and_measures_jitter():
    assert successive_noise([1, 2, 3, 4, 5]) == pytest.approx(0.0)  # a pure trend has no jitter
    # steps 1, -1, 1: sample std sqrt(4/3); over sqrt(2), over the mean 1.5
    assert successive_noise([1, 2, 1, 2]) == pytest.approx(math.sqrt(4 / 3) / math.sqrt(2) / 1.5)
    assert math.isnan(successive_noise([1.0, 2.0]))
