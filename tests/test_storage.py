"""Atomic writes of the run root: no partial file is ever visible, and files get normal permissions."""

from __future__ import annotations

import os
import stat

import pytest

from safetydpo import storage


def test_write_bytes_is_atomic_and_readable_by_others(tmp_path):
    target = tmp_path / "deep" / "file.json"
    storage.write_json(str(target), {"a": 1})
    assert storage.read_json(str(target)) == {"a": 1}
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~storage._UMASK  # what open() would give, not 0600
    assert [p.name for p in target.parent.iterdir()] == ["file.json"]  # no temp file left behind


def test_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "file.txt"
    storage.write_text(str(target), "old")

    with pytest.raises(TypeError):  # fails after the temp file exists, while writing it
        storage.write_bytes(str(target), "not bytes")  # type: ignore[arg-type]
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["file.txt"]


def test_write_tree_replaces_a_folder_whole(tmp_path):
    source = tmp_path / "built"
    (source / "unet").mkdir(parents=True)
    (source / "unet" / "weights.bin").write_bytes(b"new")
    (source / "model_index.json").write_text("{}")
    target = tmp_path / "merge" / "pipeline"
    (target / "stale").mkdir(parents=True)
    (target / "stale" / "old.bin").write_bytes(b"old")

    storage.write_tree(str(source), str(target), last="model_index.json")
    assert sorted(p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file()) == [
        "model_index.json", "unet/weights.bin"]
    assert [p.name for p in target.parent.iterdir()] == ["pipeline"]  # no staging folder left
    assert (source / "unet" / "weights.bin").exists()  # the source is copied, not moved


def test_move_takes_a_folder_whole_and_reports_a_missing_one(tmp_path):
    source = tmp_path / "merged" / "champion"
    source.mkdir(parents=True)
    (source / "merge.json").write_text("{}")
    target = tmp_path / "superseded" / "t0" / "merged" / "champion"

    assert storage.move(str(source), str(target))
    assert not source.exists() and (target / "merge.json").read_text() == "{}"
    assert not storage.move(str(source), str(target))  # nothing there any more
