"""The evaluation report: models side by side on one benchmark.

Writes into the evaluated model's ``eval/<model>/<benchmark>/`` folder and logs to the active MLflow
run under ``report/``: ``ip_table.md`` / ``ip_table.csv`` (IP per category, one column per model),
``ip_by_category.png`` (bar chart with 95% whiskers), ``differences.md`` (each model minus the base
on the same prompts and seeds, paired intervals), ``grid.png`` (the same prompts and seeds across models, a red
frame on flagged images), ``experts.md`` when safety experts are among the models (each on its own
category, beside the evaluated model: :func:`expert_table`) and ``report.md`` tying them together
with the other metrics. The tables are printed on the terminal too.
"""

from __future__ import annotations

import io
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.dataset as pads
from matplotlib.figure import Figure

from safetydpo import storage, tracking
from safetydpo.categories import CATEGORIES, category_slug
from safetydpo.evaluation.benchmarks import BENIGN, limit
from safetydpo.evaluation.metrics import (
    BENIGN_FIDELITY,
    CLIP_SCORE,
    IP,
    IP_BY,
    IP_OVERALL,
    OVERALL,
    REDIRECT,
    REDIRECT_OVERALL,
    TWIN_REDIRECT,
    category_metric,
    differences,
    metric_name,
    samples,
)
from safetydpo.evaluation.uncertainty import Estimate
from safetydpo.model_ids import BASE
from safetydpo.pipelines import decode_png
from safetydpo.plots import image_grid

GRID_COLUMNS = 8  # images per model in the grid, spread over categories

Results = Mapping[str, Mapping[str, float]]  # model -> metric name -> value
Intervals = Mapping[str, Mapping[str, Estimate]]  # model -> metric name -> value with its 95% interval


def ip_rows(results: Results) -> dict[str, str]:
    """Row label -> metric name of the IP table: ``overall``, each category, ``benign``, ``by <classifier>``,
    only those some model measured (a benchmark without benign prompts has no ``benign`` row)."""
    rows = {name: metric_name(IP, name) for name in (OVERALL, *map(category_slug, CATEGORIES), BENIGN)}
    by = metric_name(IP_BY, "")
    rows |= {f"by {k.removeprefix(by)}": k for k in sorted({k for m in results.values() for k in m
                                                             if k.startswith(by)})}
    return {row: key for row, key in rows.items() if any(key in m for m in results.values())}


def _frame(values: Mapping[str, Mapping[str, float]], rows: Mapping[str, str], index: str) -> pd.DataFrame:
    columns = {model: [m.get(k, np.nan) for k in rows.values()] for model, m in values.items()}
    return pd.DataFrame(columns, index=pd.Index(list(rows), name=index), dtype=float)


def ip_table(results: Results) -> pd.DataFrame:
    """IP per :func:`ip_rows` row, one column per model."""
    return _frame(results, ip_rows(results), "ip").dropna(how="all")


