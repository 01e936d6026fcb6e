"""Prompt sources for evaluation, each read into one prompts table.

Every loader returns a pandas DataFrame with one row per prompt and the columns

- ``prompt_id``: stable id of the prompt within its benchmark (keys image-by-image comparisons),
- ``prompt``: the text, exactly as published (multi-line, ``NA``-like words and blank prompts included),
- ``category``: a canonical category, ``benign`` (a caption that should render as asked) or
  ``unlabelled`` (an unsafe prompt without a category, e.g. Unsafe Diffusion),
- ``categories``: every canonical category of the prompt (I2P prompts can have several; each counts),
- ``seed``: the generation seed (int64: I2P's seeds go up to 2**32 - 1),
- ``guidance_scale`` (float, NaN: the configured one), ``height`` and ``width`` (nullable Int64, <NA>:
  the configured resolution), taken from the file where it has them (see :data:`SETTINGS`).

A benchmark is a published artefact, so every row loads: a blank prompt is a row like any other
(:func:`apply_empty_prompts` renders or skips it per ``eval.empty_prompts`` and counts it either way),
and a blank seed, guidance or size cell means the default (``seed`` + row index, the configured value).
A file that cannot be what its benchmark publishes (a missing column, an unknown category, a seed that
is not a whole number, e.g. ``abc``) raises :class:`BenchmarkError` naming the file, the row (CSV
records, 1-based, header = row 1; a quoted multi-line prompt is one row) and the column, rather than
silently evaluating a different benchmark. A blank line is not a row (CSV readers skip it): in a
one-column file an empty prompt is written ``""``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from safetydpo.categories import CATEGORIES, normalize_category
from safetydpo.config import PROJECT_ROOT
from safetydpo.toyworld.prompts import make_pairs

BENIGN = "benign"
UNLABELLED = "unlabelled"
COLUMNS = ["prompt_id", "prompt", "category", "categories", "seed", "guidance_scale", "height", "width"]
BENCHMARKS = ("toy", "coprov2", "i2p", "ud", "coco")


@dataclass(frozen=True)
class Setting:
    """A per-row generation setting a prompt file may carry."""

    names: tuple[str, ...]  # its column names in the public copies; the first one present is read
    whole: bool  # seeds and sizes are whole numbers
    low: float
    high: float = math.inf


SETTINGS = {
    "seed": Setting(("sd_seed", "evaluation_seed", "seed"), whole=True, low=0, high=2**63 - 1),  # int64
    "guidance_scale": Setting(("sd_guidance_scale", "evaluation_guidance", "guidance_scale"), False, 0),
    "height": Setting(("sd_image_height", "height"), whole=True, low=1),
    "width": Setting(("sd_image_width", "width"), whole=True, low=1),
}


class BenchmarkError(ValueError):
    """A prompt file does not have its benchmark's schema; the message names file, row and column."""


def shared_data_dir() -> Path:
    """``$SAFETYDPO_SHARED_DATA``, else ``<repo>/../shared/data`` (CoProV2, COCO captions, Q16 prompts)."""
    return Path(os.environ.get("SAFETYDPO_SHARED_DATA", PROJECT_ROOT.parent / "shared" / "data"))


DEFAULT_FILES = {"coprov2": "CoProv2_test.csv", "coco": "coco_30k.csv"}


def _read_csv(path: str | Path, required: list[str], benchmark: str) -> pd.DataFrame:
    """Every cell as its text (no NA guessing: a prompt ``NA`` stays ``NA``); a BOM is not a column name."""
    try:
        frame = pd.read_csv(path, keep_default_na=False, dtype=str, encoding="utf-8-sig")
    except (OSError, pd.errors.ParserError, UnicodeDecodeError) as err:
        raise BenchmarkError(f"{benchmark} prompts {path}: cannot read as CSV ({err})") from err
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise BenchmarkError(
            f"{benchmark} prompts {path}: missing column(s) {missing}; found {list(frame.columns)}"
        )
    if frame.empty:
        raise BenchmarkError(f"{benchmark} prompts {path}: no prompts, only a header")
    return frame


def _pick(frame: pd.DataFrame, names: tuple[str, ...], path: str | Path, benchmark: str) -> str:
    for name in names:
        if name in frame.columns:
            return name
    wanted = " or ".join(map(repr, names))
    raise BenchmarkError(f"{benchmark} prompts {path}: missing column {wanted}; found {list(frame.columns)}")


def _number(raw: str, whole: bool) -> float:
    """A non-blank cell as a number; digit strings go through ``int`` so large seeds stay exact."""
    if whole and raw.isascii() and raw.isdigit():
        return int(raw)
    try:
        value = float(raw)
    except ValueError:
        raise ValueError("not a number") from None
    if not math.isfinite(value):
        raise ValueError("not a finite number")
    if whole and not value.is_integer():
        raise ValueError("not a whole number")
    return int(value) if whole else value


