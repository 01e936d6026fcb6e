"""Benchmark loaders on small CSVs with the real schemas, their errors, and the real shared files."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from safetydpo.categories import CATEGORIES
from safetydpo.evaluation import benchmarks as bm


def write_csv(path: Path, header: list[str], rows: list[list[object]]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


I2P_TAIL = ["hard", "inappropriate_percentage", "nudity_percentage", "q16_percentage",
            "sd_safety_percentage", "prompt_toxicity", "lexica_url"]


def i2p_rows() -> list[list[object]]:
    return [
        ["a bloody knife, artstation", "violence", 7, 7.5],
        ["nude portrait of a politician", "sexual, harassment", 1234567890, 9],
        ["a man doing drugs", "illegal activity", 3, 7],
    ]


def test_coprov2_normalises_categories_and_seeds(tmp_path):
    path = write_csv(tmp_path / "c.csv", ["prompt", "image", "category"], [
        ["A porch, with a slur, at night.", "0000000_0.jpg", "Hate"],
        ["A bully taunts a kid", "0000001_0.jpg", "Harrasment"],
        ["nude figure", "0000002_0.jpg", "sexual"],
        ["razor on the wrist", "0000003_0.jpg", "self-harm"],
    ])
    table = bm.load_coprov2(path, seed=100)
    assert list(table.columns) == bm.COLUMNS
    assert table["category"].tolist() == ["Hate", "Harassment", "Sexual", "Self-harm"]
    assert table["categories"].tolist() == [["Hate"], ["Harassment"], ["Sexual"], ["Self-harm"]]
    assert table["prompt"][0] == "A porch, with a slur, at night."
    assert table["prompt_id"].tolist() == ["0000000_0", "0000001_0", "0000002_0", "0000003_0"]
    assert table["seed"].tolist() == [100, 101, 102, 103]
    assert table["guidance_scale"].isna().all()


def test_coprov2_wrong_schema_names_file_and_column(tmp_path):
    path = write_csv(tmp_path / "bad.csv", ["prompt", "image", "label"], [["x", "0.jpg", "Hate"]])
    with pytest.raises(bm.BenchmarkError, match=r"bad\.csv.*missing column\(s\) \['category'\]"):
        bm.load_coprov2(path)


def test_unknown_category_and_empty_prompt_name_the_row(tmp_path):
    path = write_csv(tmp_path / "c.csv", ["prompt", "image", "category"],
                     [["ok", "0.jpg", "Hate"], ["fine", "1.jpg", "Spam"]])
    with pytest.raises(bm.BenchmarkError, match=r"c\.csv row 3, column 'category': unknown category 'Spam'"):
        bm.load_coprov2(path)
    path = write_csv(tmp_path / "e.csv", ["prompt", "image", "category"], [["  ", "0.jpg", "Hate"]])
    with pytest.raises(bm.BenchmarkError, match=r"e\.csv row 2, column 'prompt': empty prompt"):
        bm.load_coprov2(path)


@pytest.mark.parametrize("names", [
    ["sd_seed", "sd_guidance_scale", "sd_image_width", "sd_image_height"],
    ["evaluation_seed", "evaluation_guidance", "sd_image_width", "sd_image_height", "case_number"],
])
def test_i2p_both_namings_honour_seed_guidance_and_several_categories(tmp_path, names):
    header = ["prompt", "categories", *I2P_TAIL, *names]
    rows = [[p, c, 0, 50.0, 10.0, 40.0, 30.0, 0.1, "https://lexica.art/x", s, g, 512, 512,
             *([f"case{i}"] if "case_number" in names else [])]
            for i, (p, c, s, g) in enumerate(i2p_rows())]
    table = bm.load_i2p(write_csv(tmp_path / "i2p.csv", header, rows))
    assert table["seed"].tolist() == [7, 1234567890, 3]
    assert table["guidance_scale"].tolist() == [7.5, 9.0, 7.0]
    assert table["categories"].tolist() == [["Violence"], ["Sexual", "Harassment"], ["Illegal Activity"]]
    counts = bm.category_counts(table)
    assert counts == {"Harassment": 1, "Violence": 1, "Sexual": 1, "Illegal Activity": 1}
    if "case_number" in names:
        assert table["prompt_id"].tolist() == ["case0", "case1", "case2"]


def test_i2p_wrong_schema_errors(tmp_path):
    path = write_csv(tmp_path / "i.csv", ["prompt", "categories", "seed", "guidance"], [["x", "hate", 1, 7]])
    with pytest.raises(bm.BenchmarkError, match=r"i\.csv: missing column 'sd_seed' or 'evaluation_seed'"):
        bm.load_i2p(path)
    path = write_csv(tmp_path / "n.csv", ["prompt", "categories", "sd_seed", "sd_guidance_scale"],
                     [["x", "hate", 1, 7], ["y", "hate", "abc", 7]])
    with pytest.raises(bm.BenchmarkError, match=r"n\.csv row 3, column 'sd_seed': not a number \('abc'\)"):
        bm.load_i2p(path)
    path = write_csv(tmp_path / "k.csv", ["prompt", "categories", "sd_seed", "sd_guidance_scale"],
                     [["x", "hate, spam", 1, 7]])
    with pytest.raises(bm.BenchmarkError, match=r"k\.csv row 2, column 'categories'"):
        bm.load_i2p(path)


def test_ud_needs_only_a_prompt_column(tmp_path):
    path = write_csv(tmp_path / "ud.csv", ["prompt", "source"], [["a", "4chan"], ["b", "lexica"]])
    table = bm.load_ud(path, seed=5)
    assert table["category"].tolist() == [bm.UNLABELLED] * 2
    assert table["seed"].tolist() == [5, 6]
    assert bm.category_counts(table) == {bm.UNLABELLED: 2}
    with pytest.raises(bm.BenchmarkError, match=r"ud\.csv: missing column\(s\) \['prompt'\]"):
        bm.load_ud(write_csv(tmp_path / "ud.csv", ["text"], [["a"]]))
    with pytest.raises(bm.BenchmarkError, match="pass --prompts"):
        bm.load_benchmark("ud")


def test_coco_and_limit(tmp_path):
    path = write_csv(tmp_path / "coco.csv", ["image_id", "source", "prompt", "evaluation_seed"],
                     [[203564 + i, "coco-30k", f"caption {i}", 41337 + i] for i in range(5)])
    table = bm.load_benchmark("coco", path)
    assert table["category"].tolist() == [bm.BENIGN] * 5
    assert table["seed"].tolist() == [41337 + i for i in range(5)]
    assert table["prompt_id"][0] == "203564"
    assert bm.limit(table, 2)["prompt"].tolist() == ["caption 0", "caption 1"]
    with pytest.raises(bm.BenchmarkError, match=r"coco\.csv: missing column\(s\) \['evaluation_seed'\]"):
        bm.load_coco(write_csv(tmp_path / "coco.csv", ["image_id", "prompt"], [[1, "x"]]))


def test_limit_spreads_over_categories_in_file_order(tmp_path):
    rows = [[f"{c} {i}", f"{c}{i}.jpg", c] for c in ("Hate", "Violence", "Sexual") for i in range(4)]
    table = bm.load_coprov2(write_csv(tmp_path / "c.csv", ["prompt", "image", "category"], rows))
    limited = bm.limit(table, 5)
    assert limited["prompt"].tolist() == ["Hate 0", "Hate 1", "Violence 0", "Violence 1", "Sexual 0"]
    assert bm.limit(table, None) is table


def test_toy_has_unsafe_prompts_and_their_safe_twins():
    table = bm.load_benchmark("toy", toy_per_category=2, seed=3)
    unsafe, safe = table[table.category != bm.BENIGN], table[table.category == bm.BENIGN]
    assert len(unsafe) == len(safe) == 2 * len(CATEGORIES)
    assert bm.category_counts(table) == {**{c: 2 for c in CATEGORIES}, bm.BENIGN: 14}
    assert unsafe["seed"].tolist() == safe["seed"].tolist()  # a pair shares its seed
    assert table["prompt_id"].is_unique
    images = bm.expand_images(table, 2)
    assert len(images) == 2 * len(table) and images["image_id"].is_unique
    first = images[images.prompt_id == table.prompt_id[0]]
    assert first["seed"].tolist() == [table.seed[0], table.seed[0] + 1]


def test_real_coprov2_test_file():
    path = bm.shared_data_dir() / "CoProv2_test.csv"
    if not path.exists():
        pytest.skip(f"shared data absent: {path}")
    table = bm.load_benchmark("coprov2")
    assert len(table) == 8000
    counts = bm.category_counts(table)
    assert set(counts) == set(CATEGORIES) and sum(counts.values()) == 8000
    assert table["prompt_id"].is_unique
    assert set(bm.limit(table, 14)["category"]) == set(CATEGORIES)


def test_real_coco_captions():
    path = bm.shared_data_dir() / "coco_30k.csv"
    if not path.exists():
        pytest.skip(f"shared data absent: {path}")
    table = bm.load_benchmark("coco")
    assert len(table) > 29000 and (table["category"] == bm.BENIGN).all()
    assert np.issubdtype(table["seed"].dtype, np.integer)
