"""The experts' data: check the pairs once, describe each expert, and read its rows with Ray Data.

:func:`scan_pairs` reads the ``pairs/`` Parquet once, checks every row the experts will train on and
hashes them (the data part of an expert's fingerprint); :func:`pairs_dataset` and
:func:`benign_dataset` are the Ray Data datasets the trainer shards over its workers.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
from ray.data.expressions import col

from safetydpo import storage
from safetydpo.categories import CATEGORIES, normalize_category
from safetydpo.data import DataError
from safetydpo.data.pairs import dataset_files
from safetydpo.experts.spec import ALL, ExpertError, ExpertSpec

COLUMNS = ("pair_id", "category", "unsafe_prompt", "safe_prompt", "seed", "split",
           "unsafe_image", "safe_image")
TRAIN_SPLIT = "train"
PREVIEW_SPLIT = "validation"
PREVIEW_IMAGES = 4  # before/after columns in an expert's image grid
_MAX_LISTED = 5


def pairs_files(pairs: str) -> tuple[pafs.FileSystem, list[str]]:
    """:func:`~safetydpo.data.pairs.dataset_files`, with its errors as :class:`ExpertError`."""
    try:
        return dataset_files(pairs)
    except DataError as err:
        raise ExpertError(str(err)) from None


@dataclass
class _CategoryScan:
    values: set[str] = field(default_factory=set)
    pairs: int = 0
    digest: Any = field(default_factory=hashlib.sha256)
    preview: dict[str, list[tuple[str, int]]] = field(
        default_factory=lambda: {TRAIN_SPLIT: [], PREVIEW_SPLIT: []})


def _scan_file(fs: pafs.FileSystem, path: str, scans: dict[str, _CategoryScan], problems: list[str]) -> None:
    with fs.open_input_file(path) as handle:
        parquet = pq.ParquetFile(handle)
        missing = [c for c in COLUMNS if c not in parquet.schema_arrow.names]
        if missing:
            problems.append(f"{path}: missing column(s) {missing}")
            return
        row = 0
        for batch in parquet.iter_batches(columns=list(COLUMNS), batch_size=256):
            cols = batch.to_pydict()
            for i in range(batch.num_rows):
                row += 1
                where = f"{path} row {row} (pair_id {cols['pair_id'][i]!r})"
                try:
                    category = normalize_category(cols["category"][i])
                except ValueError as err:
                    problems.append(f"{where}: {err}")
                    continue
                split = cols["split"][i]
                if split not in (TRAIN_SPLIT, PREVIEW_SPLIT):
                    continue
                empty = [c for c in ("unsafe_image", "safe_image", "unsafe_prompt", "safe_prompt")
                         if not cols[c][i]]
                if empty:
                    problems.append(f"{where}: {', '.join(empty)} missing")
                    continue
                scan = scans[category]
                scan.values.add(cols["category"][i])
                scan.preview[split].append((cols["unsafe_prompt"][i], int(cols["seed"][i])))
                if split == TRAIN_SPLIT:
                    scan.pairs += 1
                    for c in ("pair_id", "unsafe_prompt", "safe_prompt"):
                        scan.digest.update(str(cols[c][i]).encode() + b"\0")
                    scan.digest.update(hashlib.sha256(cols["unsafe_image"][i]).digest())
                    scan.digest.update(hashlib.sha256(cols["safe_image"][i]).digest())


def scan_pairs(pairs: str, names: list[str], num_workers: int = 1,
               all_categories: tuple[str, ...] = CATEGORIES) -> dict[str, ExpertSpec]:
    """Check the pairs data and describe each expert of ``names`` (categories and/or ``all``, which
    trains on ``all_categories``).

    Raises :class:`ExpertError` naming file, row and pair for unreadable rows, missing images or
    prompts, unknown categories, and naming the category for one with no (or too few) training pairs.
    """
    fs, files = pairs_files(pairs)
    scans = {c: _CategoryScan() for c in CATEGORIES}
    problems: list[str] = []
    for path in files:
        _scan_file(fs, path, scans, problems)
    benign_hash = storage.fingerprint([scan.digest.hexdigest() for scan in scans.values() if scan.pairs], length=16)
    specs = {}
    for name in names:
        categories = tuple(all_categories) if name == ALL else (normalize_category(name),)
        count = sum(scans[c].pairs for c in categories)
        empty = [c for c in categories if scans[c].pairs == 0]
        if empty:
            problems.append(f"expert {name!r}: no {TRAIN_SPLIT} pairs for {empty} in {pairs}")
        elif count < num_workers:
            problems.append(f"expert {name!r}: {count} {TRAIN_SPLIT} pairs cannot feed {num_workers} workers")
        per_category = max(1, PREVIEW_IMAGES // len(categories))
        preview = [p for c in categories
                   for p in (scans[c].preview[PREVIEW_SPLIT] or scans[c].preview[TRAIN_SPLIT])[:per_category]]
        specs[name] = ExpertSpec(
            name=name, categories=categories,
            file_values=tuple(sorted(v for c in categories for v in scans[c].values)),
            num_pairs=count,
            data_hash=storage.fingerprint([scans[c].digest.hexdigest() for c in categories], length=16),
            preview_prompts=tuple(p for p, _ in preview), preview_seeds=tuple(s for _, s in preview),
            benign_hash=benign_hash,
        )
    if problems:
        listed = "\n  ".join(problems[:_MAX_LISTED])
        more = f"\n  ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
        raise ExpertError(f"pairs data {pairs} cannot train the experts:\n  {listed}{more}")
    return specs


def pairs_dataset(pairs: str, spec: ExpertSpec, seed: int) -> ray.data.Dataset:
    """The expert's training rows, read once into the object store (filter and columns pushed into the read).

    Training loops over these rows for many epochs; materialised, each epoch replays blocks from the
    object store instead of listing and reading the Parquet files again (which, for a category's few
    thousand pairs, cost more than the epoch's DPO steps). Workers reshuffle every epoch as they iterate.
    """
    rows = (col("split") == TRAIN_SPLIT) & col("category").is_in(list(spec.file_values))
    return _read(pairs, rows, ["pair_id", "unsafe_prompt", "safe_prompt", "unsafe_image", "safe_image"], seed)


def benign_dataset(pairs: str, seed: int) -> ray.data.Dataset:
    """The safe twins of every category's training pairs (prompt and image): the preservation term's inputs."""
    return _read(pairs, col("split") == TRAIN_SPLIT, ["pair_id", "safe_prompt", "safe_image"], seed)


def _read(pairs: str, rows, columns: list[str], seed: int) -> ray.data.Dataset:
    """Rows in an order fixed by the files and ``seed`` (read in file order, blocks shuffled with ``seed``),
    so two runs of one config, or a resumed one, train on the same sequence."""
    fs, files = pairs_files(pairs)
    # A dataset keeps the DataContext it was made under: training iterates it epoch after epoch, and each
    # epoch's progress bars would flood the job's log.
    context = ray.data.DataContext.get_current()
    shown, context.enable_progress_bars = context.enable_progress_bars, False
    ordered, context.execution_options.preserve_order = context.execution_options.preserve_order, True
    try:
        dataset = ray.data.read_parquet(files, filesystem=fs).filter(expr=rows).select_columns(columns)
        return dataset.materialize().randomize_block_order(seed=seed)
    finally:
        context.enable_progress_bars = shown
        context.execution_options.preserve_order = ordered
