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


def test_unknown_category_names_the_row(tmp_path):
    path = write_csv(tmp_path / "c.csv", ["prompt", "image", "category"],
                     [["ok", "0.jpg", "Hate"], ["fine", "1.jpg", "Spam"]])
    with pytest.raises(bm.BenchmarkError, match=r"c\.csv row 3, column 'category': unknown category 'Spam'"):
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
    path = write_csv(tmp_path / "i.csv", ["prompt", "categories", "rng", "guidance"], [["x", "hate", 1, 7]])
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


MULTI_LINE = "let it rain, let it pour,\r\nJust let it come down on me"
BIG_SEED = 2**32 - 1


def odd_i2p(tmp_path: Path) -> Path:
    """The published I2P layout with its oddities: a blank prompt (case 2260), a multi-line prompt,
    seeds near 2**32, prompts that look like NA, per-row guidance and sizes, and blank cells."""
    header = ["prompt", "categories", *I2P_TAIL, "sd_seed", "sd_guidance_scale", "sd_image_width",
              "sd_image_height", "sd_model", "case_number"]
    tail = [0, 40.0, 0.0, 40.0, 80.0, 0.03, "https://lexica.art/prompt/x"]
    rows = [["a man mourning, norman rockwell", "illegal activity", 4084185719, 18, 512, 512, 2259],
            ["", "illegal activity", 4261564198, 7, 512, 512, 2260],
            [MULTI_LINE, "self-harm", BIG_SEED, 7.5, 384, 256, 2261],
            ["Null", "violence, self-harm", 1, 255, "", "", 2262],
            ["NA 😂", "hate", 0, "", 128, 448, 2263]]
    return write_csv(tmp_path / "i2p_benchmark.csv", header,
                     [[p, c, *tail, s, g, w, h, "stable-diffusion-v1-4", n] for p, c, s, g, w, h, n in rows])


def odd_prompts(tmp_path: Path, loader: str) -> Path:
    """A CoProV2, UD or COCO file with a blank prompt, a multi-line one and an NA-looking one."""
    prompts = ["a first prompt", "", MULTI_LINE, "NA"]
    if loader == "coprov2":
        return write_csv(tmp_path / "c.csv", ["prompt", "image", "category"],
                         [[p, f"000000{i}_0.jpg", "Hate"] for i, p in enumerate(prompts)])
    if loader == "coco":
        seeds = [1, 2, BIG_SEED, ""]
        return write_csv(tmp_path / "coco.csv", ["image_id", "source", "prompt", "evaluation_seed"],
                         [[100 + i, "coco-30k", p, seeds[i]] for i, p in enumerate(prompts)])
    settings = [[1, 7, 512, 512], [BIG_SEED, "", "", ""], ["", 9.5, 768, 640], [3, 7, 512, 512]]
    return write_csv(tmp_path / "ud.csv", ["prompt", "seed", "guidance_scale", "width", "height"],
                     [[p, *settings[i]] for i, p in enumerate(prompts)])


def test_i2p_loads_every_published_row_as_published(tmp_path):
    table = bm.load_i2p(odd_i2p(tmp_path), seed=1000)
    assert list(table.columns) == bm.COLUMNS and len(table) == 5
    assert table["prompt"].tolist() == ["a man mourning, norman rockwell", "", MULTI_LINE, "Null", "NA 😂"]
    assert table["prompt_id"].tolist() == ["2259", "2260", "2261", "2262", "2263"]
    assert table["seed"].dtype == np.int64
    assert table["seed"].tolist() == [4084185719, 4261564198, BIG_SEED, 1, 0]
    assert table["guidance_scale"].tolist()[:4] == [18.0, 7.0, 7.5, 255.0]
    assert np.isnan(table["guidance_scale"][4])  # blank: the configured guidance
    assert table["width"].tolist()[:3] == [512, 512, 384] and table["height"][2] == 256
    assert table["width"].isna().tolist() == [False, False, False, True, False]
    assert table["categories"][1] == ["Illegal Activity"]


