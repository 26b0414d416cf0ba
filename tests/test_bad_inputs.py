"""A catalogue of bad inputs, table-driven: each ends in a clear error naming the file or key, or in a reported skip
with everything else still there. Tiny generated data in the real formats; no Ray (the prepare stage's Ray path is
tested in test_prepare.py: the same index and the same per-item decode body run here directly).

Continued in test_bad_inputs_audio.py (audio files) and test_bad_inputs_cli.py (the command line). Each row of a
table is one bad input. ``SKIP`` rows check the skip's reason and that exactly the bad item is
missing from the index (every other item is still listed); ``ERROR`` rows check the exception type and a message
naming the file or key; ``ACCEPTED`` rows are inputs mdlda handles (downmix, resample) and check the output.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pandas as pd
import pytest

from mdlda.datasets import DatasetFormatError, DatasetSplitError, index_maestro, index_midlevel
from mdlda.datasets.maestro import CSV_NAME
from mdlda.datasets.midlevel import ANNOTATIONS, METADATA

ANN, META = str(ANNOTATIONS), str(METADATA)


# ----------------------------------------------------------------------------------------------- helpers
def _csv(path: Path, sep: str = ",") -> pd.DataFrame:
    return pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, skipinitialspace=True)


def _edit(path: Path, fn, sep: str = ",") -> None:
    df = _csv(path, sep)
    fn(df)
    df.to_csv(path, sep=sep, index=False)


def _append(path: Path, row, sep: str = ",") -> None:
    """Append the row ``row(df)`` (a list of values) to a CSV."""

    def fn(df):
        df.loc[len(df)] = row(df)

    _edit(path, fn, sep)


def _first_source_id(root: Path) -> str:
    piano = set(_csv(root / "piano_ids.csv")["song id"])
    return next(s for s in _csv(root / ANN)["song_id"] if s not in piano)


@pytest.fixture()
def ml(demo_root, tmp_path) -> Path:
    """A private copy of the tiny Mid-level dataset."""
    return Path(shutil.copytree(demo_root / "midlevel", tmp_path / "midlevel"))


@pytest.fixture()
def ma(demo_root, tmp_path) -> Path:
    """A private copy of the tiny MAESTRO dataset."""
    return Path(shutil.copytree(demo_root / "maestro", tmp_path / "maestro"))


# ------------------------------------------------------------------------------- Mid-level index: skips
def _set(path: Path, key: str, item: str, column: str, value: str, sep: str = ",") -> None:
    """Set ``column`` of the row whose ``key`` is ``item`` to ``value``."""

    def fn(df):
        df.loc[df[key] == item, column] = value

    _edit(path, fn, sep)


def _nan_rating(root):
    sid = _first_source_id(root)
    _set(root / ANN, "song_id", sid, "melody", "nan")
    return sid


def _set_rating(value: str):
    def make(root):
        sid = _first_source_id(root)
        _set(root / ANN, "song_id", sid, "dissonance", value)
        return sid

    return make


def _conflicting_duplicate(root):
    sid = _first_source_id(root)

    def fn(df):
        row = df[df.song_id == sid].copy()
        row["melody"] = "1.0" if row.melody.iloc[0] != "1.0" else "2.0"
        df.loc[len(df)] = row.iloc[0]

    _edit(root / ANN, fn)
    return sid


def _missing_audio(root):
    sid = _first_source_id(root)
    (root / "audio" / f"{sid}.mp3").unlink()
    return sid


def _directory_mp3(root):
    sid = _first_source_id(root)
    (root / "audio" / f"{sid}.mp3").unlink()
    (root / "audio" / f"{sid}.mp3").mkdir()
    return sid


def _id_out_of_root(root):
    sid = _first_source_id(root)
    (root.parent / "secret.mp3").write_bytes((root / "audio" / f"{sid}.mp3").read_bytes())
    _set(root / ANN, "song_id", sid, "song_id", "../../secret")
    _set(root / META, "song id", sid, "song id", "../../secret", ";")
    return "../../secret", sid  # skipped under its new id; the clip it was is the one lost


def _no_artist(root):
    sid = _first_source_id(root)
    _set(root / META, "song id", sid, "Artist", "", ";")
    return sid


MIDLEVEL_SKIPS = [
    # (id, make(root) -> the item that must be skipped, reason pattern)
    ("nan-rating", _nan_rating, r"melody is missing or not a number"),
    ("rating-out-of-range", _set_rating("11"), r"dissonance=11 outside 1\.\.10"),
    ("rating-not-a-number", _set_rating("high"), r"dissonance is missing or not a number"),
    ("conflicting-duplicate-id", _conflicting_duplicate, r"conflicting rows in annotations\.csv"),
    ("missing-audio-file", _missing_audio, r"audio file not found: .*\.mp3"),
    ("directory-named-x.mp3", _directory_mp3, r"is a directory, not an audio file"),
    ("song-id-leading-out-of-root", _id_out_of_root, r"outside the dataset root"),
    ("no-artist", _no_artist, r"metadata\.csv gives no artist"),
]


@pytest.mark.parametrize("case, make, reason", MIDLEVEL_SKIPS, ids=[c[0] for c in MIDLEVEL_SKIPS])
def test_midlevel_bad_rows_are_reported_skips_and_the_rest_is_listed(ml, case, make, reason):
    clean = index_midlevel(ml, ml / "piano_ids.csv")
    item = make(ml)
    item, lost = item if isinstance(item, tuple) else (item, item)
    ix = index_midlevel(ml, ml / "piano_ids.csv")
    skipped = [s for s in ix.skipped if s["item"] == item]
    assert skipped and any(re.search(reason, s["reason"]) for s in skipped), ix.skipped
    assert all(s["counts_as_failure"] for s in skipped)
    assert set(ix.table.clip_id) == set(clean.table.clip_id) - {lost}  # exactly the bad item is gone
    assert "secret" not in " ".join(ix.table.path)


def test_an_identical_duplicate_row_is_a_note_and_keeps_one_copy(ml):
    clean = index_midlevel(ml, ml / "piano_ids.csv")
    sid = _first_source_id(ml)
    _append(ml / ANN, lambda df: df[df.song_id == sid].iloc[0].tolist())
    ix = index_midlevel(ml, ml / "piano_ids.csv")
    notes = [s for s in ix.skipped if s["item"] == sid]
    assert notes and not notes[0]["counts_as_failure"] and "identical" in notes[0]["reason"]
    assert sorted(ix.table.clip_id) == sorted(clean.table.clip_id)


def test_a_few_unmatched_piano_ids_are_a_note_and_the_rest_are_piano_test(ml):
    clean = index_midlevel(ml, ml / "piano_ids.csv")
    _append(ml / "piano_ids.csv", lambda df: ["99999"])
    ix = index_midlevel(ml, ml / "piano_ids.csv")
    note = [s for s in ix.skipped if s["item"] == "99999"]
    assert note and not note[0]["counts_as_failure"] and "piano id list" in note[0]["reason"]
    assert ix.split_sizes["piano_test"] == clean.split_sizes["piano_test"] > 0


# ------------------------------------------------------------------------------ Mid-level index: errors
def _rename(path: Path, old: str, new: str) -> None:
    """Misspell a header: the first ``old`` in the file becomes ``new``."""
    path.write_text(path.read_text().replace(old, new, 1))


MIDLEVEL_ERRORS = [
    # (id, make(root), exception, message pattern naming the file or key)
    (
        "annotations-missing",
        lambda r: (r / ANN).unlink(),
        DatasetFormatError,
        r"annotations\.csv: annotations not found",
    ),
    ("annotations-empty", lambda r: (r / ANN).write_text(""), DatasetFormatError, r"annotations\.csv: cannot read"),
    (
        "misspelt-rating-column",
        lambda r: _rename(r / ANN, "articulation", "articulaton"),
        DatasetFormatError,
        r"annotations\.csv: annotations has no column 'articulation'; did you mean 'articulaton'",
    ),
    (
        "metadata-wrong-separator",
        lambda r: (r / META).write_text((r / META).read_text().replace(";", ",")),
        DatasetFormatError,
        r"metadata\.csv: metadata has no column 'song id'.*separator ';'",
    ),
    (
        "metadata-no-artist-column",
        lambda r: _rename(r / META, "Artist", "Performer"),
        DatasetFormatError,
        r"metadata\.csv: metadata has no column 'Artist'",
    ),
    (
        "piano-list-matches-nothing",
        lambda r: (r / "piano_ids.csv").write_text("song id\n90001\n90002\n"),
        DatasetSplitError,
        r"piano_ids\.csv: none of its 2 piano ids",
    ),
    (
        "piano-list-empty",
        lambda r: (r / "piano_ids.csv").write_text("song id\n"),
        DatasetSplitError,
        r"piano_ids\.csv: the piano id list names no song ids",
    ),
    (
        "piano-list-misspelt-column",
        lambda r: (r / "piano_ids.csv").write_text("song_idx\n2\n"),
        DatasetFormatError,
        r"piano_ids\.csv: piano id list has no column 'song id'",
    ),
    ("root-missing", lambda r: shutil.rmtree(r), DatasetFormatError, r"midlevel: Mid-level dataset folder not found"),
]


@pytest.mark.parametrize("case, make, exc, match", MIDLEVEL_ERRORS, ids=[c[0] for c in MIDLEVEL_ERRORS])
def test_midlevel_unusable_inputs_are_clear_errors(ml, case, make, exc, match):
    make(ml)
    with pytest.raises(exc, match=match):
        index_midlevel(ml, ml / "piano_ids.csv")
    # the pre-compute check of `mdlda run` / `prepare` gives the same answer, before any Ray or MLflow
    from mdlda.datasets.inputs import check_midlevel_root

    with pytest.raises(exc, match=match.split(":")[0]):
        check_midlevel_root(ml, ml / "piano_ids.csv")


# --------------------------------------------------------------------------------------- MAESTRO index
def _maestro_row(root: Path, audio_filename: str, duration: str = "40.0") -> str:
    _append(root / CSV_NAME, lambda df: ["C", "T", "train", "2004", "x.midi", audio_filename, duration])
    return audio_filename


def _outside_wav(root: Path) -> Path:
    (root.parent / "outside").mkdir(exist_ok=True)
    wav = root.parent / "outside" / "x.wav"
    wav.write_bytes(next(root.rglob("*.wav")).read_bytes())
    return wav


def _symlink_out(root: Path) -> str:
    _outside_wav(root)
    (root / "2030").symlink_to(root.parent / "outside", target_is_directory=True)
    return _maestro_row(root, "2030/x.wav")


def _missing_wav(root: Path) -> str:
    name = _csv(root / CSV_NAME).audio_filename.iloc[0]
    (root / name).unlink()
    return name


def _duplicate_stem(root: Path) -> str:
    name = _csv(root / CSV_NAME).audio_filename.iloc[0]
    other = "2013/" + Path(name).name
    (root / "2013").mkdir(exist_ok=True)
    shutil.copy(root / name, root / other)
    return _maestro_row(root, other)


def _directory_wav(root: Path) -> str:
    (root / "2004" / "folder.wav").mkdir()
    return _maestro_row(root, "2004/folder.wav")


MAESTRO_SKIPS = [
    ("dotdot-out-of-root", lambda r: _outside_wav(r) and _maestro_row(r, "../outside/x.wav"), r"outside the dataset"),
    ("deep-dotdot", lambda r: _maestro_row(r, "2004/../../../etc/passwd"), r"outside the dataset root"),
    ("absolute-path", lambda r: _maestro_row(r, str(_outside_wav(r))), r"is absolute"),
    ("symlink-out-of-root", _symlink_out, r"through a symlink .* outside the dataset root"),
    ("duration-not-a-number", lambda r: _maestro_row(r, "2004/y.wav", "long"), r"duration 'long' is not a number"),
    ("missing-wav", _missing_wav, r"audio file not found"),
    ("duplicate-stem", _duplicate_stem, r"duplicate audio file stem"),
    ("directory-named-x.wav", _directory_wav, r"is a directory, not an audio file"),
]


@pytest.mark.parametrize("case, make, reason", MAESTRO_SKIPS, ids=[c[0] for c in MAESTRO_SKIPS])
def test_maestro_bad_rows_are_reported_skips_and_the_rest_is_listed(ma, case, make, reason):
    clean = index_maestro(ma)
    item = make(ma)
    ix = index_maestro(ma)
    skipped = [s for s in ix.skipped if s["item"] == item]
    assert skipped and re.search(reason, skipped[0]["reason"]) and skipped[0]["counts_as_failure"], ix.skipped
    lost = {Path(item).stem} if case == "missing-wav" else set()
    assert set(ix.table.clip_id) == set(clean.table.clip_id) - lost
    assert not any("outside" in p or "etc" in p for p in ix.table.path)


MAESTRO_ERRORS = [
    ("csv-missing", lambda r: (r / CSV_NAME).unlink(), r"maestro-v3\.0\.0\.csv: MAESTRO metadata not found"),
    (
        "misspelt-column",
        lambda r: _rename(r / CSV_NAME, "audio_filename", "audio_file"),
        r"maestro-v3\.0\.0\.csv: MAESTRO metadata has no column 'audio_filename'; did you mean 'audio_file'",
    ),
    ("root-missing", lambda r: shutil.rmtree(r), r"maestro: MAESTRO folder not found"),
]


@pytest.mark.parametrize("case, make, match", MAESTRO_ERRORS, ids=[c[0] for c in MAESTRO_ERRORS])
def test_maestro_unusable_inputs_are_clear_errors(ma, case, make, match):
    from mdlda.datasets.inputs import check_maestro_root

    make(ma)
    with pytest.raises(DatasetFormatError, match=match):
        index_maestro(ma)
    with pytest.raises(DatasetFormatError, match=match.split(":")[0]):
        check_maestro_root(ma)