def _parse(raw: str, setting: Setting) -> float | None:
    """One cell of ``setting``'s column; None when blank (the default applies)."""
    if not raw:
        return None
    value = _number(raw, setting.whole)
    if value < setting.low:
        raise ValueError(f"below {setting.low}")
    if value > setting.high:
        raise ValueError(f"above {setting.high}")
    return value


def _column(frame: pd.DataFrame, column: str, setting: Setting, path: str | Path) -> list[float | None]:
    out = []
    for row, raw in frame[column].str.strip().items():
        try:
            out.append(_parse(raw, setting))
        except ValueError as err:
            raise BenchmarkError(f"{path} row {row + 2}, column {column!r}: {err} ({raw!r})") from None
    return out


def _defaults(seeds: Sequence[int]) -> pd.DataFrame:
    """Settings of prompts a file gives none for: their seeds, the configured guidance and size."""
    n = len(seeds)
    return pd.DataFrame({
        "seed": np.asarray(seeds, dtype=np.int64),
        "guidance_scale": np.full(n, np.nan),
        "height": pd.array([pd.NA] * n, dtype="Int64"),
        "width": pd.array([pd.NA] * n, dtype="Int64"),
    })


def _settings(frame: pd.DataFrame, path: str | Path, seeds: Sequence[int]) -> pd.DataFrame:
    """Per-row settings from the file's columns where it has them; a blank cell keeps the default."""
    out = _defaults(seeds)
    for name, setting in SETTINGS.items():
        column = next((c for c in setting.names if c in frame.columns), None)
        if column is not None:
            parsed = pd.Series(_column(frame, column, setting, path), dtype=object)
            out[name] = parsed.where(parsed.notna(), out[name]).astype(out[name].dtype)
    return out


def _categories(values: pd.Series, column: str, path: str | Path, many: bool) -> list[list[str]]:
    out = []
    for row, raw in values.items():
        names = [n for n in raw.split(",") if n.strip()] if many else [raw]
        try:
            out.append(list(dict.fromkeys(normalize_category(n) for n in names)))
        except ValueError as err:
            raise BenchmarkError(f"{path} row {row + 2}, column {column!r}: {err}") from None
        if not out[-1]:
            raise BenchmarkError(f"{path} row {row + 2}, column {column!r}: no category")
    return out


def _table(ids, prompts, categories: list[list[str]], settings: pd.DataFrame, category=None) -> pd.DataFrame:
    head = pd.DataFrame({
        "prompt_id": [str(i) for i in ids],
        "prompt": list(prompts),
        "category": category if category is not None else [c[0] if c else UNLABELLED for c in categories],
        "categories": categories,
    })
    return pd.concat([head, settings.reset_index(drop=True)], axis=1)[COLUMNS]


def load_coprov2(path: str | Path, seed: int = 0) -> pd.DataFrame:
    """CoProV2 test prompts (``prompt,image,category``); image i is drawn from seed ``seed + i``."""
    frame = _read_csv(path, ["prompt", "image", "category"], "coprov2")
    cats = _categories(frame["category"], "category", path, many=False)
    return _table(frame["image"].str.rsplit(".", n=1).str[0], frame["prompt"], cats,
                  _settings(frame, path, seed + frame.index))


def load_i2p(path: str | Path, seed: int = 0) -> pd.DataFrame:
    """I2P: comma-separated ``categories``, per-prompt seed, guidance and size (either column naming)."""
    frame = _read_csv(path, ["prompt", "categories"], "i2p")
    for name in ("seed", "guidance_scale"):  # what makes I2P images comparable to the published ones
        _pick(frame, SETTINGS[name].names, path, "i2p")
    ids = frame["case_number"] if "case_number" in frame.columns else frame.index
    return _table(ids, frame["prompt"], _categories(frame["categories"], "categories", path, many=True),
                  _settings(frame, path, seed + frame.index))


def load_ud(path: str | Path, seed: int = 0) -> pd.DataFrame:
    """Unsafe Diffusion (or any CSV with a ``prompt`` column): unlabelled unsafe prompts."""
    frame = _read_csv(path, ["prompt"], "ud")
    return _table(frame.index, frame["prompt"], [[] for _ in range(len(frame))],
                  _settings(frame, path, seed + frame.index))


def load_coco(path: str | Path, seed: int = 0) -> pd.DataFrame:
    """COCO-30k captions (``image_id,source,prompt,evaluation_seed``) for quality: benign prompts."""
    frame = _read_csv(path, ["image_id", "prompt", "evaluation_seed"], "coco")
    return _table(frame["image_id"], frame["prompt"], [[] for _ in range(len(frame))],
                  _settings(frame, path, seed + frame.index), category=[BENIGN] * len(frame))


TOY_UNSAFE, TOY_SAFE = "-unsafe", "-safe"  # toy prompt ids: <pair_id><suffix>


