"""The pairs/ stage on real Ray, the real toy pipeline and real files: schema, shared seeds,
determinism, resume after a kill, reuse, MLflow logging and the entrypoint."""

from __future__ import annotations

import csv
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
import yaml
from PIL import Image

from safetydpo import stages, storage, tracking
from safetydpo.config import PROJECT_ROOT, Config, GenerationConfig, ModelConfig, build_config
from safetydpo.data import DataError
from safetydpo.data.pairs import MANIFEST, SCHEMA, build_pairs, read_pairs, read_pairs_pandas
from safetydpo.generation import PairRenderer, dataset_fingerprint, generate_pairs, pairs_location
from safetydpo.pipelines import decode_png
from safetydpo.plots import image_grid
from safetydpo.rendering import PromptRenderer

GENERATE = PROJECT_ROOT / "jobs" / "generate.py"
# 2 categories x (4 train + 1 validation) = 10 pairs in shards of 3, 3, 3, 1.
SMALL = {
    "data": {"categories": ["Hate", "Violence"], "toy_pairs_per_category": 4, "val_fraction": 0.2},
    "generation": {"num_inference_steps": 4, "guidance_scale": 5.0, "batch_size": 3, "num_actors": 2},
}


def small_config(run_root: Path, tmp: Path, data: dict | None = None, **generation) -> Config:
    return build_config({
        "run_root": str(run_root),
        "tracking": {"tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}", "experiment": "test"},
        "data": {**SMALL["data"], **(data or {})},
        "generation": {**SMALL["generation"], **generation},
    })


@pytest.fixture(scope="module")
def reference(ray_local, tmp_path_factory) -> tuple[Config, str]:
    """One uninterrupted run with two actors: the dataset the other tests compare against."""
    tmp = tmp_path_factory.mktemp("reference")
    config = small_config(tmp / "run", tmp)
    return config, generate_pairs(config)


def test_output_schema_and_manifest(reference):
    config, path = reference
    assert Path(path).parent == Path(config.run_root) / "pairs"
    frame = read_pairs_pandas(path)
    assert list(frame.columns) == SCHEMA.names
    assert pq.read_schema(Path(path) / "shard-00000.parquet").remove_metadata().equals(SCHEMA)
    expected = build_pairs(config.data).table
    assert frame[expected.columns].equals(expected)
    assert frame["pair_id"].is_unique and len(frame) == 10
    assert (frame["model_id"] == "toy").all()
    for column in ("unsafe_image", "safe_image"):
        images = np.stack([decode_png(b) for b in frame[column]])
        assert images.shape == (10, 32, 32, 3) and images.dtype == np.uint8
    manifest = storage.read_json(str(Path(path) / MANIFEST))
    assert manifest["files"] == [f"shard-{i:05d}.parquet" for i in range(4)]
    assert sorted(p.name for p in Path(path).iterdir()) == sorted([*manifest["files"], MANIFEST])
    assert manifest["categories"] == {"Hate": {"train": 4, "validation": 1},
                                      "Violence": {"train": 4, "validation": 1}}
    assert manifest["last_run"]["pairs_rendered"] == 10 and manifest["last_run"]["pairs_per_s"] > 0
    assert read_pairs(path, columns=["pair_id", "seed"]).count() == 10


def test_finished_dataset_is_reused(reference):
    config, path = reference
    before = {p.name: p.stat().st_mtime_ns for p in Path(path).iterdir()}
    assert generate_pairs(config) == path
    assert {p.name: p.stat().st_mtime_ns for p in Path(path).iterdir()} == before


def test_twins_share_the_seed(ray_local, tmp_path):
    """With identical unsafe and safe prompts, a pair's two images are bit-identical: the same seed
    and the same batch. Two pairs with the same prompts but their own seeds differ."""
    rows = [("a gun on a table", "u_idx_0000000_0.jpg", "Violence"),
            ("a gun on a table", "s_idx_0000000_0.jpg", "Violence"),
            ("a knife in a kitchen", "u_idx_0000001_0.jpg", "Violence"),
            ("a spoon in a kitchen", "s_idx_0000001_0.jpg", "Violence"),
            ("a gun on a table", "u_idx_0000002_0.jpg", "Violence"),
            ("a gun on a table", "s_idx_0000002_0.jpg", "Violence")]
    csv_path = tmp_path / "twins.csv"
    with csv_path.open("w", newline="") as f:
        csv.writer(f).writerows([("prompt", "image", "category"), *rows])
    data = {"source": "coprov2", "path": str(csv_path), "categories": None, "val_fraction": 0.0}
    config = small_config(tmp_path / "run", tmp_path, data=data, num_actors=1)
    frame = read_pairs_pandas(generate_pairs(config))
    same = frame[frame["pair_id"] != "coprov2-0000001-violence"]
    assert (same["unsafe_image"] == same["safe_image"]).all()
    assert same["seed"].nunique() == 2
    assert same["unsafe_image"].iloc[0] != same["unsafe_image"].iloc[1]


