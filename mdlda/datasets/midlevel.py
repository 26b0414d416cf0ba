"""Index of the Mid-level Perceptual Features dataset (Aljanaki & Soleymani, 2018) with its domain split.

On disk (as downloaded)::

    <root>/metadata_annotations/annotations.csv   song_id, melody, articulation, ... (comma-separated)
    <root>/metadata_annotations/metadata.csv      song id;file name;Source;Artist;... (semicolon-separated)
    <root>/audio/<song_id>.mp3

Split: the song ids in a user-supplied piano list form ``piano_test`` (domain ``target``). The rest (domain
``source``) is split artist-exclusively as in the reference implementation: an evaluation set of
``eval_fraction`` x the source size is drawn (seeded) from the sorted artists that have a single source track;
it is cut ``valid_fraction`` valid / the rest test; everything else is train.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from mdlda.datasets.common import (
    DatasetFormatError,
    DatasetIndex,
    DatasetSplitError,
    normalise_id,
    path_inside,
    read_table,
    skip,
)
from mdlda.params import FEATURES, RATING_MAX, RATING_MIN

DATASET = "midlevel"
ANNOTATIONS = Path("metadata_annotations") / "annotations.csv"
METADATA = Path("metadata_annotations") / "metadata.csv"
AUDIO_DIR = Path("audio")
# Rating columns of annotations.csv, in the order of params.FEATURES: the file names melodiousness "melody",
# every other column is the feature's own name.
RATING_COLUMNS: tuple[str, ...] = ("melody", *FEATURES[1:])
ID_ANNOTATIONS, ID_METADATA, ARTIST, SOURCE = "song_id", "song id", "Artist", "Source"
SPLITS = ("train", "valid", "test", "piano_test")
assert len(RATING_COLUMNS) == len(FEATURES)


def audio_path(root: str | Path, song_id: str) -> Path:
    """Where the clip of ``song_id`` lives."""
    return Path(root) / AUDIO_DIR / f"{song_id}.mp3"


def read_piano_ids(path: str | Path) -> list[str]:
    """Song ids from a CSV with a ``song id`` column (``,`` or ``;``-separated), de-duplicated, in order."""
    path = Path(path).expanduser()
    first_line = path.read_text(errors="replace").partition("\n")[0] if path.is_file() else ""
    sep = ";" if ";" in first_line else ","
    table = read_table(path, sep, [ID_METADATA], "piano id list")
    ids = [normalise_id(v) for v in table[ID_METADATA] if str(v).strip()]
    return list(dict.fromkeys(ids))


def _dedupe(df: pd.DataFrame, key: str, value_cols: list[str], where: str) -> tuple[pd.DataFrame, list[dict]]:
    """Drop duplicate ``key`` rows: identical copies keep one, conflicting copies are all dropped."""
    skipped: list[dict] = []
    dup = df[key].duplicated(keep=False)
    if not dup.any():
        return df, skipped
    drop: list[int] = []
    for item, rows in df[dup].groupby(key, sort=True):
        if len(rows[value_cols].drop_duplicates()) == 1:
            drop.extend(rows.index[1:])
            skipped.extend(
                skip(item, f"duplicate row in {where} identical to an earlier one; kept one copy", False)
                for _ in rows.index[1:]
            )
        else:
            drop.extend(rows.index)
            skipped.append(
                skip(item, f"{len(rows)} conflicting rows in {where}; cannot tell which is right, all dropped")
            )
    return df.drop(index=drop), skipped


def _read_annotations(root: Path) -> tuple[pd.DataFrame, list[dict]]:
    path = root / ANNOTATIONS
    ann = read_table(path, ",", [ID_ANNOTATIONS, *RATING_COLUMNS], "annotations")
    ann[ID_ANNOTATIONS] = ann[ID_ANNOTATIONS].map(normalise_id)
    skipped = [
        skip(f"row {i + 2}", "annotations.csv row without a song_id") for i in np.flatnonzero(ann[ID_ANNOTATIONS] == "")
    ]
    ann = ann[ann[ID_ANNOTATIONS] != ""]
    ann[list(RATING_COLUMNS)] = ann[list(RATING_COLUMNS)].apply(pd.to_numeric, errors="coerce")  # "5" == "5.0"
    ann, dup_skipped = _dedupe(ann, ID_ANNOTATIONS, list(RATING_COLUMNS), ANNOTATIONS.name)
    skipped += dup_skipped
    ratings = ann[list(RATING_COLUMNS)]
    bad_nan = ratings.isna()
    bad_range = (ratings < RATING_MIN) | (ratings > RATING_MAX)
    keep = []
    for (i, sid), nan_row, range_row in zip(
        ann[ID_ANNOTATIONS].items(),
        bad_nan.itertuples(index=False),
        bad_range.itertuples(index=False),
        strict=True,
    ):
        problems = [f"{c} is missing or not a number" for c, b in zip(RATING_COLUMNS, nan_row, strict=True) if b]
        problems += [
            f"{c}={ratings.at[i, c]:g} outside {RATING_MIN:g}..{RATING_MAX:g}"
            for c, b in zip(RATING_COLUMNS, range_row, strict=True)
            if b
        ]
        if problems:
            skipped.append(skip(sid, "bad rating in annotations.csv: " + "; ".join(problems)))
        else:
            keep.append(i)
    out = pd.DataFrame({"clip_id": ann.loc[keep, ID_ANNOTATIONS]})
    out["labels"] = [list(map(float, r)) for r in ratings.loc[keep].itertuples(index=False)]
    return out.reset_index(drop=True), skipped


def _read_metadata(root: Path) -> tuple[pd.DataFrame, list[dict]]:
    meta = read_table(root / METADATA, ";", [ID_METADATA, ARTIST], "metadata")
    meta[ID_METADATA] = meta[ID_METADATA].map(normalise_id)
    meta = meta[meta[ID_METADATA] != ""]
    if SOURCE not in meta.columns:
        meta[SOURCE] = ""
    return _dedupe(meta, ID_METADATA, [ARTIST, SOURCE], METADATA.name)


def _split_source(table: pd.DataFrame, seed: int, eval_fraction: float, valid_fraction: float) -> dict[str, str]:
    """clip_id -> train/valid/test for the source rows (artist-exclusive, reference procedure)."""
    n_eval = int(eval_fraction * len(table))
    counts = table["group"].value_counts()
    singles = np.array(sorted(counts.index[counts == 1]), dtype=object)
    if len(singles) < n_eval:
        raise DatasetSplitError(
            f"the evaluation set needs {n_eval} artists with a single track ({eval_fraction:g} x "
            f"{len(table)} source clips) but only {len(singles)} exist; lower eval_fraction"
        )
    rng = np.random.default_rng(seed)
    chosen = list(rng.choice(singles, size=n_eval, replace=False)) if n_eval else []
    n_valid = int(round(valid_fraction * n_eval))
    split_of_artist = {a: ("valid" if k < n_valid else "test") for k, a in enumerate(chosen)}
    return {cid: split_of_artist.get(g, "train") for cid, g in zip(table["clip_id"], table["group"], strict=True)}


def _no_piano_clips(path: str | Path, piano: list[str], all_ids: set[str], skipped: list[dict]) -> str:
    """Why a piano id list gives no piano_test clip: the piano clips would silently train as source and the
    evaluation would fail hours later, so this is an error at prepare time."""
    if not piano:
        return f"{path}: the piano id list names no song ids (piano_test would be empty)"
    matched = [sid for sid in piano if sid in all_ids]
    if not matched:
        sample = ", ".join(repr(v) for v in sorted(all_ids)[:3])
        return (
            f"{path}: none of its {len(piano)} piano ids ({', '.join(map(repr, piano[:3]))}, ...) is a song id of "
            f"the dataset (whose ids look like {sample}): is it the list for this dataset?"
        )
    why = {s["item"]: s["reason"] for s in skipped}
    reasons = "; ".join(f"{sid}: {why.get(sid, 'not usable')}" for sid in matched[:3])
    return f"{path}: none of the {len(matched)} listed piano clips in the dataset is usable ({reasons})"


def index_midlevel(
    root: str | Path,
    piano_ids: str | Path | None = None,
    seed: int = 0,
    eval_fraction: float = 0.1,
    valid_fraction: float = 0.2,
) -> DatasetIndex:
    """Index the Mid-level dataset under ``root`` and split it (see the module docstring).

    Skipped (reported, not raised): NaN or out-of-range ratings, conflicting duplicate ids (identical
    duplicates keep one copy), ids without metadata or without an artist, metadata rows without annotations,
    missing audio, a song id whose audio path leads outside ``root``, and piano-list ids not in the dataset
    (a note). Raises :class:`DatasetFormatError` for a missing CSV or column, :class:`DatasetSplitError` when
    there are too few single-track artists or when a piano id list yields no piano_test clip at all.
    """
    if not 0.0 <= eval_fraction < 1.0 or not 0.0 <= valid_fraction <= 1.0:
        raise ValueError(
            f"eval_fraction must be in [0, 1) and valid_fraction in [0, 1], got {eval_fraction}, {valid_fraction}"
        )
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise DatasetFormatError(f"{root}: Mid-level dataset folder not found")
    ann, skipped = _read_annotations(root)
    meta, meta_skipped = _read_metadata(root)
    skipped += meta_skipped
    meta = meta.set_index(ID_METADATA)

    known = set(ann["clip_id"])
    already = {s["item"] for s in skipped}
    skipped += [
        skip(sid, "in metadata.csv but not in annotations.csv (no ratings)", False)
        for sid in meta.index
        if sid not in known and sid not in already
    ]
    conflicting_meta = {s["item"] for s in meta_skipped if "conflicting" in s["reason"]}
    rows = []
    # plain dicts and lists: pandas' per-scalar access costs more than the rest of the loop
    pairs = zip(meta[ARTIST].tolist(), meta[SOURCE].tolist(), strict=True)
    about = dict(zip(meta.index.tolist(), pairs, strict=True))  # ids are unique after _dedupe
    for sid, labels in zip(ann["clip_id"].tolist(), ann["labels"].tolist(), strict=True):
        if sid in conflicting_meta:
            continue  # already reported with the metadata conflict
        if sid not in about:
            skipped.append(skip(sid, "in annotations.csv but not in metadata.csv (artist unknown)"))
            continue
        artist, source = about[sid]
        if not artist:
            skipped.append(skip(sid, "metadata.csv gives no artist"))
            continue
        path, why = path_inside(root, str(AUDIO_DIR / f"{sid}.mp3"))
        if path is None:
            skipped.append(skip(sid, f"song id {sid!r} in {ANNOTATIONS.name}: {why}"))
            continue
        if not path.is_file():
            what = "is a directory, not an audio file" if path.is_dir() else "not found"
            skipped.append(skip(sid, f"audio file {what}: {path}"))
            continue
        rows.append((sid, artist, str(path), labels, source))
    table = pd.DataFrame(rows, columns=["clip_id", "group", "path", "labels", "source"])

    piano: list[str] = []
    if piano_ids is not None:
        piano = read_piano_ids(piano_ids)
        all_ids = known | set(meta.index)
        skipped += [
            skip(sid, "listed in the piano id list but not in the dataset", False)
            for sid in piano
            if sid not in all_ids
        ]
    is_piano = table["clip_id"].isin(set(piano))
    if piano_ids is not None and not is_piano.any():
        raise DatasetSplitError(_no_piano_clips(piano_ids, piano, known | set(meta.index), skipped))
    source = table[~is_piano]
    split_of = _split_source(source, seed, eval_fraction, valid_fraction)
    table["domain"] = np.where(is_piano, "target", "source")
    table["split"] = [split_of.get(c, "piano_test") for c in table["clip_id"]]
    table["dataset"] = DATASET
    table = table[["clip_id", "dataset", "domain", "split", "group", "path", "labels", "source"]]
    sizes = {s: int((table["split"] == s).sum()) for s in SPLITS}
    options = {
        "seed": seed,
        "eval_fraction": eval_fraction,
        "valid_fraction": valid_fraction,
        "piano_ids": None if piano_ids is None else str(Path(piano_ids).expanduser().resolve()),
        "n_piano_ids": len(piano),
    }
    return DatasetIndex(table=table, skipped=skipped, split_sizes=sizes, root=str(root), options=options)
