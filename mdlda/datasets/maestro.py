"""Index of MAESTRO v3.0.0 (solo piano, unlabelled target domain): one row per performance.

On disk (as downloaded)::

    <root>/maestro-v3.0.0.csv    canonical_composer, canonical_title, split, year, midi_filename,
                                 audio_filename, duration
    <root>/<audio_filename>      e.g. 2018/MIDI-Unprocessed_...wav (44.1 or 48 kHz stereo)

The prepare stage cuts each performance at decode time into non-overlapping 15-s segments from its start (the
last partial one dropped); segment ``i`` of a performance is ``segment_id(stem, i)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from mdlda.datasets.common import DatasetFormatError, DatasetIndex, path_inside, read_table, skip, suggest
from mdlda.params import SEGMENT_SECONDS

DATASET = "maestro"
CSV_NAME = "maestro-v3.0.0.csv"
JSON_NAME = "maestro-v3.0.0.json"
COLUMNS: tuple[str, ...] = (
    "canonical_composer",
    "canonical_title",
    "split",
    "year",
    "midi_filename",
    "audio_filename",
    "duration",
)
SPLITS: tuple[str, ...] = ("train", "validation", "test")


def segment_id(stem: str, index: int) -> str:
    """The clip id of segment ``index`` of the performance whose audio file stem is ``stem``."""
    return f"{stem}#{index}"


def index_maestro(
    root: str | Path,
    splits: Sequence[str] | None = None,
    max_performances: int | None = None,
    seed: int = 0,
) -> DatasetIndex:
    """Index the MAESTRO performances under ``root``, optionally only ``splits`` and a seeded subset.

    Columns beyond the common ones: ``duration`` (s, from the CSV), ``expected_segments``
    (floor(duration / 15)), ``composer``, ``title``, ``year``. Skipped (reported): missing WAV, missing or
    non-numeric duration, duration under one segment, a duplicate audio stem, an ``audio_filename`` that leads
    outside ``root`` (absolute, ``..``, or a symlink out: never read). ``max_performances`` draws that
    many of the usable performances (seeded) and keeps them in CSV order. Raises :class:`DatasetFormatError`
    for a missing CSV or column, ``ValueError`` for an unknown split name.
    """
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise DatasetFormatError(f"{root}: MAESTRO folder not found")
    df = read_table(root / CSV_NAME, ",", COLUMNS, "MAESTRO metadata")
    present = sorted(set(df["split"]))
    if splits is not None:
        splits = [str(s) for s in ([splits] if isinstance(splits, str) else splits)]
        for s in splits:
            if s not in present and s not in SPLITS:
                raise ValueError(f"unknown MAESTRO split {s!r}{suggest(s, [*SPLITS, *present])}; the CSV has {present}")
        df = df[df["split"].isin(splits)]

    rows, skipped = [], []
    seen: set[str] = set()
    df = df.assign(csv_line=df.index + 2)  # the CSV line (1 is the header), for messages
    for rec in df.itertuples(index=False):
        name = rec.audio_filename
        stem = Path(name).stem
        if not name:
            skipped.append(skip(f"{rec.canonical_composer}: {rec.canonical_title}", "no audio_filename"))
            continue
        path, why = path_inside(root, name)
        if path is None:
            skipped.append(skip(name, f"audio_filename in {CSV_NAME} line {rec.csv_line}: {why}"))
            continue
        if stem in seen:
            skipped.append(skip(name, f"duplicate audio file stem {stem!r} (clip ids must be unique)"))
            continue
        seen.add(stem)
        try:
            duration = float(rec.duration)
        except ValueError:
            duration = math.nan
        if not math.isfinite(duration):
            skipped.append(skip(name, f"duration {rec.duration!r} is not a number"))
            continue
        if duration < SEGMENT_SECONDS:
            skipped.append(skip(name, f"{duration:.2f} s is shorter than one {SEGMENT_SECONDS:g}-s segment", False))
            continue
        if not path.is_file():
            what = "is a directory, not an audio file" if path.is_dir() else "not found"
            skipped.append(skip(name, f"audio file {what}: {path}"))
            continue
        rows.append(
            {
                "clip_id": stem,
                "dataset": DATASET,
                "domain": "target",
                "split": rec.split,
                "group": stem,
                "path": str(path),
                "labels": None,
                "duration": duration,
                "expected_segments": int(duration // SEGMENT_SECONDS),
                "composer": rec.canonical_composer,
                "title": rec.canonical_title,
                "year": rec.year,
            }
        )
    table = pd.DataFrame(
        rows,
        columns=[
            "clip_id",
            "dataset",
            "domain",
            "split",
            "group",
            "path",
            "labels",
            "duration",
            "expected_segments",
            "composer",
            "title",
            "year",
        ],
    )
    if max_performances is not None and max_performances < len(table):
        if max_performances < 0:
            raise ValueError(f"max_performances must be >= 0, got {max_performances}")
        order = np.argsort(table["clip_id"].to_numpy(), kind="stable")
        pick = np.random.default_rng(seed).choice(order, size=max_performances, replace=False)
        table = table.iloc[np.sort(pick)]
    table = table.reset_index(drop=True)
    sizes = {s: int((table["split"] == s).sum()) for s in dict.fromkeys([*SPLITS, *table["split"]])}
    options = {
        "splits": None if splits is None else list(splits),
        "max_performances": max_performances,
        "seed": seed,
        "expected_segments": int(table["expected_segments"].sum()),
    }
    return DatasetIndex(table=table, skipped=skipped, split_sizes=sizes, root=str(root), options=options)
