"""The pipeline's stage table: what ``--force STAGE`` redoes and moves aside, and its bad uses."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from safetydpo import layout, stages
from safetydpo.config import PROJECT_ROOT, load_config


def test_dependants_follow_what_each_stage_reads() -> None:
    assert stages.dependants(["generate"]) == [
        "generate", "experts", "merge", "merge-search", "merge-distill", "evaluate", "deploy"]
    assert stages.dependants(["merge"]) == ["merge", "evaluate"]
    assert stages.dependants(["merge-distill"]) == ["merge-distill", "evaluate", "deploy"]
    assert stages.dependants(["evaluate"]) == ["evaluate"]
    assert stages.dependants(["evaluate-untrained"]) == ["evaluate-untrained", "evaluate"]


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("x")
    return path


def test_force_moves_a_stage_and_its_dependants_aside_and_keeps_the_rest(tmp_path: Path) -> None:
    config = load_config(PROJECT_ROOT / "jobs/configs/toy.yaml", [f"run_root={tmp_path}"])
    kept = [_touch(tmp_path / "experts" / "hate" / layout.EXPERT_JSON),
            _touch(tmp_path / "merged" / "comerge" / layout.MERGE_JSON)]  # merge.methods: not the search's
    moved = [_touch(tmp_path / "merged" / name / layout.MERGE_JSON)
             for name in ("search", "champion", "best_ties", "distilled")]
    moved.append(_touch(tmp_path / "eval" / "base" / "toy" / layout.METRICS_JSON))

    pairs = stages.supersede(config, ["merge-search"])

    assert all(p.exists() for p in kept)
    assert not any(p.exists() for p in moved)
    stamp = next((tmp_path / stages.SUPERSEDED_DIR).iterdir())
    for path in moved:  # nothing is deleted: each output sits under superseded/<time>/ at its relative path
        assert (stamp / path.relative_to(tmp_path)).read_text() == "x"
    assert sorted(Path(src).name for src, _ in pairs) == ["best_ties", "champion", "distilled", "eval", "search"]


@pytest.mark.parametrize(("argv", "message"), [
    (["--force", "merge"], "not among --stages"),
    (["--stages", "merge,evaluate", "--force", "nonsense"], "unknown stage(s) ['nonsense']"),
])
def test_force_refuses_a_stage_it_would_not_run(tmp_path: Path, argv: list[str], message: str) -> None:
    stages_arg = [] if "--stages" in argv else ["--stages", "evaluate"]
    done = subprocess.run([sys.executable, "jobs/pipeline.py", "--config", "jobs/configs/toy.yaml", *stages_arg,
                           *argv, f"run_root={tmp_path}"], cwd=PROJECT_ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2
    assert message in done.stderr
    assert not (tmp_path / stages.SUPERSEDED_DIR).exists()
