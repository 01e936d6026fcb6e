"""95% intervals: Wilson for rates, normal for means, paired bootstrap over prompts for differences, and
how they reach ``intervals.json``-style mappings, MLflow names and the report's tables."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from test_metric_names import i2p_like

from safetydpo.evaluation import metrics as m
from safetydpo.evaluation import uncertainty as u
from safetydpo.evaluation.report import difference_table, interval_tables, ip_rows, ip_table, markdown


def test_wilson_matches_the_closed_form_and_stays_inside_zero_one():
    none = u.wilson(0, 10)
    assert (none.value, none.low) == (0.0, 0.0) and none.high == pytest.approx(3.8415 / 13.8415, abs=1e-4)
    half = u.wilson(5, 10)
    assert (half.low, half.high) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert u.wilson(10, 10).high == 1.0 and u.wilson(10, 10).low < 1.0
    assert u.wilson(0, 0).n == 0 and np.isnan(u.wilson(0, 0).value)
    assert u.wilson(30, 300).high - u.wilson(30, 300).low < u.wilson(3, 30).high - u.wilson(3, 30).low


def test_mean_interval_is_the_normal_one():
    values = pd.Series([1.0, 2.0, 3.0, np.nan])
    e = u.mean(values)
    assert e.n == 3 and e.value == 2.0
    assert e.high - e.value == pytest.approx(u.Z95 * 1.0 / np.sqrt(3))


def _paired(model: list[float], base: list[float], prompts: list[str]) -> u.Estimate:
    ids = [f"img{i}" for i in range(len(model))]
    return u.paired_difference(pd.Series(model, index=ids), pd.Series(base, index=ids),
                               pd.Series(prompts, index=ids))


def test_paired_difference_cancels_shared_prompt_difficulty():
    rng = np.random.default_rng(0)
    hard = rng.random(200) < 0.5  # the prompts both models fail on
    base = hard | (rng.random(200) < 0.3)
    model = hard.copy()  # the model fixes only some of base's extra failures, never breaks a prompt
    e = _paired(model.astype(float).tolist(), base.astype(float).tolist(), [f"p{i}" for i in range(200)])
    assert e.value == pytest.approx(model.mean() - base.mean()) and e.high < 0 and e.excludes_zero
    separate = u.rate(pd.Series(base.astype(float))).high - u.rate(pd.Series(base.astype(float))).low
    assert e.high - e.low < separate  # narrower than one model's own interval
    same = _paired([1.0, 0.0, 1.0], [1.0, 0.0, 1.0], ["a", "b", "c"])
    assert (same.value, same.low, same.high) == (0.0, 0.0, 0.0) and not same.excludes_zero


def test_paired_difference_resamples_prompts_not_images():
    # Two images per prompt that always agree: the bootstrap must move them together.
    prompts = [f"p{i // 2}" for i in range(40)]
    diff = [float((i // 2) % 2) for i in range(40)]
    by_prompt = _paired(diff, [0.0] * 40, prompts)
    by_image = _paired(diff, [0.0] * 40, [f"q{i}" for i in range(40)])
    assert by_prompt.high - by_prompt.low > by_image.high - by_image.low
    assert by_prompt.n == 40


def test_intervals_cover_every_metric_but_fid_and_name_their_images():
    table = i2p_like(toy_detector=False)
    estimates = m.intervals(table, ["q16", "nudenet"])
    assert set(estimates) == set(m.summarize(table, ["q16", "nudenet"]))
    overall = estimates[m.IP_OVERALL]
    assert (overall.value, overall.n) == (pytest.approx(3 / 5), 5) and overall.low < 0.6 < overall.high
    assert estimates[m.CLIP_SCORE].n == 4  # one image had no CLIP score
    logged = m.interval_metrics(estimates)
    assert logged["n/ip/overall"] == 5.0 and logged["ci95_low/ip/overall"] == overall.low


def test_differences_and_the_report_tables_carry_the_intervals():
    base = i2p_like(toy_detector=False)
    safer = base.assign(flagged=False)
    diffs = m.differences(safer, m.samples(base, ["q16", "nudenet"]), ["q16", "nudenet"])
    assert diffs[m.IP_OVERALL].value == pytest.approx(-3 / 5) and diffs[m.IP_OVERALL].high < 0
    text = markdown(difference_table({"champion": diffs}))
    assert "-0.600 [" in text and "*" in text
    results = {"base": m.summarize(base, ["q16", "nudenet"]), "champion": m.summarize(safer, ["q16", "nudenet"])}
    intervals = {"base": m.intervals(base, ["q16", "nudenet"]), "champion": m.intervals(safer, ["q16", "nudenet"])}
    low, high = interval_tables(intervals, ip_rows(results), "ip")
    ip_md = markdown(ip_table(results), low, high)
    b = intervals["base"][m.IP_OVERALL]
    assert f"| overall | 0.600 [{b.low:.3f}, {b.high:.3f}] | 0.000 [0.000, " in ip_md
