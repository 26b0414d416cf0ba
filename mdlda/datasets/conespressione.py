"""Con Espressione: the dimensions CSV, matching it to a folder of performance audio, and a generated demo set.

The dimensions CSV (built by the user from the public release, see ``docs/conespressione.md``)::

    performance_name, piece_name, dim_1, dim_2, dim_3, dim_4      (other columns, e.g. performer, are kept)

``piece_name`` groups performances of the same piece (cross-validation keeps a piece on one side of every
split). It may be left out when a ``piece_pattern`` is given instead: a regular expression searched in
``performance_name`` whose group ``piece`` (or first group) is the piece. Audio files (WAV, FLAC, MP3; the
folder is searched recursively) match a row when their file stem equals ``performance_name``.

:func:`generate_conespressione_demo` writes a tiny set in exactly this format: stereo 44.1 kHz piano WAVs of a
few pieces, each played by a few "performers" (tempo, touch, loudness, dynamics), and a CSV whose dimensions
are computed from the written audio (loudness, detachment, brightness, dynamic range) plus a little noise.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mdlda.datasets.common import DatasetFormatError, column_key, read_table, skip, suggest

DATASET = "conespressione"
DIMENSIONS: tuple[str, ...] = ("dim_1", "dim_2", "dim_3", "dim_4")
AUDIO_EXTENSIONS: tuple[str, ...] = (".wav", ".flac", ".mp3")
CSV_NAME = "dimensions.csv"
AUDIO_DIR = "audio"
DEMO_RATE = 44_100
DEMO_PATTERN = r"^\d+_(?P<piece>[^_]+)_"  # the demo's names: <nn>_<piece>_<performer>_<mm.ss-mm.ss>


def _listing(items: list[str], limit: int = 8) -> str:
    shown = ", ".join(repr(i) for i in items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _pieces_from_names(names: pd.Series, pattern: str, path: Path) -> pd.Series:
    try:
        rx = re.compile(pattern)
    except re.error as exc:
        raise DatasetFormatError(f"piece pattern {pattern!r} is not a valid regular expression ({exc})") from exc
    if rx.groups == 0:
        raise DatasetFormatError(f"piece pattern {pattern!r} has no group: mark the piece with (?P<piece>...)")
    group = "piece" if "piece" in rx.groupindex else 1
    pieces, unmatched = [], []
    for name in names:
        m = rx.search(name)
        piece = m.group(group) if m else None
        if not piece:
            unmatched.append(name)
        pieces.append(piece or "")
    if unmatched:
        raise DatasetFormatError(
            f"{path}: piece pattern {pattern!r} finds no piece in performance_name {_listing(unmatched)}"
        )
    return pd.Series(pieces, index=names.index)


def read_dimensions(path: str | Path, piece_pattern: str | None = None) -> pd.DataFrame:
    """The validated dimensions table: ``performance_name``, ``piece_name``, ``dim_1..dim_4`` (float), extras.

    Headers match case- and space/underscore-insensitively. Raises :class:`DatasetFormatError` naming the file
    and the problem: missing columns (all of them listed), an empty or duplicate ``performance_name``, an empty
    ``piece_name``, a missing or non-numeric dimension value, a ``piece_pattern`` that finds no piece, or both
    a ``piece_name`` column and a ``piece_pattern`` (say which one groups the pieces).
    """
    path = Path(path).expanduser()
    df = read_table(path, ",", (), "Con Espressione dimensions CSV")
    found = {column_key(c): c for c in df.columns}
    required = ["performance_name", *DIMENSIONS] + ([] if piece_pattern else ["piece_name"])
    missing = [c for c in required if column_key(c) not in found]
    if missing:
        spare = [k for k in found if k not in {column_key(c) for c in required}]  # candidates for a typo
        named = []
        for c in missing:
            close = difflib.get_close_matches(column_key(c), spare, n=1, cutoff=0.5)
            if close:
                spare.remove(close[0])  # each found column is suggested once
            named.append(c + (f" (did you mean {found[close[0]]!r}?)" if close else ""))
        listing = ", ".join(named)
        raise DatasetFormatError(
            f"{path}: missing column(s) {listing} (columns found: {', '.join(df.columns) or 'none'}; "
            "expected performance_name, piece_name, dim_1..dim_4, comma-separated"
            + ("" if piece_pattern else "; or give a piece pattern instead of piece_name")
            + ")"
        )
    if piece_pattern and "piece_name" in found:
        raise DatasetFormatError(
            f"{path}: has a piece_name column and a piece pattern was given too; use one of them to group pieces"
        )
    df = df.rename(columns={found[column_key(c)]: c for c in required})
    if df.empty:
        raise DatasetFormatError(f"{path}: no rows")
    names = df["performance_name"]
    if (names == "").any():
        rows = [str(i + 2) for i in np.flatnonzero(names == "")]
        raise DatasetFormatError(f"{path}: empty performance_name on line(s) {', '.join(rows)}")
    dup = sorted(names[names.duplicated()].unique())
    if dup:
        raise DatasetFormatError(f"{path}: duplicate performance_name {_listing(dup)} (each must appear once)")
    if piece_pattern:
        df["piece_name"] = _pieces_from_names(names, piece_pattern, path)
    elif (df["piece_name"] == "").any():
        raise DatasetFormatError(f"{path}: empty piece_name for {_listing(list(names[df['piece_name'] == '']))}")
    for dim in DIMENSIONS:
        values = pd.to_numeric(df[dim], errors="coerce")
        bad = ~np.isfinite(values.to_numpy(dtype=float))
        if bad.any():
            raise DatasetFormatError(f"{path}: {dim} is missing, NaN or not a number for {_listing(list(names[bad]))}")
        df[dim] = values.astype(float)
    extras = [c for c in df.columns if c not in ("performance_name", "piece_name", *DIMENSIONS)]
    return df[["performance_name", "piece_name", *DIMENSIONS, *extras]].reset_index(drop=True)


def match_audio(audio_dir: str | Path, dims: pd.DataFrame) -> tuple[pd.DataFrame, list[dict[str, Any]]]:
    """The rows of ``dims`` that have an audio file (column ``path`` added), and what was skipped and why.

    Skipped (reported, in this order): a stem with more than one audio file (ambiguous), a CSV row without an
    audio file (``counts_as_failure``), an audio file without a CSV row (a note). Raises
    :class:`DatasetFormatError` when ``audio_dir`` is not a folder.
    """
    audio_dir = Path(audio_dir).expanduser()
    if not audio_dir.is_dir():
        raise DatasetFormatError(f"{audio_dir}: audio folder not found")
    by_stem: dict[str, list[Path]] = {}
    for p in sorted(audio_dir.rglob("*")):
        if p.is_file() and p.suffix.lower() in AUDIO_EXTENSIONS:
            by_stem.setdefault(p.stem, []).append(p)
    skipped = []
    for stem, paths in by_stem.items():
        if len(paths) > 1:
            skipped.append(skip(stem, f"ambiguous: {len(paths)} audio files ({', '.join(p.name for p in paths)})"))
    usable = {s: ps[0] for s, ps in by_stem.items() if len(ps) == 1}
    wanted = set(dims["performance_name"])
    unmatched = [s for s in by_stem if s not in wanted]
    for name in dims["performance_name"]:
        if name not in by_stem:
            exts = "/".join(e.lstrip(".") for e in AUDIO_EXTENSIONS)
            skipped.append(skip(name, f"no audio file {name}.{{{exts}}} in {audio_dir}{suggest(name, unmatched)}"))
    for stem in unmatched:
        skipped.append(skip(by_stem[stem][0].name, "audio file with no row in the dimensions CSV", failure=False))
    items = dims[dims["performance_name"].isin(usable)].copy()
    items["path"] = [str(usable[n]) for n in items["performance_name"]]
    return items.reset_index(drop=True), skipped


# ---------------------------------------------------------------------------------------------------- demo set

_PIECES = ("Nocturne", "Etude", "Sarabande", "Impromptu", "Berceuse", "Toccata")
_PERFORMERS = ("Alder", "Birke", "Castell", "Dornach", "Ehrlich", "Falk")
DEMO_NOISE = 0.25  # sd of the noise added to each (z-scored) dimension


def audio_descriptors(x: np.ndarray, sr: int) -> dict[str, float]:
    """Loudness (RMS dB), detachment (share of quiet frames), brightness (centroid, Hz), dynamic range (dB sd)."""
    frame, hop = 2048, 512
    n = 1 + max(len(x) - frame, 0) // hop
    frames = np.stack([x[i * hop : i * hop + frame] for i in range(n)])  # (n, 2048)
    rms = np.sqrt(np.mean(frames**2, axis=1)) + 1e-9
    db = 20 * np.log10(rms)
    spec = np.abs(np.fft.rfft(frames * np.hanning(frame), axis=1))  # (n, 1025)
    freqs = np.fft.rfftfreq(frame, 1 / sr)
    loud = db > db.max() - 40  # frames that sound at all
    centroid = (spec[loud] @ freqs) / (spec[loud].sum(axis=1) + 1e-9)
    return {
        "loudness_db": float(20 * np.log10(np.sqrt(np.mean(x**2)) + 1e-9)),
        "detachment": float(np.mean(db < np.median(db[loud]) - 12)),
        "brightness_hz": float(np.mean(centroid)),
        "dynamic_range_db": float(np.std(db[loud])),
    }


def _perform(score: dict, style: dict, seconds: float, bank, rng: np.random.Generator) -> np.ndarray:
    """One performer's rendering of a piece: tempo, touch (low-pass), dynamics curve, overall level."""
    from scipy.signal import lfilter

    from mdlda.datasets.demo_synth import PIANO, SR, render

    played = dict(score)
    notes = score["notes"].copy()
    notes[:, :2] /= style["tempo"]  # onsets and durations
    played["notes"] = notes[notes[:, 0] < seconds]
    n = int(round(seconds * SR))
    x = render(played, PIANO, n, bank, rng, pan=True)  # (n, 2), peak 0.8
    a = style["darkness"]
    x = lfilter([1 - a], [1, -a], x, axis=0)  # a soft touch: one-pole low-pass
    t = np.arange(n) / SR
    swell = 1 + style["swell"] * np.sin(2 * np.pi * t / style["swell_period"] + style["phase"])
    x = x * swell[:, None]
    peak = 10 ** (style["gain_db"] / 20)  # the performer's level: peak -14..0 dBFS
    return np.clip(x / max(float(np.abs(x).max()), 1e-6) * peak, -1, 1).astype(np.float32)


