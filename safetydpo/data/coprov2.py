"""The released CoProV2 prompt lists: CSV rows ``prompt,image,category`` paired into (unsafe, safe) twins.

Row ``u_idx_N_K.jpg`` is unsafe prompt N and ``s_idx_N_K.jpg`` its minimally different safe twin.
One N can appear under several categories (the same prompt filed as Hate and as Sexual), so a
pair is keyed by (N, category). Problems are reported by file and row (data rows count from 1,
the header excluded); with ``skip_bad_rows`` the bad rows, and the twins they leave alone, are
dropped and counted instead.

Sources: a local path, any URI ``pyarrow.fs`` opens (``s3://``, ``gs://``, ``file://``), or
``hf:<dataset id>[:split]`` through the optional ``datasets`` package.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from dataclasses import dataclass, field

import pandas as pd
import pyarrow.fs as pafs

from safetydpo.categories import normalize_category
from safetydpo.data import DataError

logger = logging.getLogger(__name__)

COLUMNS = ("prompt", "image", "category")
_IMAGE = re.compile(r"^(?P<kind>[us])_idx_(?P<idx>\d+)_\d+\.\w+$")
_KIND_NAME = {"u": "unsafe", "s": "safe"}
_MAX_LISTED = 5  # problems spelled out in one error message


class CoProV2Error(DataError):
    """A CoProV2 source is unreadable or malformed; the message names the file, row and problem."""


@dataclass(frozen=True)
class Problem:
    row: int  # 1-based data row
    kind: str  # short key, counted when rows are skipped
    message: str


@dataclass
class CoProV2Pairs:
    """The pairs of one source and what was dropped to get them."""

    source: str
    rows: int  # data rows read
    pairs: pd.DataFrame  # pair_id, category, concept, unsafe_prompt, safe_prompt (file order)
    skipped: Counter = field(default_factory=Counter)  # problem kind -> rows dropped


def read_frame(source: str) -> pd.DataFrame:
    """All cells of ``source`` as strings (empty cells stay ``""``, never NaN)."""
    if source.startswith("hf:"):
        return _read_hub(source)
    try:
        if "://" in source:
            fs, path = pafs.FileSystem.from_uri(source)
            with fs.open_input_stream(path) as stream:
                return pd.read_csv(stream, dtype=str, keep_default_na=False)
        return pd.read_csv(source, dtype=str, keep_default_na=False)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise CoProV2Error(f"{source}: cannot read CoProV2 CSV: {err}") from err


def _read_hub(source: str) -> pd.DataFrame:
    dataset_id, _, split = source.removeprefix("hf:").partition(":")
    try:
        import datasets
    except ImportError as err:
        raise CoProV2Error(f"{source}: hf: sources need the optional `datasets` package "
                           "(pip install datasets), or pass a local CSV path") from err
    try:
        table = datasets.load_dataset(dataset_id, split=split or "train").to_pandas()
    except Exception as err:  # hub unreachable, unknown id or split: all surface as one clear error
        raise CoProV2Error(f"{source}: cannot load Hugging Face dataset {dataset_id!r}: {err}") from err
    return table.astype(str)


def _check_columns(frame: pd.DataFrame, source: str) -> None:
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        raise CoProV2Error(f"{source}: missing column(s) {missing}; found {list(frame.columns)} "
                           f"(expected {list(COLUMNS)})")
    if len(frame) and not frame["image"].str.match(_IMAGE).any():
        raise CoProV2Error(
            f"{source}: no image name of the form u_idx_N_K.jpg / s_idx_N_K.jpg (row 1 has "
            f"{frame['image'].iloc[0]!r}); this is not a paired CoProV2 file (CoProv2_test.csv "
            "lists unsafe prompts only)")


def _row_problems(frame: pd.DataFrame) -> tuple[list[Problem], list[tuple[int, str, str, str, str]]]:
    """Per-row checks; returns the problems and the good rows as (row, kind, idx, category, prompt)."""
    problems, good = [], []
    seen: dict[tuple[str, str, str], int] = {}
    for row, (prompt, image, category) in enumerate(frame[list(COLUMNS)].itertuples(index=False), 1):
        prompt = prompt.strip()
        match = _IMAGE.match(image.strip())
        if not prompt:
            problems.append(Problem(row, "empty prompt", f"row {row}: empty prompt (image {image!r})"))
            continue
        if match is None:
            problems.append(Problem(row, "bad image name",
                                    f"row {row}: image {image!r} is not u_idx_N_K.jpg or s_idx_N_K.jpg"))
            continue
        try:
            category = normalize_category(category)
        except ValueError as err:
            problems.append(Problem(row, "unknown category", f"row {row}: {err}"))
            continue
        key = (match["kind"], match["idx"], category)
        if key in seen:
            problems.append(Problem(row, "duplicate row",
                                    f"row {row}: {image!r} ({category}) repeats row {seen[key]}"))
            continue
        seen[key] = row
        good.append((row, match["kind"], match["idx"], category, prompt))
    return problems, good


def _pair_rows(good: list[tuple[int, str, str, str, str]]) -> tuple[list[Problem], list[dict]]:
    """Join unsafe and safe rows on (N, category); a row without its twin is a problem."""
    twins: dict[tuple[str, str], dict[str, tuple[int, str]]] = {}
    for row, kind, idx, category, prompt in good:
        twins.setdefault((idx, category), {})[kind] = (row, prompt)
    problems, pairs = [], []
    for (idx, category), sides in twins.items():
        if len(sides) == 2:
            pairs.append({
                "row": sides["u"][0],
                "pair_id": f"coprov2-{idx}-{category.lower().replace(' ', '_')}",
                "category": category,
                "concept": "",  # CoProV2's CSV does not name the concept
                "unsafe_prompt": sides["u"][1],
                "safe_prompt": sides["s"][1],
            })
            continue
        (kind, (row, _)), = sides.items()
        other = "s" if kind == "u" else "u"
        problems.append(Problem(
            row, f"{_KIND_NAME[kind]} row without its twin",
            f"row {row}: {_KIND_NAME[kind]} prompt {kind}_idx_{idx} ({category}) has no "
            f"{_KIND_NAME[other]} twin {other}_idx_{idx} in the same category"))
    return problems, pairs


def _error(source: str, problems: list[Problem]) -> CoProV2Error:
    problems = sorted(problems, key=lambda p: p.row)
    lines = [f"{source}: {p.message}" for p in problems[:_MAX_LISTED]]
    if len(problems) > _MAX_LISTED:
        lines.append(f"... and {len(problems) - _MAX_LISTED} more problem(s)")
    lines.append("(skip_bad_rows / --skip-bad-rows drops bad rows and counts them instead)")
    return CoProV2Error("\n".join(lines))


def load_pairs(source: str, *, skip_bad_rows: bool = False) -> CoProV2Pairs:
    """The (unsafe, safe) pairs of a CoProV2 file, categories normalised, in file order.

    Raises :class:`CoProV2Error` on the first bad source and, unless ``skip_bad_rows``, on any
    bad row (listing the first few); with it, bad rows are dropped and logged as counts.
    """
    frame = read_frame(source)
    _check_columns(frame, source)
    row_problems, good = _row_problems(frame)
    twin_problems, pairs = _pair_rows(good)
    problems = row_problems + twin_problems
    if problems and not skip_bad_rows:
        raise _error(source, problems)
    skipped = Counter(p.kind for p in problems)
    if problems:
        logger.warning("%s: skipped %d bad row(s) of %d: %s", source, len(problems), len(frame),
                       ", ".join(f"{kind}: {n}" for kind, n in sorted(skipped.items())))
    columns = ["row", "pair_id", "category", "concept", "unsafe_prompt", "safe_prompt"]
    table = pd.DataFrame(pairs, columns=columns)
    table = table.sort_values("row", kind="stable").drop(columns="row").reset_index(drop=True)
    return CoProV2Pairs(source=source, rows=len(frame), pairs=table, skipped=skipped)
