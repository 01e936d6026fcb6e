"""The prompt-pair table of the ``pairs/`` stage, and readers for the finished dataset.

:func:`build_pairs` turns a :class:`DataConfig` into one row per pair in the ``pairs/`` schema
(everything but the images and ``model_id``): the toy world's generator (train + validation
splits) or a CoProV2 file (a seeded, per-category validation split). Every pair carries the seed
both of its images are drawn from. The table is a pure function of the config and the source.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from safetydpo import storage
from safetydpo.categories import CATEGORIES
from safetydpo.config import DataConfig
from safetydpo.data import DataError, coprov2

PROMPT_COLUMNS = ("pair_id", "category", "concept", "unsafe_prompt", "safe_prompt", "seed", "split")
SCHEMA = pa.schema([
    ("pair_id", pa.string()),
    ("category", pa.string()),
    ("concept", pa.string()),
    ("unsafe_prompt", pa.string()),
    ("safe_prompt", pa.string()),
    ("seed", pa.int64()),
    ("split", pa.string()),
    ("unsafe_image", pa.binary()),  # PNG
    ("safe_image", pa.binary()),  # PNG
    ("model_id", pa.string()),
])
MANIFEST = "manifest.json"  # written last: a pairs dataset is complete iff it has one
_SHARD = re.compile(r"shard-(\d{5})\.parquet")
_TEMP = re.compile(r"\.shard-\d{5}\.parquet\..*\.tmp")  # storage.write_bytes' temp name of a shard


@dataclass
class PromptPairs:
    """The pair table and, for a CoProV2 source, the rows dropped by ``skip_bad_rows``."""

    table: pd.DataFrame  # PROMPT_COLUMNS, one row per pair
    skipped_rows: dict[str, int] = field(default_factory=dict)


def pair_seed(seed: int, pair_id: str) -> int:
    """Seed of a pair's two images: a hash of (data seed, pair id), so filters never change it."""
    digest = hashlib.sha256(f"{seed}/{pair_id}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def split_sizes(total: int, val_fraction: float) -> tuple[int, int]:
    """(train, validation) pairs out of ``total``; validation is ``val_fraction`` of it, rounded."""
    n_val = int(round(total * val_fraction))
    return total - n_val, n_val


def toy_pairs(data: DataConfig) -> pd.DataFrame:
    """Toy-world pairs: ``toy_pairs_per_category`` train pairs plus a ``val_fraction`` of validation.

    ``per_category_limit`` caps train + validation together. Train and validation wordings come
    from disjoint caption layouts (see ``toyworld.prompts``).
    """
    from safetydpo.toyworld.prompts import make_pairs

    n_train = data.toy_pairs_per_category
    total = n_train + int(round(n_train * data.val_fraction / (1.0 - data.val_fraction)))
    if data.per_category_limit is not None:
        total = min(total, data.per_category_limit)
    n_train, n_val = split_sizes(total, data.val_fraction)
    categories = data.selected_categories()
    rows = [pair.to_dict() for split, n in (("train", n_train), ("validation", n_val)) if n
            for pair in make_pairs(split, n, seed=data.seed, categories=categories)]
    table = pd.DataFrame(rows, columns=list(PROMPT_COLUMNS))[list(PROMPT_COLUMNS)]
    order = {c: i for i, c in enumerate(CATEGORIES)}
    return table.sort_values("category", key=lambda c: c.map(order), kind="stable").reset_index(drop=True)


def coprov2_pairs(data: DataConfig) -> PromptPairs:
    """CoProV2 pairs of the selected categories: per category a seeded sample of at most
    ``per_category_limit`` pairs, of which ``val_fraction`` (rounded) become validation."""
    if not data.path:
        raise DataError("data.source is 'coprov2' but data.path is not set (a CSV path, URI or hf:<id>)")
    loaded = coprov2.load_pairs(data.path, skip_bad_rows=data.skip_bad_rows)
    frames = []
    for index, category in enumerate(CATEGORIES):
        if category not in data.selected_categories():
            continue
        rows = loaded.pairs[loaded.pairs["category"] == category]
        order = np.random.default_rng([data.seed, index]).permutation(len(rows))
        if data.per_category_limit is not None:
            order = order[:data.per_category_limit]
        _, n_val = split_sizes(len(order), data.val_fraction)
        split = np.full(len(rows), "", dtype=object)
        split[order[:n_val]] = "validation"
        split[order[n_val:]] = "train"
        frames.append(rows.assign(split=split)[split != ""])
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(PROMPT_COLUMNS))
    table["seed"] = [pair_seed(data.seed, pid) for pid in table["pair_id"]]
    return PromptPairs(table=table[list(PROMPT_COLUMNS)], skipped_rows=dict(loaded.skipped))


