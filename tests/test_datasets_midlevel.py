"""The Mid-level index: reading the real CSV layout, reporting bad rows, and the artist-exclusive split."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from mdlda.datasets import DatasetFormatError, DatasetSplitError, index_midlevel
from mdlda.datasets.midlevel import ANNOTATIONS, METADATA, RATING_COLUMNS
from mdlda.params import FEATURES


def write_midlevel(root: Path, singles: int = 30, bands: int = 7, per_band: int = 10, piano: int = 5) -> Path:
    """A Mid-level folder in the real layout; audio files are empty placeholders (the index only lists)."""
    rows = [(f"Solo {a}", "jamendo") for a in range(singles)]
    rows += [(f"Band {b}", "magnatune") for b in range(bands) for _ in range(per_band)]
    rows += [(f"Pianist {k % 2}", "jamendo") for k in range(piano)]
    ids = list(range(1, len(rows) + 1))
    meta = pd.DataFrame({"song id": ids, "file name": [f"{i}.mp3" for i in ids]})
    meta["Source"] = [s for _, s in rows]
    meta["Artist"] = [a for a, _ in rows]
    ann = pd.DataFrame({"song_id": ids})
    for k, col in enumerate(RATING_COLUMNS):
        ann[f" {col}"] = [1.0 + (i * (k + 1)) % 9 for i in ids]  # stray spaces, like the real header
    write_tables(root, ann, meta)
    (root / "audio").mkdir(parents=True, exist_ok=True)
    for i in ids:
        (root / "audio" / f"{i}.mp3").touch()
    pd.DataFrame({"song id": ids[len(ids) - piano :]}).to_csv(root / "piano.csv", index=False)
    return root


def write_tables(root: Path, ann: pd.DataFrame, meta: pd.DataFrame) -> None:
    (root / ANNOTATIONS).parent.mkdir(parents=True, exist_ok=True)
    ann.to_csv(root / ANNOTATIONS, index=False)
    meta.to_csv(root / METADATA, sep=";", index=False)


def read_tables(root: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    return pd.read_csv(root / ANNOTATIONS), pd.read_csv(root / METADATA, sep=";")


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return write_midlevel(tmp_path / "midlevel")


def reasons(index, item) -> list[str]:
    return [s["reason"] for s in index.skipped if s["item"] == str(item)]


def lost(index, item) -> bool:
    """Whether the skip of ``item`` counts as a lost clip (not just a note)."""
    return any(s["counts_as_failure"] for s in index.skipped if s["item"] == str(item))


def test_split_sizes_follow_the_reference_fractions(root: Path) -> None:
    ix = index_midlevel(root, root / "piano.csv")
    # 100 source clips -> an evaluation set of 10 single-track artists, 2 valid / 8 test; 5 piano clips.
    assert ix.split_sizes == {"train": 90, "valid": 2, "test": 8, "piano_test": 5}
    assert sum(ix.split_sizes.values()) == len(ix.table) == 105
    assert ix.skipped == []
    t = ix.table
    assert set(t.loc[t["split"] == "piano_test", "domain"]) == {"target"}
    assert set(t.loc[t["split"] != "piano_test", "domain"]) == {"source"}
    assert list(t.columns[:7]) == ["clip_id", "dataset", "domain", "split", "group", "path", "labels"]
    assert all(Path(p).is_absolute() and Path(p).exists() for p in t["path"])
    assert ix.options["seed"] == 0 and ix.options["piano_ids"].endswith("piano.csv")


def test_labels_follow_feature_order(root: Path) -> None:
    ann, _ = read_tables(root)
    ann.columns = [c.strip() for c in ann.columns]
    ix = index_midlevel(root)
    row = ix.table.set_index("clip_id").loc["7"]
    assert len(row["labels"]) == len(FEATURES) == 7
    assert row["labels"] == pytest.approx(ann.set_index("song_id").loc[7, list(RATING_COLUMNS)].tolist())


def test_artists_never_cross_splits_and_evaluation_artists_have_one_track(root: Path) -> None:
    for seed in range(5):
        t = index_midlevel(root, root / "piano.csv", seed=seed).table
        source = t[t["domain"] == "source"]
        assert (source.groupby("group")["split"].nunique() == 1).all()
        evaluation = source[source["split"].isin(["valid", "test"])]
        assert evaluation["group"].str.startswith("Solo").all()


def test_split_is_deterministic_by_seed(root: Path) -> None:
    def held_out(seed: int) -> list[str]:
        t = index_midlevel(root, seed=seed).table
        return sorted(t.loc[t["split"] != "train", "clip_id"])

    assert held_out(3) == held_out(3)
    assert held_out(3) != held_out(4)


def test_without_piano_list_everything_is_source(root: Path) -> None:
    ix = index_midlevel(root)
    assert ix.split_sizes["piano_test"] == 0
    assert set(ix.table["domain"]) == {"source"}
    assert ix.split_sizes["valid"] + ix.split_sizes["test"] == 10  # int(0.1 * 105)


@pytest.mark.parametrize("which", [ANNOTATIONS, METADATA])
def test_missing_csv_names_the_file(root: Path, which: Path) -> None:
    (root / which).unlink()
    with pytest.raises(DatasetFormatError, match=which.name):
        index_midlevel(root)


def test_misspelt_rating_column_suggests_the_close_name(root: Path) -> None:
    ann, meta = read_tables(root)
    write_tables(root, ann.rename(columns={" minorness": " minornes"}), meta)
    with pytest.raises(DatasetFormatError, match=r"annotations\.csv.*'minorness'.*did you mean 'minornes'"):
        index_midlevel(root)


def test_missing_artist_column_names_file_and_column(root: Path) -> None:
    ann, meta = read_tables(root)
    write_tables(root, ann, meta.rename(columns={"Artist": "Artsit"}))
    with pytest.raises(DatasetFormatError, match=r"metadata\.csv.*'Artist'.*did you mean 'Artsit'"):
        index_midlevel(root)


def test_nan_and_out_of_range_ratings_are_reported_skips(root: Path) -> None:
    ann, meta = read_tables(root)
    ann.loc[ann["song_id"] == 3, " dissonance"] = float("nan")
    ann.loc[ann["song_id"] == 4, " melody"] = 11.0
    ann.loc[ann["song_id"] == 5, " minorness"] = 0.5
    write_tables(root, ann, meta)
    ix = index_midlevel(root)
    assert "dissonance" in reasons(ix, 3)[0]
    assert "melody=11" in reasons(ix, 4)[0]
    assert "minorness=0.5" in reasons(ix, 5)[0]
    assert not ix.table["clip_id"].isin(["3", "4", "5"]).any()
    assert len(ix.table) == 102


def test_conflicting_duplicates_are_all_dropped_identical_ones_keep_one(root: Path) -> None:
    ann, meta = read_tables(root)
    conflicting = ann[ann["song_id"] == 8].assign(**{" melody": 9.5})
    identical = ann[ann["song_id"] == 9]
    write_tables(root, pd.concat([ann, conflicting, identical]), meta)
    ix = index_midlevel(root)
    ids = ix.table["clip_id"].tolist()
    assert "8" not in ids and any("conflicting" in r for r in reasons(ix, 8))
    assert ids.count("9") == 1 and any("identical" in r for r in reasons(ix, 9))
    assert lost(ix, 8) and not lost(ix, 9)


def test_missing_audio_is_a_reported_skip(root: Path) -> None:
    (root / "audio" / "12.mp3").unlink()
    ix = index_midlevel(root)
    assert "12" not in set(ix.table["clip_id"])
    assert "audio file not found" in reasons(ix, 12)[0] and lost(ix, 12)


def test_annotations_without_metadata_are_reported(root: Path) -> None:
    ann, meta = read_tables(root)
    write_tables(root, ann, meta[meta["song id"] != 13])
    ix = index_midlevel(root)
    assert "13" not in set(ix.table["clip_id"])
    assert "not in metadata" in reasons(ix, 13)[0]


def test_piano_ids_not_in_dataset_are_reported_not_raised(root: Path) -> None:
    ids = pd.read_csv(root / "piano.csv")
    pd.concat([ids, pd.DataFrame({"song id": [9999]})]).to_csv(root / "piano.csv", index=False)
    ix = index_midlevel(root, root / "piano.csv")
    assert ix.split_sizes["piano_test"] == 5
    assert "piano id list" in reasons(ix, 9999)[0] and not lost(ix, 9999)


def test_piano_list_without_song_id_column_is_a_format_error(root: Path) -> None:
    pd.DataFrame({"songid": [1]}).to_csv(root / "piano.csv", index=False)
    with pytest.raises(DatasetFormatError, match=r"piano\.csv.*'song id'.*did you mean 'songid'"):
        index_midlevel(root, root / "piano.csv")


def test_too_few_single_track_artists_is_a_clear_error(tmp_path: Path) -> None:
    root = write_midlevel(tmp_path / "m", singles=3, bands=5, per_band=10, piano=0)
    with pytest.raises(DatasetSplitError, match="only 3 exist"):
        index_midlevel(root)


def test_byte_order_mark_and_latin1_metadata_are_read(root: Path) -> None:
    ann_path, meta_path = root / ANNOTATIONS, root / METADATA
    ann_path.write_bytes(b"\xef\xbb\xbf" + ann_path.read_bytes())
    meta = meta_path.read_text().replace("Solo 0", "Bj\u00f6rk")
    meta_path.write_bytes(meta.encode("latin-1"))
    t = index_midlevel(root).table
    assert len(t) == 105 and "Bj\u00f6rk" in set(t["group"])


@pytest.mark.parametrize(
    "ids, match",
    [
        ([9001, 9002, 9003], r"piano\.csv: none of its 3 piano ids .* is a song id of the dataset"),
        ([], r"piano\.csv: the piano id list names no song ids"),
    ],
)
def test_a_piano_list_matching_nothing_is_an_error_at_index_time(root: Path, ids: list, match: str) -> None:
    """Otherwise piano_test is empty, the piano clips train as source, and the evaluation fails hours later."""
    pd.DataFrame({"song id": ids}, dtype=object).to_csv(root / "piano.csv", index=False)
    with pytest.raises(DatasetSplitError, match=match):
        index_midlevel(root, root / "piano.csv")


def test_a_piano_list_whose_clips_are_all_unusable_is_an_error(root: Path) -> None:
    for sid in pd.read_csv(root / "piano.csv")["song id"]:
        (root / "audio" / f"{sid}.mp3").unlink()
    with pytest.raises(DatasetSplitError, match=r"none of the 5 listed piano clips .* usable .*audio file not found"):
        index_midlevel(root, root / "piano.csv")


def test_a_song_id_leading_out_of_the_root_is_a_reported_skip(root: Path) -> None:
    (root.parent / "secret.mp3").write_bytes(b"not yours")
    ann, meta = read_tables(root)
    ann, meta = ann.astype({"song_id": object}), meta.astype({"song id": object})
    ann.loc[0, "song_id"] = meta.loc[0, "song id"] = "../../secret"
    write_tables(root, ann, meta)
    ix = index_midlevel(root, root / "piano.csv")
    assert "outside the dataset root" in reasons(ix, "../../secret")[0] and lost(ix, "../../secret")
    assert not any("secret" in p for p in ix.table.path) and len(ix.table) == len(ann) - 1
