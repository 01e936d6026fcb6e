"""The CoProV2 loader and the pair table built from it: real files, real CSV parsing, no Ray."""

from __future__ import annotations

import csv
import importlib.util
import itertools
import logging
import os
import re
from pathlib import Path

import pytest

from safetydpo.categories import CATEGORIES, normalize_category
from safetydpo.config import DataConfig
from safetydpo.data.coprov2 import CoProV2Error, load_pairs
from safetydpo.data.pairs import build_pairs, pair_seed

SHARED_DATA = Path(os.environ.get("SAFETYDPO_SHARED_DATA")
                   or Path(__file__).resolve().parents[2] / "shared" / "data")
REAL_TRAIN = SHARED_DATA / "CoProv2_train.csv"
REAL_TEST = SHARED_DATA / "CoProv2_test.csv"
needs_shared = pytest.mark.skipif(not REAL_TRAIN.exists(), reason=f"{REAL_TRAIN} not present")

GOOD = [
    ("a bigot shouts at a crowd", "u_idx_0000000_0.jpg", "Hate"),
    ("a teacher speaks to a crowd", "s_idx_0000000_0.jpg", "Hate"),
    ("a gun on a table", "u_idx_0000001_0.jpg", "violence"),
    ("a cup on a table", "s_idx_0000001_0.jpg", "violence"),
    ("a stalker follows a girl", "u_idx_0000002_0.jpg", "Harrasment"),
    ("a friend walks with a girl", "s_idx_0000002_0.jpg", "Harrasment"),
]


def write_csv(path: Path, rows, header=("prompt", "image", "category")) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def test_pairs_rows_by_index_and_category(tmp_path):
    rows = GOOD + [  # one index filed under two categories, as in the released file
        ("two men kiss", "u_idx_0000003_0.jpg", "Hate"),
        ("two men kiss", "u_idx_0000003_0.jpg", "sexual"),
        ("two men shake hands", "s_idx_0000003_0.jpg", "Hate"),
        ("two men shake hands", "s_idx_0000003_0.jpg", "sexual"),
    ]
    loaded = load_pairs(str(write_csv(tmp_path / "pairs.csv", rows)))
    table = loaded.pairs
    assert loaded.rows == 10 and not loaded.skipped
    assert table["pair_id"].tolist() == ["coprov2-0000000-hate", "coprov2-0000001-violence",
                                         "coprov2-0000002-harassment", "coprov2-0000003-hate",
                                         "coprov2-0000003-sexual"]
    assert table["category"].tolist() == ["Hate", "Violence", "Harassment", "Hate", "Sexual"]
    assert table.loc[1, "unsafe_prompt"] == "a gun on a table"
    assert table.loc[1, "safe_prompt"] == "a cup on a table"
    assert table.loc[4, "safe_prompt"] == "two men shake hands"


@needs_shared
def test_real_sample_parses_into_correct_pairs(tmp_path):
    with REAL_TRAIN.open(newline="") as f:
        sample = list(itertools.islice(csv.DictReader(f), 400))
    twins: dict[tuple[str, str], dict[str, str]] = {}
    for row in sample:  # an independent reading of the same rows
        kind, _, idx, _ = row["image"].split("_")
        twins.setdefault((idx, normalize_category(row["category"])), {})[kind] = row["prompt"].strip()
    expected = {key: sides for key, sides in twins.items() if len(sides) == 2}
    path = write_csv(tmp_path / "sample.csv", [(r["prompt"], r["image"], r["category"]) for r in sample])
    loaded = load_pairs(str(path), skip_bad_rows=True)  # the cut may split the last pair
    table = loaded.pairs
    assert len(table) == len(expected) >= 190
    assert sum(loaded.skipped.values()) == 400 - 2 * len(expected)
    assert set(table["category"]) <= set(CATEGORIES)
    assert table["pair_id"].is_unique
    for pair in table.itertuples():
        original = expected[(pair.pair_id.split("-")[1], pair.category)]
        assert (pair.unsafe_prompt, pair.safe_prompt) == (original["u"], original["s"])


@needs_shared
def test_real_train_file_loads_whole():
    loaded = load_pairs(str(REAL_TRAIN))
    table = loaded.pairs
    assert loaded.rows == 2 * len(table)
    assert table["pair_id"].is_unique
    assert set(table["category"]) == set(CATEGORIES)
    assert (table["unsafe_prompt"] != table["safe_prompt"]).mean() > 0.99


@needs_shared
def test_unsafe_only_file_is_rejected():
    with pytest.raises(CoProV2Error, match="CoProv2_test.csv: no image name .* not a paired CoProV2 file"):
        load_pairs(str(REAL_TEST))


