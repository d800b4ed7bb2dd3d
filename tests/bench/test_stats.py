"""``bench.stats``: medians with their range, and how they are shown."""

from __future__ import annotations

from bench.stats import fmt, summary


def test_summary_odd_list_median_is_the_middle_value() -> None:
    assert summary([3.0, 1.0, 2.0, 10.0, 0.5]) == {
        "median": 2.0,
        "min": 0.5,
        "max": 10.0,
        "runs": 5,
    }


def test_summary_even_list_median_is_the_mean_of_the_middle_two() -> None:
    s = summary((10.0, 1.0, 2.0, 4.0))  # any sequence, unsorted
    assert s == {"median": 3.0, "min": 1.0, "max": 10.0, "runs": 4}


def test_summary_rounds_every_figure_to_digits() -> None:
    values = [1.23456, 2.34567, 3.45678]
    assert summary(values, 2) == {"median": 2.35, "min": 1.23, "max": 3.46, "runs": 3}
    assert summary([1 / 3]) == {"median": 0.333, "min": 0.333, "max": 0.333, "runs": 1}
    assert summary([1234.4, 1300.6], 0) == {
        "median": 1268.0,
        "min": 1234.0,
        "max": 1301.0,
        "runs": 2,
    }


def test_summary_of_nothing_has_no_figures_and_zero_runs() -> None:
    assert summary([]) == {"median": None, "min": None, "max": None, "runs": 0}


def test_fmt_shows_median_and_range_and_a_dash_when_empty() -> None:
    assert fmt(summary([2.0, 1.0, 3.5]), " s") == "2 s (1-3.5)"
    assert fmt(summary([])) == "-"
    assert fmt(None) == "-"