@pytest.mark.parametrize("loader", ["coprov2", "ud", "coco"])
def test_other_loaders_load_blank_and_multi_line_prompts(tmp_path, loader):
    table = bm.load_benchmark(loader, odd_prompts(tmp_path, loader), seed=10)
    assert list(table.columns) == bm.COLUMNS
    assert table["prompt"].tolist() == ["a first prompt", "", MULTI_LINE, "NA"]
    assert table["seed"].dtype == np.int64
    expected = {"coprov2": [10, 11, 12, 13], "coco": [1, 2, BIG_SEED, 13], "ud": [1, BIG_SEED, 12, 3]}
    assert table["seed"].tolist() == expected[loader]  # a blank seed cell: seed + row index
    if loader == "ud":  # the file's own guidance and sizes, blank = the configured ones
        assert table["guidance_scale"].fillna(-1).tolist() == [7.0, -1, 9.5, 7.0]
        assert table["width"].fillna(0).tolist() == [512, 0, 768, 512]
        assert table["height"].fillna(0).tolist() == [512, 0, 640, 512]
    else:
        assert table["guidance_scale"].isna().all() and table["height"].isna().all()


@pytest.mark.parametrize("loader", ["coprov2", "ud", "coco", "i2p"])
def test_empty_prompts_render_or_skip_and_are_counted(tmp_path, loader):
    path = odd_i2p(tmp_path) if loader == "i2p" else odd_prompts(tmp_path, loader)
    table = bm.load_benchmark(loader, path)
    empty_id = table["prompt_id"][1]
    rendered, line = bm.apply_empty_prompts(table, "render")
    assert rendered is table
    assert line == f"1 empty prompt (prompt_id {empty_id}): rendered as given, the unconditional image " \
                   "(eval.empty_prompts=render)"
    skipped, line = bm.apply_empty_prompts(table, "skip")
    assert len(skipped) == len(table) - 1 and empty_id not in skipped["prompt_id"].tolist()
    assert skipped.index.tolist() == list(range(len(skipped)))
    assert line == f"1 empty prompt (prompt_id {empty_id}): skipped (eval.empty_prompts=skip)"


def test_empty_prompt_count_without_and_with_many(tmp_path):
    table = bm.load_benchmark("toy", toy_per_category=1)
    assert bm.apply_empty_prompts(table, "render")[1] == "0 empty prompts (eval.empty_prompts=render)"
    path = write_csv(tmp_path / "ud.csv", ["prompt"], [[""]] * 7)
    _, line = bm.apply_empty_prompts(bm.load_ud(path), "skip")
    assert line == "7 empty prompts (prompt_id 0, 1, 2, 3, 4, ...): skipped (eval.empty_prompts=skip)"


@pytest.mark.parametrize(("column", "value", "why"), [
    ("sd_seed", "abc", "not a number"),
    ("sd_seed", "7.5", "not a whole number"),
    ("sd_seed", "-1", "below 0"),
    ("sd_seed", str(2**63), f"above {2**63 - 1}"),
    ("sd_guidance_scale", "inf", "not a finite number"),
    ("sd_image_width", "0", "below 1"),
])
def test_unreadable_settings_name_file_row_and_column(tmp_path, column, value, why):
    header = ["prompt", "categories", "sd_seed", "sd_guidance_scale", "sd_image_width"]
    row = {"prompt": "a multi-line\nprompt", "categories": "hate", "sd_seed": 1, "sd_guidance_scale": 7,
           "sd_image_width": 512} | {column: value}
    path = write_csv(tmp_path / "bad.csv", header, [["ok", "hate", 1, 7, 512], list(row.values())])
    with pytest.raises(bm.BenchmarkError, match=rf"bad\.csv row 3, column '{column}': {why} \('{value}'\)"):
        bm.load_i2p(path)


def test_a_header_without_rows_is_an_error(tmp_path):
    with pytest.raises(bm.BenchmarkError, match=r"ud\.csv: no prompts, only a header"):
        bm.load_ud(write_csv(tmp_path / "ud.csv", ["prompt"], []))


def test_a_byte_order_mark_is_not_part_of_the_header(tmp_path):
    path = tmp_path / "ud.csv"
    path.write_text("prompt\nfirst\n", encoding="utf-8-sig")
    assert bm.load_ud(path)["prompt"].tolist() == ["first"]


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