def build_pairs(data: DataConfig) -> PromptPairs:
    """The pair table ``data`` selects; raises :class:`DataError` when nothing is left to render."""
    pairs = coprov2_pairs(data) if data.source == "coprov2" else PromptPairs(toy_pairs(data))
    if pairs.table.empty:
        raise DataError(f"data selects no pairs (source={data.source!r}, path={data.path!r}, "
                         f"categories={data.selected_categories()})")
    pairs.table["seed"] = pairs.table["seed"].astype("int64")
    return pairs


def shard_name(shard: int) -> str:
    return f"shard-{shard:05d}.parquet"


def _listing(path: str) -> list[str]:
    fs, base = storage.filesystem(path)
    return [info.base_name for info in fs.get_file_info(pafs.FileSelector(base, allow_not_found=True))]


def finished_shards(path: str) -> set[int]:
    """Shards already written under ``path`` (each file is complete: shards are written atomically)."""
    return {int(m[1]) for name in _listing(path) if (m := _SHARD.fullmatch(name))}


def write_shard(path: str, shard: int, rows: pd.DataFrame) -> str:
    """Write one shard (the ``pairs/`` schema columns of ``rows``) as one atomic Parquet file."""
    table = pa.Table.from_pandas(rows[SCHEMA.names], schema=SCHEMA, preserve_index=False)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    uri = storage.join(path, shard_name(shard))
    storage.write_bytes(uri, sink.getvalue().to_pybytes())
    return uri


def shard_rows(path: str, names: list[str]) -> dict[str, int]:
    """Rows of each named shard file, from the Parquet footers (no data read)."""
    counts = {}
    for name in names:
        fs, file_path = storage.filesystem(storage.join(path, name))
        with fs.open_input_file(file_path) as handle:
            counts[name] = pq.read_metadata(handle).num_rows
    return counts


def remove_stale_temp_files(path: str) -> int:
    """Delete temp files a killed writer left under a local ``path``; returns how many."""
    if storage.is_remote(path):
        return 0  # object stores have no temp files: a put is atomic
    stale = [name for name in _listing(path) if _TEMP.fullmatch(name)]
    for name in stale:
        Path(path.removeprefix("file://"), name).unlink(missing_ok=True)
    return len(stale)


def _shard_files(path: str) -> list[str]:
    if not storage.exists(storage.join(path, MANIFEST)):
        raise DataError(f"{path} is not a finished pairs dataset (no {MANIFEST}: "
                        "run jobs/generate.py, it resumes an interrupted run)")
    return [storage.join(path, name) for name in storage.read_json(storage.join(path, MANIFEST))["files"]]


def dataset_files(pairs: str) -> tuple[pafs.FileSystem, list[str]]:
    """The Parquet files of a finished pairs dataset (those its manifest lists), or the one Parquet
    file given, as a ``pyarrow.fs`` filesystem and paths in it (what ``ray.data.read_parquet`` takes)."""
    fs, path = storage.filesystem(pairs)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File and path.endswith(".parquet"):
        return fs, [path]
    if info.type != pafs.FileType.Directory:
        raise DataError(f"pairs path {pairs} does not exist")
    return fs, [storage.filesystem(uri)[1] for uri in _shard_files(pairs)]


def read_pairs(path: str, columns: list[str] | None = None):
    """A finished pairs dataset as a ``ray.data.Dataset`` (only the shards its manifest lists)."""
    import ray.data

    dataset = ray.data.read_parquet(_shard_files(path))
    return dataset.select_columns(columns) if columns else dataset


def read_pairs_pandas(path: str, columns: list[str] | None = None,
                      filters: list[tuple] | None = None) -> pd.DataFrame:
    """A finished pairs dataset as one DataFrame in pair order; ``columns`` and pyarrow ``filters``
    (e.g. ``[("category", "=", "Hate")]``) keep the read small."""
    tables = []
    for uri in _shard_files(path):
        fs, file_path = storage.filesystem(uri)
        tables.append(pq.read_table(file_path, filesystem=fs, columns=columns, filters=filters,
                                    schema=SCHEMA))
    return pa.concat_tables(tables).to_pandas()