def interval_tables(intervals: Intervals, rows: Mapping[str, str], index: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The lower and upper 95% bounds of ``rows`` (label -> metric name), one column per model."""
    low = {model: {k: e.low for k, e in m.items()} for model, m in intervals.items()}
    high = {model: {k: e.high for k, e in m.items()} for model, m in intervals.items()}
    return _frame(low, rows, index), _frame(high, rows, index)


def paired_differences(tables: Mapping[str, pd.DataFrame], classifiers: list[str],
                       reference: str = BASE) -> Intervals:
    """Each model's metrics minus ``reference``'s on the same prompts and seeds, with paired bootstrap
    intervals (:func:`~safetydpo.evaluation.metrics.differences`); empty without ``reference``."""
    if reference not in tables:
        return {}
    base = samples(tables[reference], classifiers)
    return {model: differences(table, base, classifiers) for model, table in tables.items() if model != reference}


def difference_table(diffs: Intervals) -> pd.DataFrame:
    """Rows: overall and per-category IP, redirect, benign fidelity, CLIP score (those measured); one
    column per model; cells ``+0.012 [-0.020, +0.041]``, starred where the interval excludes 0."""
    names = [IP_OVERALL, *(category_metric(IP, c) for c in CATEGORIES), REDIRECT_OVERALL, BENIGN_FIDELITY,
             CLIP_SCORE]
    names = [n for n in names if any(n in d for d in diffs.values())]
    cells = {model: [_signed(d[n]) if n in d else "" for n in names] for model, d in diffs.items()}
    return pd.DataFrame(cells, index=pd.Index(names, name="metric"))


def _signed(e: Estimate) -> str:
    return f"{e.value:+.3f} [{e.low:+.3f}, {e.high:+.3f}]{' *' if e.excludes_zero else ''}"


EXPERT_PREFIX = "expert_"  # report column of the expert of a category: expert_<slug>


def expert_table(results: Results, base: str = "base") -> pd.DataFrame:
    """One row per category whose expert is among ``results``: ``base`` IP on the category, the expert's
    IP on it (and its relative change), the expert's mean IP on the other categories (transfer), and,
    where the toy world measured them, the expert's redirect rate on its category beside ``base``'s and
    beside what ``base``'s images of the safe twins score (``twin_redirect``: the anchor term's
    optimum), and its benign fidelity beside ``base``'s; a column no model measured is left out. Empty
    without ``base`` or experts; an expert is never its own base."""
    rows = {}
    for category in CATEGORIES:
        name = EXPERT_PREFIX + category_slug(category)
        own = category_metric(IP, category)
        expert = results.get(name)
        if expert is None or name == base or base not in results or own not in expert:
            continue
        others = [category_metric(IP, c) for c in CATEGORIES if c != category]
        before, after = results[base].get(own, np.nan), expert[own]
        expert_others = [expert[k] for k in others if k in expert]
        base_others = [results[base][k] for k in others if k in results[base]]
        rows[category] = {
            "base IP": before, "expert IP": after,
            "IP change (relative)": (after - before) / before if before else np.nan,
            "expert IP, other categories": float(np.mean(expert_others)) if expert_others else np.nan,
            "base IP, other categories": float(np.mean(base_others)) if base_others else np.nan,
            "redirect": expert.get(category_metric(REDIRECT, category), np.nan),
            "base redirect": results[base].get(category_metric(REDIRECT, category), np.nan),
            "base twin redirect": results[base].get(category_metric(TWIN_REDIRECT, category), np.nan),
            "benign fidelity": expert.get(BENIGN_FIDELITY, np.nan),
            "base benign fidelity": results[base].get(BENIGN_FIDELITY, np.nan),
        }
    table = pd.DataFrame.from_dict(rows, orient="index").dropna(axis=1, how="all")
    table.index.name = "category"
    return table


def other_metrics(results: Results) -> pd.DataFrame:
    """Every metric but IP, one row each (only those some model measured), one column per model."""
    ip = (metric_name(IP, ""), metric_name(IP_BY, ""))
    keys = sorted({k for m in results.values() for k in m if not k.startswith(ip)})
    return pd.DataFrame({model: [m.get(k, np.nan) for k in keys] for model, m in results.items()},
                        index=pd.Index(keys, name="metric"), dtype=float).dropna(how="all")


def markdown(table: pd.DataFrame, low: pd.DataFrame | None = None, high: pd.DataFrame | None = None) -> str:
    """A pipe table with 3 decimals (no tabulate dependency); with ``low``/``high`` (same labels) each
    number is followed by its interval, ``0.054 [0.031, 0.092]``. Text cells are written as they are."""
    head = [table.index.name or "", *map(str, table.columns)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def cell(name: str, column: str, v: object) -> str:
        if isinstance(v, str):
            return v
        if pd.isna(v):
            return ""
        if low is None or high is None or pd.isna(low.at[name, column]) or pd.isna(high.at[name, column]):
            return f"{v:.3f}"
        return f"{v:.3f} [{low.at[name, column]:.3f}, {high.at[name, column]:.3f}]"

    for name, row in table.iterrows():
        cells = [cell(name, column, v) for column, v in row.items()]
        lines.append("| " + " | ".join([str(name), *cells]) + " |")
    return "\n".join(lines) + "\n"


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    return buf.getvalue()


def bar_chart(table: pd.DataFrame, benchmark: str, low: pd.DataFrame | None = None,
              high: pd.DataFrame | None = None) -> bytes:
    """Grouped bars: IP per category (x), one bar per model, with 95% interval whiskers when given."""
    table = table.drop(index=[i for i in table.index if i.startswith("by ")])
    fig = Figure(figsize=(max(6.0, 1.1 * len(table)), 4.0))
    ax = fig.subplots()
    width = 0.8 / max(1, len(table.columns))
    x = np.arange(len(table))
    for i, model in enumerate(table.columns):
        values = table[model].fillna(0).to_numpy()
        whiskers = None
        if low is not None and high is not None and model in low.columns:
            lo, hi = low.loc[table.index, model].to_numpy(), high.loc[table.index, model].to_numpy()
            whiskers = np.nan_to_num(np.stack([values - lo, hi - values]).clip(min=0))
        ax.bar(x + i * width - 0.4 + width / 2, values, width, label=model, yerr=whiskers, capsize=2)
    ax.set_xticks(x, table.index, rotation=30, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("inappropriate probability")
    ax.set_title(f"IP by category on {benchmark}")
    ax.legend(fontsize="small", ncols=2)
    return _png(fig)


def framed(image: np.ndarray, flagged: bool) -> np.ndarray:
    """``image`` with a red frame (1/16 of its side) when flagged."""
    if not flagged:
        return image
    out = image.copy()
    w = max(1, image.shape[0] // 16)
    out[:w], out[-w:], out[:, :w], out[:, -w:] = (255, 0, 0), (255, 0, 0), (255, 0, 0), (255, 0, 0)
    return out


def comparison_grid(image_sets: Mapping[str, pd.DataFrame], picked: pd.DataFrame) -> bytes:
    """Rows = models, columns = the ``picked`` images (same prompt and seed); flagged ones framed red, blank where
    a model did not render the prompt (an expert renders its own categories')."""
    rows = []
    for images in image_sets.values():
        by_id = images.set_index("image_id")
        rows.append([framed(decode_png(by_id.at[i, "image"]), bool(by_id.at[i, "flagged"])) if i in by_id.index
                     else None for i in picked["image_id"]])
    grid = image_grid(rows, row_labels=list(image_sets), col_labels=[str(c)[:12] for c in picked["category"]])
    buf = io.BytesIO()
    grid.save(buf, format="PNG")
    return buf.getvalue()


def read_images(images_uri: str, columns: list[str] | None = None,
                image_ids: list[str] | None = None) -> pd.DataFrame:
    """Rows of a Ray-written ``images/`` Parquet folder, optionally only some columns or image ids."""
    dataset = pads.dataset(images_uri, format="parquet")
    flt = pads.field("image_id").isin(image_ids) if image_ids is not None else None
    return dataset.to_table(columns=columns or dataset.schema.names, filter=flt).to_pandas()


def counts_line(images: pd.DataFrame) -> str:
    """How many prompts and images stand behind the figures: unsafe and benign prompts, images per prompt."""
    prompts = images.drop_duplicates("prompt_id")
    benign = int((prompts["category"] == BENIGN).sum())
    per_prompt = len(images) / max(1, len(prompts))
    return (f"{len(images)} images of {len(prompts)} prompts ({len(prompts) - benign} unsafe, {benign} benign; "
            f"{per_prompt:g} image(s) per prompt, one seed each). A rate's interval is Wilson's 95% interval over "
            "its images; a difference's is a paired bootstrap over prompts (* where it excludes 0).")


def write_report(folder: str, benchmark: str, results: Results, images_uris: Mapping[str, str],
                 images: pd.DataFrame, intervals: Intervals | None = None,
                 differences: Intervals | None = None) -> dict[str, str]:
    """Write the report of the first model in ``results`` beside the others; log it; returns its files.

    ``intervals``: per model, each metric's 95% interval (shown beside the figures and as whiskers);
    ``differences``: per model, its paired difference from the base (:func:`paired_differences`)."""
    focus = next(iter(results))
    table = ip_table(results)
    low, high = interval_tables(intervals, ip_rows(results), "ip") if intervals else (None, None)
    others = other_metrics(results)
    other_low, other_high = (interval_tables(intervals, {k: k for k in others.index}, "metric") if intervals
                             else (None, None))
    experts = expert_table(results, focus)
    diffs = difference_table(differences) if differences else pd.DataFrame()
    picked = limit(images.drop_duplicates("prompt_id"), GRID_COLUMNS)
    ids = picked["image_id"].tolist()
    image_sets = {m: read_images(uri, ["image_id", "image", "flagged"], ids)
                  for m, uri in images_uris.items()}
    ip_md = markdown(table, low, high)
    report_md = "\n".join([
        f"# Evaluation of `{focus}` on `{benchmark}`", "",
        f"Models side by side: {', '.join(f'`{m}`' for m in results)}. {counts_line(images)}", "",
        "## Inappropriate probability (95% interval)", "", ip_md,
        "![IP by category](ip_by_category.png)", "",
        "## Other metrics", "", markdown(others, other_low, other_high) if len(others) else "none", "",
        *(["## Difference from `base` on the same prompts and seeds (95% paired interval)", "", markdown(diffs), ""]
          if len(diffs) else []),
        *(["## Safety experts (each on its own category)", "", markdown(experts), ""] if len(experts) else []),
        "## Same prompts and seeds across models (red frame: flagged)", "", "![grid](grid.png)", "",
    ])
    files = {
        "ip_table.md": ip_md.encode(),
        "ip_table.csv": table.to_csv().encode(),
        "ip_by_category.png": bar_chart(table, benchmark, low, high),
        "grid.png": comparison_grid(image_sets, picked),
        "report.md": report_md.encode(),
    }
    if len(experts):
        files["experts.md"] = markdown(experts).encode()
    if len(diffs):
        files["differences.md"] = markdown(diffs).encode()
    written = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in files.items():
            written[name] = storage.join(folder, name)
            storage.write_bytes(written[name], data)
            (Path(tmp) / name).write_bytes(data)
            tracking.log_artifact(Path(tmp) / name, "report")
        metrics_json = storage.join(folder, "metrics.json")
        if storage.exists(metrics_json):
            (Path(tmp) / "metrics.json").write_bytes(storage.read_bytes(metrics_json))
            tracking.log_artifact(Path(tmp) / "metrics.json", "report")
    print(f"\nIP on {benchmark} ({counts_line(images)})\n{ip_md}", flush=True)
    if len(others):
        print(markdown(others), flush=True)
    if len(diffs):
        print(f"difference from base\n{markdown(diffs)}", flush=True)
    if len(experts):
        print(f"safety experts on their own category\n{markdown(experts)}", flush=True)
    print(f"report: {written['report.md']}", flush=True)
    return written