def load_toy(per_category: int, seed: int = 0, split: str = "test") -> pd.DataFrame:
    """The toy world's ``split`` (the test split for evaluation, the validation split for the merge
    search): each pair's unsafe prompt and its safe twin (``benign``), one seed.

    One run then gives IP (unsafe rows) and benign fidelity (safe rows) on the same scenes.
    """
    pairs = make_pairs(split, per_category, seed)
    return pair_prompts([p.pair_id for p in pairs], [p.unsafe_prompt for p in pairs], [p.safe_prompt for p in pairs],
                        [p.category for p in pairs], [p.seed for p in pairs])


def pair_prompts(pair_ids: Sequence[str], unsafe: Sequence[str], safe: Sequence[str], categories: Sequence[str],
                 seeds: Sequence[int]) -> pd.DataFrame:
    """Prompt pairs as a prompts table: each unsafe prompt (its category) and its safe twin (``benign``),
    the twin's id the unsafe one's with :data:`TOY_SAFE` for :data:`TOY_UNSAFE`."""
    settings = _defaults(list(seeds))
    head = _table([f"{i}{TOY_UNSAFE}" for i in pair_ids], unsafe, [[c] for c in categories], settings)
    twins = _table([f"{i}{TOY_SAFE}" for i in pair_ids], safe, [[] for _ in pair_ids], settings,
                   category=[BENIGN] * len(pair_ids))
    return pd.concat([head, twins], ignore_index=True)


_FILE_LOADERS: dict[str, Callable[..., pd.DataFrame]] = {
    "coprov2": load_coprov2, "i2p": load_i2p, "ud": load_ud, "coco": load_coco,
}


def load_benchmark(name: str, path: str | Path | None = None, *, seed: int = 0,
                   toy_per_category: int = 16) -> pd.DataFrame:
    """The prompts of benchmark ``name``; ``path`` overrides the default file (I2P and UD need one)."""
    if name == "toy":
        return load_toy(toy_per_category, seed)
    if name not in _FILE_LOADERS:
        raise BenchmarkError(f"unknown benchmark {name!r}; expected one of {list(BENCHMARKS)}")
    if path is None:
        if name not in DEFAULT_FILES:
            raise BenchmarkError(f"benchmark {name!r} has no default file: pass --prompts PATH "
                                 "(eval.prompts_path)")
        path = shared_data_dir() / DEFAULT_FILES[name]
    if not Path(path).is_file():
        raise BenchmarkError(f"{name} prompts {path}: no such file")
    return _FILE_LOADERS[name](path, seed)


def apply_empty_prompts(table: pd.DataFrame, policy: Literal["render", "skip"]) -> tuple[pd.DataFrame, str]:
    """``table`` under ``eval.empty_prompts``, and a line saying how many prompts were blank and what
    became of them.

    Published benchmarks have blank prompts (I2P case 2260); they are rows of the benchmark, so by
    default they render as given (the unconditional image) and count like any other.
    """
    empty = table["prompt"].str.strip() == ""
    ids = table["prompt_id"][empty].tolist()
    what = "skipped" if policy == "skip" else "rendered as given, the unconditional image"
    shown = f" (prompt_id {', '.join(ids[:5])}{', ...' if len(ids) > 5 else ''}): {what}" if ids else ""
    line = f"{len(ids)} empty prompt{'' if len(ids) == 1 else 's'}{shown} (eval.empty_prompts={policy})"
    return (table[~empty].reset_index(drop=True) if policy == "skip" else table), line


def category_counts(table: pd.DataFrame) -> dict[str, int]:
    """Prompts per category (a prompt counts in each of its categories), then benign and unlabelled."""
    counts = table["categories"].explode().value_counts()
    out = {c: int(counts[c]) for c in CATEGORIES if c in counts}
    for group in (BENIGN, UNLABELLED):
        n = int((table["category"] == group).sum())
        if n:
            out[group] = n
    return out


def limit(table: pd.DataFrame, n: int | None) -> pd.DataFrame:
    """At most ``n`` prompts, taken round-robin over ``category`` in file order.

    A limited run of a file sorted by category (CoProV2) still covers every category.
    """
    if n is None or n >= len(table):
        return table
    rank = table.groupby("category", sort=False).cumcount()
    order = np.lexsort((table.index.to_numpy(), rank.to_numpy()))
    return table.iloc[np.sort(order[:n])].reset_index(drop=True)


def expand_images(table: pd.DataFrame, images_per_prompt: int) -> pd.DataFrame:
    """One row per image: ``image_id`` = ``<prompt_id>/<k>``, drawn from seed ``seed + k``."""
    parts = []
    for k in range(images_per_prompt):
        part = table.assign(image_index=k, seed=table["seed"] + k)
        part.insert(0, "image_id", part["prompt_id"] + f"/{k}")
        parts.append(part)
    return pd.concat(parts, ignore_index=True)
