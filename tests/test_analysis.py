"""The report's statistics against published reference results: a two-way ANOVA (R's warpbreaks),
Student's paired t-test (R's sleep), Holm's procedure, power tables, the bootstrap's coverage on data
with a known difference, and the comparisons table that the adaptive sweeper reads."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as scipy_stats
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.weightstats import ttost_ind

from mlpsweep.report.analysis import anova, cells, comparisons, grid_coverage, importances, ordered_values, resolution
from mlpsweep.stats import (
    bootstrap_interval,
    contrast,
    detectable_difference,
    equivalence_p,
    holm,
    paired_interval,
    probability_of_improvement,
    samples_needed,
)

# R's datasets::warpbreaks (Tippett 1950): breaks per loom by wool (A, B) and tension (L, M, H), 9 looms each.
WARPBREAKS = {
    ("A", "L"): [26, 30, 54, 25, 70, 52, 51, 26, 67],
    ("A", "M"): [18, 21, 29, 17, 12, 18, 35, 30, 36],
    ("A", "H"): [36, 21, 24, 18, 10, 43, 28, 15, 26],
    ("B", "L"): [27, 14, 29, 19, 29, 31, 41, 20, 44],
    ("B", "M"): [42, 26, 19, 16, 39, 28, 21, 39, 29],
    ("B", "H"): [20, 21, 24, 17, 13, 15, 15, 16, 28],
}
# R: summary(aov(breaks ~ wool * tension, data = warpbreaks)), as printed in R's documentation and
# e.g. Crawley, The R Book, ch. 11: (df, sum of squares, F, p)
WARPBREAKS_ANOVA = {
    "wool": (1, 450.7, 3.765, 0.058213),
    "tension": (2, 2034.3, 8.498, 0.000693),
    "wool x tension": (2, 1002.8, 4.189, 0.021044),
    "residual": (48, 5745.1, math.nan, math.nan),
}
# R's datasets::sleep (Student 1908): extra hours of sleep of 10 patients under two drugs.
SLEEP = {"1": [0.7, -1.6, -0.2, -1.2, -0.1, 3.4, 3.7, 0.8, 0.0, 2.0], "2": [1.9, 0.8, 1.1, 0.1, -0.1, 4.4, 5.5, 1.6, 4.6, 3.4]}


def warpbreaks_runs() -> pd.DataFrame:
    """warpbreaks as runs: the factors as axes, the loom as seed, breaks / 100 as the metric (so that the
    analysis's pp are breaks)."""
    rows = [{"wool": w, "tension": t, "seed": i, "breaks": b / 100} for (w, t), bs in WARPBREAKS.items() for i, b in enumerate(bs)]
    return pd.DataFrame(rows)


def test_two_way_anova_of_warpbreaks_matches_r() -> None:
    result = anova(warpbreaks_runs(), ["wool", "tension"], metric="breaks")
    assert result.typ == 2 and result.note.startswith("Type II") and "balanced design (every config has 9 seeds)" in result.note
    table = result.table.set_index("term")
    assert list(table.index) == list(WARPBREAKS_ANOVA)
    for term, (df, sum_sq, f, p) in WARPBREAKS_ANOVA.items():
        assert table.loc[term, "df"] == df
        assert table.loc[term, "sum_sq"] == pytest.approx(sum_sq, abs=0.05)
        if term != "residual":
            assert table.loc[term, "F"] == pytest.approx(f, abs=5e-4)
            assert table.loc[term, "p"] == pytest.approx(p, rel=1e-3)
            assert table.loc[term, "partial_eta_sq"] == pytest.approx(sum_sq / (sum_sq + 5745.1), rel=1e-3)


def test_an_unbalanced_design_gets_type_iii_and_a_thin_one_none() -> None:
    runs = warpbreaks_runs()
    unbalanced = anova(runs.iloc[3:], ["wool", "tension"], metric="breaks")
    assert unbalanced.typ == 3 and unbalanced.note.startswith("Type III") and "6 to 9 seeds" in unbalanced.note
    assert list(unbalanced.table.term) == ["wool", "tension", "wool x tension", "residual"]
    one_seed = anova(runs[runs.seed == 0], ["wool", "tension"], metric="breaks")
    assert one_seed.table.empty and "at least 2 seeds of every config" in one_seed.note
    one_level = anova(runs[runs.wool == "A"], ["wool"], metric="breaks")
    assert one_level.table.empty and "no factor has more than one level" in one_level.note
    # a missing config: the wool x tension interaction is not estimable, the main effects are
    missing = anova(runs[(runs.wool != "B") | (runs.tension != "H")], ["wool", "tension"], metric="breaks")
    assert list(missing.table.term) == ["wool", "tension", "residual"] and "left out" in missing.note


def test_paired_t_test_of_students_sleep_data_matches_r() -> None:
    # R: t.test(extra ~ group, data = sleep, paired = TRUE): t = -4.0621, df = 9, p-value = 0.002833,
    # 95 percent confidence interval -2.4598858 -0.7001142, mean difference -1.58
    result = paired_interval(np.subtract(SLEEP["1"], SLEEP["2"]))
    assert (result.estimate, result.df) == (pytest.approx(-1.58), 9)
    assert result.estimate / result.se == pytest.approx(-4.0621, abs=1e-4)
    assert result.p == pytest.approx(0.002833, abs=1e-6)
    assert (result.low, result.high) == (pytest.approx(-2.4598858, abs=1e-6), pytest.approx(-0.7001142, abs=1e-6))
    # the same through the comparisons table: the patient is the seed that pairs the two drugs
    runs = pd.DataFrame([{"drug": d, "seed": i, "extra": x / 100} for d, xs in SLEEP.items() for i, x in enumerate(xs)])
    row = comparisons(runs, ["drug"], metric="extra", n_resamples=0).iloc[0]
    assert (row.a, row.b, row.n_pairs, row.test) == ("drug=2", "drug=1", 10, "paired")
    assert row.paired_p == pytest.approx(0.002833, abs=1e-6) and row.diff_pp == pytest.approx(1.58)
    # unpaired, R's t.test(extra ~ group, data = sleep): Welch t = -1.8608, df = 17.776, p-value = 0.07939
    assert row.welch_p == pytest.approx(0.07939, abs=1e-5)


def test_holm_on_a_known_list() -> None:
    # by hand: sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 = 0.02, 0.03, 0.06, 0.04 -> running max 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    p = np.random.default_rng(3).uniform(0, 0.1, 12)
    assert holm(p) == pytest.approx(multipletests(p, method="holm")[1])
    with_nan = holm([0.01, math.nan, 0.02])
    assert with_nan[0] == pytest.approx(0.02) and math.isnan(with_nan[1]) and with_nan[2] == pytest.approx(0.02)


def test_power_matches_cohens_tables() -> None:
    # Cohen (1988), Table 2.4.1: d = 0.5 needs 64 per group for 80% power at a two-sided 5% level
    assert math.ceil(samples_needed(0.5, 1.0, paired=False)) == 64
    # and with 20 per group the detectable d is 0.91 (G*Power: 0.9091)
    assert detectable_difference(1.0, 20, paired=False) == pytest.approx(0.9091, abs=1e-3)
    # paired, d_z = 0.5: 34 pairs (G*Power: 33.37)
    assert math.ceil(samples_needed(0.5, 1.0, paired=True)) == 34
    assert samples_needed(1e-4, 1.0, paired=False) == pytest.approx(2 * (1.959964 + 0.841621) ** 2 / 1e-8, rel=1e-3)


def test_probability_of_improvement_is_mann_whitney_u_over_nm() -> None:
    a, b = [1.0, 2.0, 3.0, 3.0], [0.0, 2.0, 4.0]  # ties count one half
    u = scipy_stats.mannwhitneyu(a, b).statistic
    assert probability_of_improvement(a, b) == pytest.approx(u / 12) == pytest.approx(6.5 / 12)


def test_equivalence_test_matches_statsmodels_tost() -> None:
    rng = np.random.default_rng(1)
    x, y = rng.normal(0, 1, 12), rng.normal(0.1, 1.5, 9)
    expected = ttost_ind(x, y, -0.5, 0.5, usevar="unequal")[0]
    assert equivalence_p(contrast([x, y], [1, -1]), 0.5) == pytest.approx(expected)


def test_bootstrap_interval_covers_a_known_difference_about_95_percent_of_the_time() -> None:
    rng = np.random.default_rng(0)
    replications, covered, methods = 200, 0, set()
    for i in range(replications):
        a, b = rng.normal(1.0, 1.0, 20), rng.normal(0.0, 2.0, 20)  # true difference 1
        interval = bootstrap_interval([a, b], "contrast", n_resamples=300, seed=i)
        covered += interval.low <= 1.0 <= interval.high
        methods.add(interval.method)
    assert methods == {"BCa"}
    assert 0.89 <= covered / replications <= 0.99  # binomial SE of a 95% rate over 200: 0.015


def test_the_comparisons_table_for_the_sweeper() -> None:
    """Two factors, 4 seeds each: simple, main and interaction rows, with what the sweeper needs."""
    rng = np.random.default_rng(7)
    means = {("sigmoid", "none"): 0.90, ("sigmoid", "batchnorm"): 0.95, ("relu", "none"): 0.97, ("relu", "batchnorm"): 0.9701}
    rows = [{"activation": a, "norm": n, "seed": s, "test_acc": m + rng.normal(0, 0.0005)}
            for (a, n), m in means.items() for s in range(4)]  # fmt: skip
    runs = pd.DataFrame(rows)
    table = comparisons(runs, ["activation", "norm"], n_resamples=200)
    assert list(table.kind) == ["simple", "simple", "main"] * 2 + ["interaction"]
    assert (table.n_pairs == 4).all() and (table.test == "paired").all()
    assert (table.ci_width_pp == table.ci_high_pp - table.ci_low_pp).all() and (table.ci_width_pp > 0).all()
    by = table.set_index(["kind", "factor", "context"])
    sigmoid_bn = by.loc[("simple", "norm", "activation=sigmoid")]
    assert (sigmoid_bn.a, sigmoid_bn.b) == ("activation=sigmoid, norm=batchnorm", "activation=sigmoid, norm=none")
    assert sigmoid_bn.cells == ({"activation": "sigmoid", "norm": "batchnorm"}, {"activation": "sigmoid", "norm": "none"})
    assert (sigmoid_bn.n_a, sigmoid_bn.n_b) == (4, 4) and sigmoid_bn.diff_pp == pytest.approx(5.0, abs=0.2)
    assert sigmoid_bn.verdict.startswith("higher by") and sigmoid_bn.poi == 1.0
    relu_bn = by.loc[("simple", "norm", "activation=relu")]  # 0.01 pp apart, seed SD 0.05 pp: equivalent within 0.2
    assert relu_bn.verdict.startswith("equivalent within ±0.2 pp")
    main = by.loc[("main", "norm", "mean over activation")]
    assert main.diff_pp == pytest.approx((sigmoid_bn.diff_pp + relu_bn.diff_pp) / 2)
    assert len(main.cells) == 4 and main.cells_b == "activation=sigmoid, norm=none; activation=relu, norm=none"
    interaction = table[table.kind == "interaction"].iloc[0]
    means_pp = runs.groupby(["activation", "norm"]).test_acc.mean() * 100
    expected = (means_pp["relu", "batchnorm"] - means_pp["sigmoid", "batchnorm"]) - (means_pp["relu", "none"] - means_pp["sigmoid", "none"])
    assert interaction.factor == "activation x norm" and interaction.diff_pp == pytest.approx(expected)
    assert math.isnan(interaction.poi)
    # Holm over the family: no adjusted p below its raw p
    assert (table.p_holm >= table.p - 1e-12).all()


def test_an_open_comparison_says_how_many_seeds_it_needs() -> None:
    rng = np.random.default_rng(11)
    rows = [{"dropout": d, "seed": s, "test_acc": 0.97 + shift + rng.normal(0, 0.003)}
            for d, shift in (("0", 0.0), ("0.2", 0.002)) for s in range(3)]  # fmt: skip
    row = comparisons(pd.DataFrame(rows), ["dropout"], margin_pp=0.05, n_resamples=0).iloc[0]
    assert row.verdict.startswith("not resolved: would need about") and row.seeds_needed > 3
    assert row.mdd_pp > abs(row.diff_pp)
    # one seed per config: no interval, no test, and the verdict says why
    single = comparisons(pd.DataFrame(rows[:1] + rows[3:4]), ["dropout"]).iloc[0]
    assert single.test == "none" and single.verdict.startswith("n too small")


def test_unpaired_when_the_seeds_differ() -> None:
    rows = [{"norm": n, "seed": s, "test_acc": 0.9 + 0.01 * i} for n, seeds in (("none", [0, 1, 2]), ("batchnorm", [3, 4, 5]))
            for i, s in enumerate(seeds)]  # fmt: skip
    row = comparisons(pd.DataFrame(rows), ["norm"], n_resamples=0).iloc[0]
    assert (row.n_pairs, row.test) == (0, "welch") and row.p == row.welch_p
    # the metric by its MLflow key or its name, whichever the runs' column is
    by_key = comparisons(pd.DataFrame(rows), ["norm"], metric="accuracy/test", n_resamples=0)
    renamed = pd.DataFrame(rows).rename(columns={"test_acc": "accuracy/test"})
    pd.testing.assert_frame_equal(by_key, comparisons(renamed, ["norm"], metric="test_acc", n_resamples=0))
    assert by_key.iloc[0].p == row.p


def test_init_and_scheduler_are_factors_with_their_defaults_as_baselines() -> None:
    rows = [{"init": i, "scheduler": sch, "seed": s, "test_acc": 0.9 + 0.01 * (i == "orthogonal") + 0.001 * s}
            for i in ("orthogonal", "default") for sch in ("cosine", "none") for s in range(2)]  # fmt: skip
    runs = pd.DataFrame(rows)
    assert ordered_values(runs, "init") == ["default", "orthogonal"] and ordered_values(runs, "scheduler") == ["none", "cosine"]
    table = comparisons(runs, ["init", "scheduler"], n_resamples=0)
    main = table[table.kind == "main"].set_index("factor")
    assert (main.loc["init", "a"], main.loc["init", "b"]) == ("init=orthogonal", "init=default")
    assert main.loc["init", "diff_pp"] == pytest.approx(1.0) and main.loc["scheduler", "b"] == "scheduler=none"
    assert list(anova(runs, ["init", "scheduler"]).table.term) == ["init", "scheduler", "init x scheduler", "residual"]


def test_cells_resolution_and_importances() -> None:
    runs = warpbreaks_runs()
    table = cells(runs, ["wool", "tension"], metric="breaks")
    assert list(table.config[:3]) == ["wool=A, tension=H", "wool=A, tension=L", "wool=A, tension=M"]
    assert table.n.sum() == len(runs) and table.set_index("config").loc["wool=A, tension=L", "mean"] == pytest.approx(44.556 / 100, abs=1e-5)
    res = resolution(runs, ["wool", "tension"], metric="breaks")
    assert (res.df, res.seeds) == (48, 9) and res.sd_pp == pytest.approx(math.sqrt(5745.1 / 48), rel=1e-4)
    assert grid_coverage(runs, ["wool", "tension"]) == 1 and grid_coverage(runs.iloc[18:], ["wool", "tension"]) == 4 / 6
    # a random search: the learning rate matters, the batch size does not
    rng = np.random.default_rng(5)
    lr, batch = rng.uniform(0.001, 0.1, 30), rng.choice(["32", "64"], 30)
    search = pd.DataFrame({"lr": lr.astype(str), "batch": batch, "test_acc": 0.9 + lr + rng.normal(0, 0.001, 30)})
    found, note = importances(search, ["lr", "batch"])
    assert "random forest" in note and found.set_index("factor").importance["lr"] > 0.8