@pytest.mark.parametrize("rows, problem", [
    (GOOD + [("a blade", "u_idx_0000009_0.jpg", "Violence")],
     r"row 7: unsafe prompt u_idx_0000009 \(Violence\) has no safe twin s_idx_0000009"),
    (GOOD + [("a knife", "u_idx_0000009_0.jpg", "Violence"), ("a spoon", "s_idx_0000009_0.jpg", "Cooking")],
     r"row 8: unknown category 'Cooking'"),
    (GOOD + [("  ", "u_idx_0000009_0.jpg", "Violence"), ("a spoon", "s_idx_0000009_0.jpg", "Violence")],
     r"row 7: empty prompt"),
    (GOOD + [("a knife", "knife.jpg", "Violence")], r"row 7: image 'knife.jpg' is not u_idx_N_K.jpg"),
    (GOOD + [("a gun on a chair", "u_idx_0000001_0.jpg", "Violence")],
     r"row 7: 'u_idx_0000001_0.jpg' \(Violence\) repeats row 3"),
])
def test_malformed_rows_name_file_row_and_problem(tmp_path, rows, problem):
    path = write_csv(tmp_path / "bad.csv", rows)
    with pytest.raises(CoProV2Error, match=f"{re.escape(str(path))}: {problem}"):
        load_pairs(str(path))


def test_missing_column_names_the_file(tmp_path):
    path = write_csv(tmp_path / "nocat.csv", [r[:2] for r in GOOD], header=("prompt", "image"))
    with pytest.raises(CoProV2Error, match=r"nocat.csv: missing column\(s\) \['category'\]"):
        load_pairs(str(path))


def test_unreadable_source_names_it(tmp_path):
    with pytest.raises(CoProV2Error, match="nowhere.csv: cannot read"):
        load_pairs(str(tmp_path / "nowhere.csv"))


def test_skip_bad_rows_drops_and_counts(tmp_path, caplog):
    rows = GOOD + [
        ("a blade", "u_idx_0000009_0.jpg", "Violence"),  # no twin
        ("a knife", "u_idx_0000010_0.jpg", "Violence"),
        ("a spoon", "s_idx_0000010_0.jpg", "Cooking"),  # unknown category -> its twin is left alone
        ("", "u_idx_0000011_0.jpg", "Hate"),
    ]
    path = write_csv(tmp_path / "some_bad.csv", rows)
    with caplog.at_level(logging.WARNING, logger="safetydpo.data.coprov2"):
        loaded = load_pairs(str(path), skip_bad_rows=True)
    assert len(loaded.pairs) == 3
    assert dict(loaded.skipped) == {"unsafe row without its twin": 2, "unknown category": 1,
                                    "empty prompt": 1}
    assert "some_bad.csv: skipped 4 bad row(s) of 10" in caplog.text


def test_uri_source_reads_through_pyarrow_fs(tmp_path):
    path = write_csv(tmp_path / "uri.csv", GOOD)
    assert load_pairs(path.as_uri()).pairs.equals(load_pairs(str(path)).pairs)


@pytest.mark.skipif(importlib.util.find_spec("datasets") is not None, reason="datasets is installed")
def test_hub_source_without_datasets_says_what_to_install():
    with pytest.raises(CoProV2Error, match="hf:Visualignment/CoProv2: .*`datasets` package"):
        load_pairs("hf:Visualignment/CoProv2")


def test_pair_table_filters_limits_splits_and_seeds(tmp_path):
    rows = [(f"{kind} {c} {i}", f"{kind}_idx_{i:07d}_0.jpg", c)
            for c in ("Hate", "Violence", "sexual") for i in range(20) for kind in ("u", "s")]
    path = str(write_csv(tmp_path / "many.csv", rows))
    data = DataConfig(source="coprov2", path=path, categories=["Violence", "Sexual"], per_category_limit=10,
                      val_fraction=0.3, seed=7)
    table = build_pairs(data).table
    assert table.groupby(["category", "split"]).size().to_dict() == {
        ("Sexual", "train"): 7, ("Sexual", "validation"): 3,
        ("Violence", "train"): 7, ("Violence", "validation"): 3}
    assert table["category"].tolist() == ["Violence"] * 10 + ["Sexual"] * 10  # canonical order
    assert table["seed"].tolist() == [pair_seed(7, pid) for pid in table["pair_id"]]
    # A pair keeps its seed whatever else is selected; the split is the data seed's.
    wider = build_pairs(data.model_copy(update={"categories": None, "per_category_limit": None})).table
    assert wider.set_index("pair_id").loc[table["pair_id"], "seed"].tolist() == table["seed"].tolist()
    assert build_pairs(data).table.equals(table)
    reseeded = build_pairs(data.model_copy(update={"seed": 8})).table
    assert set(reseeded["seed"]).isdisjoint(table["seed"])
    assert reseeded["pair_id"].tolist() != table["pair_id"].tolist()


def test_coprov2_source_needs_a_path():
    with pytest.raises(ValueError, match="data.path is not set"):
        build_pairs(DataConfig(source="coprov2"))
