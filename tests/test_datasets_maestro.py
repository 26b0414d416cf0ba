"""The MAESTRO index: one row per performance, its own splits, reported skips and format errors."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from mdlda.datasets import DatasetFormatError, index_maestro, segment_id
from mdlda.datasets.maestro import COLUMNS, CSV_NAME


def write_maestro(root: Path, durations=(61.0, 15.0, 44.9, 120.5, 30.2, 90.0)) -> Path:
    splits = ["train", "train", "validation", "test", "train", "validation"]
    rows = []
    for k, (duration, split) in enumerate(zip(durations, splits, strict=False)):
        year = 2004 + 2 * (k % 3)
        name = f"{year}/MIDI-Unprocessed_{k:02d}_R1_{year}_wav--1"
        rows.append([f"Composer {k}", f"Piece {k}", split, year, f"{name}.midi", f"{name}.wav", duration])
        (root / str(year)).mkdir(parents=True, exist_ok=True)
        (root / f"{name}.wav").touch()  # the index only lists files; decoding is the prepare stage's job
    pd.DataFrame(rows, columns=list(COLUMNS)).to_csv(root / CSV_NAME, index=False)
    return root


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return write_maestro(tmp_path / "maestro")


def test_one_row_per_performance_with_expected_segments(root: Path) -> None:
    ix = index_maestro(root)
    t = ix.table
    assert len(t) == 6 and ix.skipped == []
    assert t["expected_segments"].tolist() == [4, 1, 2, 8, 2, 6]  # floor(duration / 15)
    assert (t["clip_id"] == t["group"]).all()
    assert t["clip_id"][0] == "MIDI-Unprocessed_00_R1_2004_wav--1"
    assert set(t["domain"]) == {"target"} and set(t["dataset"]) == {"maestro"}
    assert t["labels"].isna().all()
    assert ix.split_sizes == {"train": 3, "validation": 2, "test": 1}
    assert all(Path(p).is_absolute() and Path(p).exists() for p in t["path"])


def test_segment_id() -> None:
    assert segment_id("MIDI-Unprocessed_00_R1_2004_wav--1", 3) == "MIDI-Unprocessed_00_R1_2004_wav--1#3"


def test_split_filter_and_unknown_split(root: Path) -> None:
    ix = index_maestro(root, splits=["validation", "test"])
    assert set(ix.table["split"]) == {"validation", "test"} and len(ix.table) == 3
    with pytest.raises(ValueError, match="did you mean 'validation'"):
        index_maestro(root, splits=["valid"])


def test_max_performances_is_a_seeded_subset_in_csv_order(root: Path) -> None:
    picks = [index_maestro(root, max_performances=3, seed=s).table["clip_id"].tolist() for s in (0, 0, 1, 2, 3)]
    assert picks[0] == picks[1]
    assert len({tuple(p) for p in picks}) > 1
    everything = index_maestro(root).table["clip_id"].tolist()
    for p in picks:
        assert len(p) == 3 and p == [c for c in everything if c in p]


def test_missing_wav_is_a_reported_skip(root: Path) -> None:
    t = index_maestro(root).table
    Path(t["path"][2]).unlink()
    ix = index_maestro(root)
    assert len(ix.table) == 5
    assert [s["reason"].split(":")[0] for s in ix.skipped] == ["audio file not found"]


def test_short_or_unreadable_duration_is_a_reported_skip(tmp_path: Path) -> None:
    root = write_maestro(tmp_path / "m", durations=(61.0, 14.99, 44.9))
    csv = pd.read_csv(root / CSV_NAME, dtype=str)
    csv.loc[2, "duration"] = "n/a"
    csv.to_csv(root / CSV_NAME, index=False)
    ix = index_maestro(root)
    assert len(ix.table) == 1
    assert "shorter than one 15-s segment" in ix.skipped[0]["reason"]
    assert "not a number" in ix.skipped[1]["reason"]


def test_missing_csv_is_a_format_error(root: Path) -> None:
    (root / CSV_NAME).unlink()
    with pytest.raises(DatasetFormatError, match=CSV_NAME):
        index_maestro(root)


@pytest.mark.parametrize("column", COLUMNS)
def test_missing_column_names_file_and_column(root: Path, column: str) -> None:
    csv = pd.read_csv(root / CSV_NAME)
    csv.rename(columns={column: column[:-1]}).to_csv(root / CSV_NAME, index=False)
    with pytest.raises(DatasetFormatError, match=rf"{CSV_NAME}.*'{column}'.*did you mean '{column[:-1]}'"):
        index_maestro(root)


@pytest.mark.parametrize("bad", ["../outside/x.wav", "2004/../../outside/x.wav", "ABSOLUTE", "link/x.wav"])
def test_a_path_leading_out_of_the_root_is_a_reported_skip_and_never_read(tmp_path: Path, bad: str) -> None:
    """`../`, absolute paths and symlinks out of the root are refused, naming the CSV line; the others stay."""
    root = write_maestro(tmp_path / "maestro")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "x.wav").write_bytes(b"RIFF secret")
    (root / "link").symlink_to(outside, target_is_directory=True)
    bad = str(outside / "x.wav") if bad == "ABSOLUTE" else bad
    df = pd.read_csv(root / CSV_NAME)
    df.loc[len(df)] = ["C", "T", "train", 2004, "x.midi", bad, 90.0]
    df.to_csv(root / CSV_NAME, index=False)
    index = index_maestro(root)
    reasons = {s["item"]: s["reason"] for s in index.skipped}
    assert "outside the dataset root" in reasons[bad] or "absolute" in reasons[bad]
    assert f"line {len(df) + 1}" in reasons[bad]
    assert not any("outside" in p for p in index.table.path)
    assert len(index.table) == 6  # every performance of write_maestro is still there
