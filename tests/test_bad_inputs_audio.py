"""The bad-input catalogue, continued (see test_bad_inputs.py): audio files through prepare's per-item decode body
(the same function the Ray tasks run), and a mixed group written as one Parquet file. No Ray."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from mdlda.params import SAMPLE_RATE, SEGMENT_SAMPLES


# ------------------------------------------------------------------ audio: prepare's per-item decode body
def _tone(seconds: float, sr: int = SAMPLE_RATE, channels: int = 1) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    x = 0.3 * np.sin(2 * np.pi * 220 * t).astype(np.float32)
    return np.stack([x * (k + 1) / channels for k in range(channels)], 1) if channels > 1 else x


def _item(path: Path, dataset: str = "midlevel", **extra) -> dict:
    labels = [5.0] * 7 if dataset == "midlevel" else None
    return {"clip_id": path.stem, "dataset": dataset, "domain": "source", "split": "train", "group": "g",
            "path": str(path), "labels": labels, **extra}  # fmt: skip


def _bytes(name: str, data: bytes):
    def make(d: Path) -> Path:
        (d / name).write_bytes(data)
        return d / name

    return make


def _wav(name: str, x, sr: int = SAMPLE_RATE, **kw):
    def make(d: Path) -> Path:
        sf.write(d / name, x() if callable(x) else x, sr, **kw)
        return d / name

    return make


def _dir(name: str):
    def make(d: Path) -> Path:
        (d / name).mkdir()
        return d / name

    return make


NAN = np.full(SEGMENT_SAMPLES, np.nan, np.float32)
AUDIO_BAD = [
    # (id, make(dir) -> path, error pattern naming the file)
    ("corrupt", _bytes("corrupt.mp3", b"ID3 not really" * 200), r"corrupt\.mp3: cannot decode"),
    ("empty", _bytes("empty.mp3", b""), r"empty\.mp3: file is empty"),
    ("too-short", _wav("short.wav", lambda: _tone(3.0)), r"short\.wav: clip is 3\.00 s long"),
    ("nan-samples", _wav("nan.wav", NAN, subtype="FLOAT"), r"nan\.wav: decoded audio contains NaN"),
    ("directory-named-x.mp3", _dir("x.mp3"), r"x\.mp3: is a directory, not an audio file"),
    ("missing", lambda d: d / "gone.mp3", r"gone\.mp3: file not found"),
]

AUDIO_OK = [
    # (id, make(dir) -> path): inputs decoded as they should be (downmixed, resampled)
    ("8-channel", _wav("eight.wav", lambda: _tone(15.5, channels=8))),
    ("96-kHz", _wav("hi.wav", lambda: _tone(16.0, sr=96_000), 96_000)),
]


@pytest.mark.parametrize("case, make, match", AUDIO_BAD, ids=[c[0] for c in AUDIO_BAD])
def test_bad_audio_is_a_reported_skip_naming_the_file(tmp_path, case, make, match):
    from mdlda.shards import decode_item

    res = decode_item(_item(make(tmp_path)))
    assert res.rows == [] and res.error and re.search(match, res.error), res.error


@pytest.mark.parametrize("case, make", AUDIO_OK, ids=[c[0] for c in AUDIO_OK])
def test_multichannel_and_high_rate_audio_is_downmixed_and_resampled(tmp_path, case, make):
    from mdlda.audio import from_pcm16
    from mdlda.shards import decode_item

    res = decode_item(_item(make(tmp_path)))
    assert res.error is None and len(res.rows) == 1 and res.rows[0]["audio"].shape == (SEGMENT_SAMPLES,)
    x = from_pcm16(res.rows[0]["audio"])
    # the mono tone at 220 Hz: the channel mean of _tone's channels is 0.3 * (n + 1) / 2n of the tone's peak
    peak = 0.3 * (9 / 16 if case == "8-channel" else 1.0)
    assert np.abs(x[SAMPLE_RATE : 2 * SAMPLE_RATE]).max() == pytest.approx(peak, rel=0.02)


def test_a_truncated_maestro_wav_is_a_warning_and_its_segments_are_kept(tmp_path):
    from mdlda.shards import decode_item

    sf.write(tmp_path / "perf.wav", _tone(31.0, sr=44_100), 44_100)
    res = decode_item(_item(tmp_path / "perf.wav", "maestro", duration=64.8, expected_segments=4))
    assert res.error is None and len(res.rows) == 2
    assert re.search(r"perf\.wav: decoded to 2 of the 4 segments its CSV duration \(64\.8 s\)", res.warning)
    whole = decode_item(_item(tmp_path / "perf.wav", "maestro", duration=31.0, expected_segments=2))
    assert whole.warning is None and len(whole.rows) == 2


def test_a_group_with_bad_files_writes_every_good_row(tmp_path):
    """prepare's task body on a mixed group: the bad files come back as errors, the good ones are all written."""
    import pyarrow.parquet as pq

    from pipelines.prepare_decode import decode_group

    d = tmp_path / "audio"
    d.mkdir()
    bad = [make(d) for _, make, _ in AUDIO_BAD]
    good = [make(d) for _, make in AUDIO_OK] + [_wav("fine.wav", lambda: _tone(15.0))(d)]
    records = decode_group([_item(p) for p in [*good, *bad]], str(tmp_path / "part.parquet"))
    errors = {r["item"]: r["error"] for r in records if r["error"]}
    assert set(errors) == {p.stem for p in bad}
    table = pq.read_table(tmp_path / "part.parquet").to_pandas()
    assert sorted(table.clip_id) == sorted(p.stem for p in good)