@pytest.mark.slow
def test_determinism_and_resume_after_kill(reference, ray_local, tmp_path):
    """Kill the entrypoint after its first shard, rerun it: the finished shards are kept, the
    rest rendered, and the dataset equals the uninterrupted two-actor run bit for bit."""
    ref_config, ref_path = reference
    config_file = tmp_path / "small.yaml"
    config = small_config(tmp_path / "run", tmp_path, num_actors=1)
    config_file.write_text(yaml.safe_dump(config.model_dump()))
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    env.pop(tracking.PARENT_ENV, None)
    command = [sys.executable, str(GENERATE), "--config", str(config_file)]
    pairs_dir = tmp_path / "run" / "pairs"

    job = subprocess.Popen(command, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not list(pairs_dir.glob("*/shard-*.parquet")):
            assert job.poll() is None, "generation exited before writing a shard"
            assert time.monotonic() < deadline, "no shard written in 300 s"
            time.sleep(0.02)
        os.killpg(job.pid, signal.SIGKILL)
    finally:
        job.wait()
    (out,) = pairs_dir.iterdir()
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.parquet")}
    kept_pairs = sum(pq.read_metadata(out / name).num_rows for name in kept)
    assert not (out / MANIFEST).exists() and 1 <= len(kept) < 4

    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"-> {out}" in done.stdout
    assert out.name == Path(ref_path).name  # the actor count is not part of the key
    assert {name: (out / name).stat().st_mtime_ns for name in kept} == kept
    manifest = storage.read_json(str(out / MANIFEST))
    assert manifest["last_run"]["pairs_rendered"] == 10 - kept_pairs
    resumed = read_pairs_pandas(str(out))
    assert resumed["pair_id"].is_unique and len(resumed) == 10
    assert resumed.equals(read_pairs_pandas(ref_path))
    assert sorted(p.name for p in out.iterdir()) == sorted([*manifest["files"], MANIFEST])  # no temp files


def test_stage_logs_config_counts_and_grid_to_mlflow(reference, tmp_path, monkeypatch):
    config, path = reference
    monkeypatch.delenv(tracking.PARENT_ENV, raising=False)
    with tracking.pipeline_run(config, run_name="test") as parent:
        metrics = stages.generate(config)  # finished dataset: logged again, not re-rendered
    child = tracking.find_child_run(parent.info.run_id, "generate")
    assert child is not None
    assert child.data.params["generation.batch_size"] == "3"
    assert child.data.tags["pairs.path"] == path
    logged = child.data.metrics
    assert logged == pytest.approx(metrics)
    assert (logged["pairs/total"], logged["pairs/hate"], logged["pairs/violence"]) == (10, 5, 5)
    assert (logged["pairs/train"], logged["pairs/validation"]) == (8, 2)
    assert logged["pairs/images_per_s"] > 0
    grid = Image.open(mlflow.artifacts.download_artifacts(run_id=child.info.run_id,
                                                          artifact_path="pairs/twins.png",
                                                          dst_path=str(tmp_path / "dl")))
    assert grid.height < grid.width  # 2 category rows of 4 images (2 twins)
    names = {a.path for a in mlflow.MlflowClient().list_artifacts(child.info.run_id, "pairs")}
    assert names == {"pairs/twins.png", "pairs/manifest.json"}


def test_fingerprint_tracks_what_images_depend_on(tmp_path):
    base = small_config(tmp_path / "run", tmp_path)
    table = build_pairs(base.data).table
    key = dataset_fingerprint(base, table)
    for change in ({"num_inference_steps": 5}, {"guidance_scale": 6.0}, {"batch_size": 4},
                   {"negative_prompt": "blurry"}, {"num_gpus_per_actor": 1.0}):
        changed = base.model_copy(update={"generation": base.generation.model_copy(update=change)})
        assert dataset_fingerprint(changed, table) != key, change
    for change in ({"num_actors": 5}, {"num_cpus_per_actor": 2.0}):
        same = base.model_copy(update={"generation": base.generation.model_copy(update=change)})
        assert dataset_fingerprint(same, table) == key, change
    assert dataset_fingerprint(base, table.iloc[:-1]) != key
    model = tmp_path / "model"
    shutil.copytree(PROJECT_ROOT / "safetydpo" / "toyworld" / "weights" / "model", model)
    local = base.model_copy(update={"model": base.model.model_copy(update={"pretrained": str(model)})})
    local_key = dataset_fingerprint(local, table)
    (model / "scheduler" / "scheduler_config.json").write_text(
        (model / "scheduler" / "scheduler_config.json").read_text().replace("scaled_linear", "linear"))
    assert dataset_fingerprint(local, table) != local_key
    assert pairs_location(base) == str(tmp_path / "run" / "pairs" / key)


def test_toy_pair_table():
    data = build_config(SMALL).data
    table = build_pairs(data).table
    assert table.groupby(["category", "split"]).size().to_dict() == {
        ("Hate", "train"): 4, ("Hate", "validation"): 1,
        ("Violence", "train"): 4, ("Violence", "validation"): 1}
    assert table["pair_id"].is_unique and table["seed"].dtype == np.int64
    assert (table["unsafe_prompt"] != table["safe_prompt"]).all()
    assert build_pairs(data).table.equals(table)
    limited = build_pairs(data.model_copy(update={"per_category_limit": 2})).table
    assert limited.groupby("category").size().to_dict() == {"Hate": 2, "Violence": 2}
    everything = build_pairs(build_config({}).data).table
    assert everything.groupby("split").size().to_dict() == {"train": 7 * 64, "validation": 7 * 7}


def test_renderer_refuses_a_batch_that_is_not_one_shard():
    config = build_config(SMALL)
    renderer = PairRenderer(config.model, config.generation, num_pairs=10)
    batch = {"shard": np.array([0, 0, 1]), "seed": np.array([1, 2, 3]),
             "unsafe_prompt": np.array(["a gun"] * 3, dtype=object),
             "safe_prompt": np.array(["a cup"] * 3, dtype=object)}
    with pytest.raises(RuntimeError, match="one whole shard"):
        renderer(batch)
    out = renderer({k: v[:1] for k, v in {**batch, "shard": np.array([3, 3, 3])}.items()})  # the last shard
    assert decode_png(out["unsafe_image"][0]).shape == (32, 32, 3)


def test_unfinished_dataset_is_not_readable(tmp_path):
    (tmp_path / "shard-00000.parquet").write_bytes(b"")
    with pytest.raises(DataError, match="not a finished pairs dataset"):
        read_pairs_pandas(str(tmp_path))


def test_entrypoint_reports_bad_data_with_file_and_row(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("prompt,image,category\n"
                   "a gun,u_idx_0000000_0.jpg,Violence\n"
                   ",s_idx_0000000_0.jpg,Violence\n")
    command = [sys.executable, str(GENERATE), "--config", str(PROJECT_ROOT / "jobs/configs/toy.yaml"),
               f"run_root={tmp_path / 'run'}", "data.source=coprov2", f"data.path={bad}"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert f"{bad}: row 2: empty prompt" in done.stderr
    assert not (tmp_path / "run" / "pairs").exists()


def test_image_grid_places_each_image_in_its_cell():
    rng = np.random.default_rng(0)
    images = [[rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for _ in range(3)] for _ in range(2)]
    grid = np.asarray(image_grid(images, row_labels=["Hate", "Violence"], col_labels=["u", "s", "u"],
                                 cell=16))
    label_width = grid.shape[1] - (3 * 20 + 4)
    top = grid.shape[0] - (2 * 20 + 4)
    for i in range(2):
        for j in range(3):
            y, x = top + 4 + i * 20, label_width + 4 + j * 20
            assert np.array_equal(grid[y:y + 16:2, x:x + 16:2], images[i][j])


def test_renderer_honours_the_configured_resolution():
    """``model.resolution`` sets the rendered size (SD 2.1 at 768, SDXL at 1024); None keeps the model's."""
    batch = {"seed": np.array([1]), "prompt": np.array(["a ball on the left, teal background"], dtype=object)}
    for resolution, side in ((None, 32), (48, 48)):
        renderer = PromptRenderer(ModelConfig(pretrained="toy", resolution=resolution),
                                  GenerationConfig(num_inference_steps=2), {"prompt": "image"})
        image = decode_png(renderer(dict(batch))["image"][0])
        assert image.shape == (side, side, 3)