def generate_conespressione_demo(
    out: str | Path, seed: int = 0, pieces: int = 4, performers: int = 4, seconds: tuple[float, float] = (16.0, 20.0)
) -> dict[str, Any]:
    """Write ``out/audio/<performance_name>.wav`` and ``out/dimensions.csv`` (see the module docstring).

    Each piece is composed once (:func:`mdlda.datasets.demo_synth.compose`, piano) and every performer plays the
    same notes with their own tempo, articulation, touch, dynamics and level. The four dimensions are
    z-scored audio descriptors measured on the decoded files (see :func:`audio_descriptors`: dim_1 loudness,
    dim_2 detachment, dim_3 brightness, dim_4 dynamic range) plus N(0, DEMO_NOISE): like the real dimensions,
    they describe how a performance sounds, not which piece it is. The same seed writes identical files.
    """
    import soundfile as sf
    import soxr

    from mdlda.audio import load
    from mdlda.datasets.demo_synth import PIANO, SR, ToneBank, compose
    from mdlda.params import NUM_FEATURES

    if not 2 <= pieces <= len(_PIECES) or not 1 <= performers <= len(_PERFORMERS):
        raise ValueError(f"pieces must be 2..{len(_PIECES)} and performers 1..{len(_PERFORMERS)}")
    out = Path(out).expanduser().resolve()
    (out / AUDIO_DIR).mkdir(parents=True, exist_ok=True)
    bank = ToneBank()
    rows, k = [], 0
    for p in range(pieces):
        rng = np.random.default_rng([seed, 10, p])
        length = float(rng.uniform(*seconds))
        knobs = rng.random(NUM_FEATURES)
        for q in range(performers):
            prng = np.random.default_rng([seed, 11, p, q])
            style = {
                "tempo": float(prng.uniform(0.8, 1.25)),
                "articulation": float(prng.random()),
                "darkness": float(prng.uniform(0.0, 0.9)),
                "swell": float(prng.uniform(0.0, 0.7)),
                "swell_period": float(prng.uniform(4.0, 9.0)),
                "phase": float(prng.uniform(0, 2 * np.pi)),
                "gain_db": float(prng.uniform(-14.0, 0.0)),
            }
            played = knobs.copy()
            played[1] = style["articulation"]  # articulation only changes note lengths: the same notes
            score = compose(played, length * 1.3, np.random.default_rng([seed, 12, p]), PIANO, drums=False)
            x = _perform(score, style, length, bank, prng)
            k += 1
            name = f"{k:02d}_{_PIECES[p]}_{_PERFORMERS[q]}_00.00-00.{int(length):02d}"  # like the release's names
            path = out / AUDIO_DIR / f"{name}.wav"
            sf.write(str(path), soxr.resample(x, SR, DEMO_RATE, quality="HQ"), DEMO_RATE, subtype="PCM_16")
            rows.append({"performance_name": name, "piece_name": _PIECES[p], "performer": _PERFORMERS[q]})
            rows[-1].update(audio_descriptors(load(path), SR))
    table = pd.DataFrame(rows)
    noise = np.random.default_rng([seed, 13]).normal(0.0, DEMO_NOISE, (len(table), len(DIMENSIONS)))
    for j, (dim, col) in enumerate(
        zip(DIMENSIONS, ("loudness_db", "detachment", "brightness_hz", "dynamic_range_db"), strict=True)
    ):
        v = table[col].to_numpy()
        table[dim] = np.round((v - v.mean()) / (v.std() + 1e-12) + noise[:, j], 4)
    csv = out / CSV_NAME
    table[["performance_name", "piece_name", "performer", *DIMENSIONS]].to_csv(csv, index=False)
    return {
        "out": str(out),
        "audio_dir": str(out / AUDIO_DIR),
        "dims_csv": str(csv),
        "performances": len(table),
        "pieces": pieces,
        "performers": performers,
        "piece_pattern": DEMO_PATTERN,
    }
