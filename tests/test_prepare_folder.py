"""The prepare folder's rules without Ray: which folders are refused, atomic state writes, the file check."""

from __future__ import annotations

import json

import pytest

from pipelines.prepare_folder import FolderError, check_out_folder, remove_ours, write_json_atomic


def test_an_atomic_write_that_fails_leaves_the_old_file_and_no_temp(tmp_path):
    path = tmp_path / ".prepare" / "state.json"
    write_json_atomic(path, {"done": [0, 1]})
    with pytest.raises(TypeError):
        write_json_atomic(path, {"done": [0, 1, 2], "bad": object()})  # fails half-way through the dump
    assert json.loads(path.read_text()) == {"done": [0, 1]}
    assert [p.name for p in path.parent.iterdir()] == ["state.json"]


def test_new_empty_and_lock_only_folders_are_fine_user_files_are_not(tmp_path):
    check_out_folder(tmp_path / "new")
    (tmp_path / "empty" / "data").mkdir(parents=True)
    (tmp_path / "empty" / ".mdlda.lock").write_text("")
    check_out_folder(tmp_path / "empty")
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "manifest.json").write_text(json.dumps({"name": "another tool's manifest"}))
    with pytest.raises(FolderError, match="theirs is not empty and is not an mdlda shard folder"):
        check_out_folder(tmp_path / "theirs")


def test_remove_ours_keeps_everything_else(tmp_path):
    out = tmp_path / "shards"
    ours = [
        "manifest.json",
        "data/chunk-00000-part-00000.parquet",
        ".prepare/state.json",
        ".prepare/chunk-00000.json",
        ".prepare/staging-00001/part-00000.parquet",
    ]
    theirs = ["notes.txt", ".prepare/mine.json", ".prepare/staging-00001/keep.wav", "data/x/deep.parquet"]
    for rel in ours + theirs:
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_text(rel)
    remove_ours(out)
    left = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert left == sorted(theirs)


def test_a_stage_replaces_only_its_own_output_and_refuses_a_folder_with_other_files(tmp_path):
    """The pseudolabel stage's output folder: an older output is cleared (also one a crash left without its
    manifest), a folder holding anything else is refused and nothing in it is deleted."""
    from pipelines.prepare_folder import OUTPUT_MARK, FolderError, clear_stage_output

    out = tmp_path / "pseudolabels"
    clear_stage_output(out, "maestro-pseudo")  # a new folder: made and marked
    assert (out / OUTPUT_MARK).read_text() == "maestro-pseudo"
    (out / "data").mkdir()
    (out / "data" / "abc_000000-0.parquet").write_bytes(b"x")
    clear_stage_output(out, "maestro-pseudo")  # interrupted before its manifest: the mark says it is ours
    assert sorted(p.name for p in out.iterdir()) == [OUTPUT_MARK]

    (out / "data").mkdir()
    (out / "data" / "abc_000000-0.parquet").write_bytes(b"x")
    (out / "manifest.json").write_text(json.dumps({"dataset": "maestro-pseudo"}))
    (out / "notes.txt").write_text("mine")
    (out / "data" / "keep.csv").write_text("mine too")
    with pytest.raises(FolderError, match=r"data/keep\.csv, notes\.txt"):
        clear_stage_output(out, "maestro-pseudo")
    assert (out / "notes.txt").exists() and (out / "data" / "keep.csv").exists()
    assert (out / "data" / "abc_000000-0.parquet").exists() and (out / "manifest.json").exists()

    stranger = tmp_path / "someone-elses"
    (stranger / "data").mkdir(parents=True)
    (stranger / "data" / "table.parquet").write_bytes(b"x")  # Parquet files, but no manifest or mark of ours
    with pytest.raises(FolderError, match="holds files this stage did not write"):
        clear_stage_output(stranger, "maestro-pseudo")
    assert (stranger / "data" / "table.parquet").exists()
