"""One naming scheme for every metric: ``family/name`` per benchmark, ``benchmark/family/name`` across
benchmarks; a metric that does not apply to a benchmark is absent, never NaN or an empty report row."""

from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd
import pytest

from safetydpo.categories import CATEGORIES
from safetydpo.evaluation import metrics as m
from safetydpo.evaluation.report import expert_table, ip_table, markdown, other_metrics

NAME = re.compile(r"^[a-z_]+/[a-z0-9_\-]+$")  # family/name


def i2p_like(toy_detector: bool) -> pd.DataFrame:
    """Unsafe prompts only (no benign rows), Q16 OR NudeNet, one prompt in two categories, one unlabelled;
    optionally the toy detector's columns as the toy model leaves them on prompts that are no toy scene."""
    categories = [["Hate"], ["Violence", "Shocking"], ["Sexual"], [], ["Self-harm"]]
    q16 = np.array([True, False, False, True, False])
    nudenet = np.array([False, False, True, False, False])
    table = pd.DataFrame({
        "image_id": [f"i2p-{i}/0" for i in range(5)], "prompt_id": [f"i2p-{i}" for i in range(5)],
        "prompt": ["a photo of a riot", "a war scene", "a nude figure", "something awful", "a sad person"],
        "category": [c[0] if c else "unlabelled" for c in categories], "categories": categories,
        "seed": range(5), "q16_flagged": q16, "nudenet_flagged": nudenet, "flagged": q16 | nudenet,
        "clip_score": [30.0, 25.0, np.nan, 28.0, 20.0],
    })
    if toy_detector:
        table = table.assign(toy_flagged=False, toy_object="box", toy_background="white",
                             toy_faithful=np.nan, toy_redirected=np.nan,
                             toy_features=[np.zeros(4, np.float32)] * len(table))
    return table


@pytest.mark.parametrize("toy_detector", [False, True])
def test_summarize_on_a_non_toy_benchmark_names_only_what_applies(toy_detector):
    classifiers = ["q16", "nudenet", *(["toy"] if toy_detector else [])]
    result = m.summarize(i2p_like(toy_detector), classifiers)
    assert all(NAME.match(k) for k in result), sorted(result)
    assert all(math.isfinite(v) for v in result.values()), result
    assert not [k for k in result if k.startswith(("redirect/", "twin_redirect/", "toy/"))]
    assert m.BENIGN_FIDELITY not in result and m.FID not in result and m.IP_BENIGN not in result
    assert result[m.IP_OVERALL] == pytest.approx(3 / 5)
    assert result["ip/violence"] == result["ip/shocking"] == 0.0 and result["ip/hate"] == 1.0
    assert result["ip_by/q16"] == pytest.approx(2 / 5) and result["ip_by/nudenet"] == pytest.approx(1 / 5)
    assert result[m.CLIP_SCORE] == pytest.approx(103 / 4)
    assert {m.category_metric(m.IP, c) for c in CATEGORIES} - set(result) == {"ip/harassment",
                                                                               "ip/illegal_activity"}


def test_names_are_built_in_one_place():
    assert (m.IP_OVERALL, m.IP_BENIGN, m.CLIP_SCORE, m.FID, m.BENIGN_FIDELITY, m.REDIRECT_OVERALL) == (
        "ip/overall", "ip/benign", "quality/clip_score", "quality/fid", "quality/benign_fidelity", "redirect/overall")
    assert m.category_metric(m.REDIRECT, "Self-harm") == "redirect/self-harm"
    assert m.category_metric(m.TWIN_REDIRECT, "Illegal Activity") == "twin_redirect/illegal_activity"
    assert m.metric_name(m.IP_BY, "q16") == "ip_by/q16"
    assert m.benchmark_metric("toy", m.BENIGN_FIDELITY) == "toy/quality/benign_fidelity"


def test_report_of_a_non_toy_benchmark_has_no_toy_or_empty_rows():
    table = i2p_like(toy_detector=True)
    results = {"base": m.summarize(table, ["q16", "nudenet", "toy"]),
               "expert_hate": m.summarize(table.assign(flagged=False), ["q16", "nudenet", "toy"])}
    ip = ip_table(results)
    assert "benign" not in ip.index and "harassment" not in ip.index  # nothing measured them
    assert {"overall", "hate", "by q16", "by nudenet"} <= set(ip.index)
    assert not ip.isna().any().any()
    others = other_metrics(results)
    assert list(others.index) == [m.CLIP_SCORE]
    assert not others.isna().any().any()
    experts = expert_table(results)
    assert list(experts.index) == ["Hate"]
    assert not [c for c in experts.columns if "redirect" in c or "fidelity" in c]
    assert not experts.isna().any().any()  # "other categories": those the benchmark has
    for text in (markdown(ip), markdown(others), markdown(experts)):
        assert "toy/" not in text and "redirect" not in text and "nan" not in text.lower()
