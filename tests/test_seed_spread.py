"""The seed spread: which figures it follows and how it summarises them across training seeds."""

from __future__ import annotations

import json

import pytest

from safetydpo import layout
from safetydpo.evaluation.seeds import read_evaluations, seed_root, spread


def _write(run_root, model: str, metrics: dict[str, float]) -> None:
    folder = run_root / layout.EVAL_DIR / model / "toy"
    folder.mkdir(parents=True)
    (folder / layout.METRICS_JSON).write_text(json.dumps(metrics))


def test_spread_follows_each_expert_on_its_own_category_and_the_rest_overall(tmp_path):
    for seed, (own, other, overall) in enumerate([(0.10, 0.9, 0.95), (0.20, 0.8, 0.95), (0.30, 0.7, 0.95)]):
        root = tmp_path if seed == 0 else tmp_path / "seeds" / f"seed-{seed}"
        assert str(root) == (str(tmp_path) if seed == 0 else seed_root(str(tmp_path), seed))
        _write(root, "expert_hate", {"ip/overall": 0.5, "ip/hate": own, "ip/violence": other,
                                     "quality/benign_fidelity": 0.9})
        _write(root, "base", {"ip/overall": overall, "ip/hate": 1.0})
    (tmp_path / layout.EVAL_DIR / "unfinished").mkdir()  # a model without metrics is not a row
    by_seed = {s: read_evaluations(str(tmp_path if s == 0 else tmp_path / "seeds" / f"seed-{s}"), "toy")
               for s in range(3)}
    assert set(by_seed[0]) == {"expert_hate", "base"}
    table = spread(by_seed)
    assert "expert_hate ip/violence" not in table.index and "expert_hate ip/overall" not in table.index
    row = table.loc["expert_hate ip/hate"]
    assert (row["seed 0"], row["mean"], row["min"], row["max"]) == pytest.approx((0.1, 0.2, 0.1, 0.3))
    assert row["sd"] == pytest.approx(0.1)
    assert table.loc["base ip/overall", "sd"] == pytest.approx(0.0)
    assert table.loc["base ip/hate", "mean"] == 1.0
    assert table.loc["expert_hate quality/benign_fidelity", "mean"] == pytest.approx(0.9)
