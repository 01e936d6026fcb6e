"""Prompt sources for evaluation, each read into one prompts table.

Every loader returns a pandas DataFrame with one row per prompt and the columns

- ``prompt_id``: stable id of the prompt within its benchmark (keys image-by-image comparisons),
- ``prompt``: the text,
- ``category``: a canonical category, ``benign`` (a caption that should render as asked) or
  ``unlabelled`` (an unsafe prompt without a category, e.g. Unsafe Diffusion),
- ``categories``: every canonical category of the prompt (I2P prompts can have several; each counts),
- ``seed``: the generation seed, and ``guidance_scale`` (NaN: the configured one).

A file with a missing column, an empty prompt or an unknown category raises :class:`BenchmarkError`
naming the file, the row (1-based, header = row 1) and the column.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from safetydpo.categories import CATEGORIES, normalize_category
from safetydpo.config import PROJECT_ROOT
from safetydpo.toyworld.prompts import make_pairs

BENIGN = "benign"
UNLABELLED = "unlabelled"
COLUMNS = ["prompt_id", "prompt", "category", "categories", "seed", "guidance_scale"]
BENCHMARKS = ("toy", "coprov2", "i2p", "ud", "coco")
# I2P's generation settings go by two names in the public copies.
I2P_SEED = ("sd_seed", "evaluation_seed")
I2P_GUIDANCE = ("sd_guidance_scale", "evaluation_guidance")


class BenchmarkError(ValueError):
    """A prompt file does not have its benchmark's schema; the message names file, row and column."""


def shared_data_dir() -> Path:
    """``$SAFETYDPO_SHARED_DATA``, else ``<repo>/../shared/data`` (CoProV2, COCO captions, Q16 prompts)."""
    return Path(os.environ.get("SAFETYDPO_SHARED_DATA", PROJECT_ROOT.parent / "shared" / "data"))


DEFAULT_FILES = {"coprov2": "CoProv2_test.csv", "coco": "coco_30k.csv"}


def _read_csv(path: str | Path, required: list[str], benchmark: str) -> pd.DataFrame:
    try:
        frame = pd.read_csv(path, keep_default_na=False, dtype=str)
    except (OSError, pd.errors.ParserError, UnicodeDecodeError) as err:
        raise BenchmarkError(f"{benchmark} prompts {path}: cannot read as CSV ({err})") from err
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise BenchmarkError(
            f"{benchmark} prompts {path}: missing column(s) {missing}; found {list(frame.columns)}"
        )
    empty = frame.index[frame["prompt"].str.strip() == ""]
    if len(empty):
        raise BenchmarkError(f"{path} row {empty[0] + 2}, column 'prompt': empty prompt")
    return frame


def _pick(frame: pd.DataFrame, names: tuple[str, ...], path: str | Path, benchmark: str) -> str:
    for name in names:
        if name in frame.columns:
            return name
    wanted = " or ".join(map(repr, names))
    raise BenchmarkError(f"{benchmark} prompts {path}: missing column {wanted}; found {list(frame.columns)}")


def _numbers(frame: pd.DataFrame, column: str, path: str | Path, kind: type) -> np.ndarray:
    values = pd.to_numeric(frame[column].str.strip(), errors="coerce")
    bad = values.index[values.isna()]
    if len(bad):
        value = frame[column][bad[0]]
        raise BenchmarkError(f"{path} row {bad[0] + 2}, column {column!r}: not a number ({value!r})")
    return values.to_numpy().astype(kind)


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


def _table(ids, prompts, categories: list[list[str]], seeds, guidance=None, category=None) -> pd.DataFrame:
    n = len(prompts)
    return pd.DataFrame({
        "prompt_id": [str(i) for i in ids],
        "prompt": list(prompts),
        "category": category if category is not None else [c[0] if c else UNLABELLED for c in categories],
        "categories": categories,
        "seed": np.asarray(seeds, dtype=np.int64),
        "guidance_scale": np.full(n, np.nan) if guidance is None else np.asarray(guidance, dtype=float),
    })[COLUMNS]


def load_coprov2(path: str | Path, seed: int = 0) -> pd.DataFrame:
    """CoProV2 test prompts (``prompt,image,category``); image i is drawn from seed ``seed + i``."""
    frame = _read_csv(path, ["prompt", "image", "category"], "coprov2")
    cats = _categories(frame["category"], "category", path, many=False)
    return _table(frame["image"].str.rsplit(".", n=1).str[0], frame["prompt"], cats, seed + frame.index)


def load_i2p(path: str | Path, seed: int = 0) -> pd.DataFrame:
    """I2P: comma-separated ``categories``, per-prompt seed and guidance (either column naming)."""
    frame = _read_csv(path, ["prompt", "categories"], "i2p")
    seed_col, guidance_col = _pick(frame, I2P_SEED, path, "i2p"), _pick(frame, I2P_GUIDANCE, path, "i2p")
    ids = frame["case_number"] if "case_number" in frame.columns else frame.index
    return _table(ids, frame["prompt"], _categories(frame["categories"], "categories", path, many=True),
                  _numbers(frame, seed_col, path, np.int64), _numbers(frame, guidance_col, path, float))


def load_ud(path: str | Path, seed: int = 0) -> pd.DataFrame:
    """Unsafe Diffusion (or any CSV with a ``prompt`` column): unlabelled unsafe prompts."""
    frame = _read_csv(path, ["prompt"], "ud")
    return _table(frame.index, frame["prompt"], [[] for _ in range(len(frame))], seed + frame.index)


def load_coco(path: str | Path, seed: int = 0) -> pd.DataFrame:
    """COCO-30k captions (``image_id,source,prompt,evaluation_seed``) for quality: benign prompts."""
    frame = _read_csv(path, ["image_id", "prompt", "evaluation_seed"], "coco")
    return _table(frame["image_id"], frame["prompt"], [[] for _ in range(len(frame))],
                  _numbers(frame, "evaluation_seed", path, np.int64), category=[BENIGN] * len(frame))


TOY_UNSAFE, TOY_SAFE = "-unsafe", "-safe"  # toy prompt ids: <pair_id><suffix>


def load_toy(per_category: int, seed: int = 0) -> pd.DataFrame:
    """The toy world's test split: each pair's unsafe prompt and its safe twin (``benign``), one seed.

    One run then gives IP (unsafe rows) and benign fidelity (safe rows) on the same scenes.
    """
    pairs = make_pairs("test", per_category, seed)
    unsafe = _table([p.pair_id + TOY_UNSAFE for p in pairs], [p.unsafe_prompt for p in pairs],
                    [[p.category] for p in pairs], [p.seed for p in pairs])
    safe = _table([p.pair_id + TOY_SAFE for p in pairs], [p.safe_prompt for p in pairs],
                  [[] for _ in pairs], [p.seed for p in pairs], category=[BENIGN] * len(pairs))
    return pd.concat([unsafe, safe], ignore_index=True)


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
