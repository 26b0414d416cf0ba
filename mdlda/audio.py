"""Decode audio files of any common format and rate to mono float32 at 22.05 kHz, and cut 15-s segments.

Decoding uses libsndfile (through ``soundfile``: WAV, FLAC, OGG, MP3) and resampling uses soxr (high quality).
Both names and versions are recorded in shard manifests (:func:`decoder_info`) so rebuilt shards are comparable.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from mdlda.params import MAX_PAD_SECONDS, PCM_SCALE, SAMPLE_RATE, SEGMENT_SAMPLES


class AudioError(ValueError):
    """An audio file could not be used: unreadable, empty or too short. The message names the file."""


def decoder_info() -> dict[str, str]:
    """Names and versions of the decoder and resampler (for manifests)."""
    import soundfile
    import soxr

    return {
        "decoder": "libsndfile",
        "decoder_version": soundfile.__libsndfile_version__,
        "soundfile_version": soundfile.__version__,
        "resampler": "soxr-HQ",
        "resampler_version": soxr.__version__,
    }


def to_mono(x: np.ndarray) -> np.ndarray:
    """(frames,) or (frames, channels) -> (frames,) float32 by averaging channels."""
    x = np.asarray(x, dtype=np.float32)
    return x.mean(axis=1, dtype=np.float32) if x.ndim == 2 else x


def resample(x: np.ndarray, sr: int, target_sr: int = SAMPLE_RATE) -> np.ndarray:
    """Resample mono float32 ``x`` from ``sr`` to ``target_sr`` with soxr (identity when equal)."""
    if sr == target_sr:
        return np.ascontiguousarray(x, dtype=np.float32)
    import soxr

    return soxr.resample(x, sr, target_sr, quality="HQ").astype(np.float32, copy=False)


def _existing(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise AudioError(f"{path}: file not found")
    if path.is_dir():
        raise AudioError(f"{path}: is a directory, not an audio file")
    if path.stat().st_size == 0:
        raise AudioError(f"{path}: file is empty (0 bytes)")
    return path


def load(path: str | Path, target_sr: int = SAMPLE_RATE) -> np.ndarray:
    """Decode ``path`` to mono float32 at ``target_sr``. Raises :class:`AudioError` naming the file."""
    import soundfile as sf

    path = _existing(path)
    try:
        x, sr = sf.read(str(path), dtype="float32", always_2d=False)
    except Exception as exc:  # libsndfile raises LibsndfileError / RuntimeError for corrupt data
        raise AudioError(f"{path}: cannot decode ({exc})") from exc
    if x.size == 0:
        raise AudioError(f"{path}: decodes to no samples")
    x = to_mono(x)
    if not np.isfinite(x).all():
        raise AudioError(f"{path}: decoded audio contains NaN or infinite samples")
    return resample(x, sr, target_sr)


def fit_clip(x: np.ndarray, max_pad_s: float = MAX_PAD_SECONDS, sr: int = SAMPLE_RATE) -> tuple[np.ndarray, str]:
    """One 15-s segment from a clip: crop a longer clip, zero-pad one at most ``max_pad_s`` short.

    Returns the segment and what was done (``"exact"``, ``"cropped"``, ``"padded"``); a clip shorter than
    15 s - ``max_pad_s`` raises :class:`AudioError`.
    """
    n = len(x)
    if n >= SEGMENT_SAMPLES:
        return x[:SEGMENT_SAMPLES], ("exact" if n == SEGMENT_SAMPLES else "cropped")
    short_s = (SEGMENT_SAMPLES - n) / sr
    if short_s > max_pad_s + 1e-9:
        raise AudioError(
            f"clip is {n / sr:.2f} s long, {short_s:.2f} s short of a {SEGMENT_SAMPLES / sr:.0f}-s segment "
            f"(at most {max_pad_s:.2f} s is zero-padded)"
        )
    return np.pad(x, (0, SEGMENT_SAMPLES - n)), "padded"


def segments(x: np.ndarray, hop: int = SEGMENT_SAMPLES) -> Iterator[tuple[int, np.ndarray]]:
    """Non-overlapping (by default) full 15-s windows from the start; the last partial window is dropped.

    Yields ``(index, window)``; the window starts at ``index * hop`` samples.
    """
    for i, start in enumerate(range(0, len(x) - SEGMENT_SAMPLES + 1, hop)):
        yield i, x[start : start + SEGMENT_SAMPLES]


def to_pcm16(x: np.ndarray) -> np.ndarray:
    """float [-1, 1] -> int16 (clipped)."""
    return np.clip(np.round(x * PCM_SCALE), -32_768, 32_767).astype(np.int16)


def from_pcm16(x: np.ndarray) -> np.ndarray:
    """int16 -> float32 [-1, 1]."""
    return x.astype(np.float32) / PCM_SCALE


def stream_blocks(path: str | Path, target_sr: int = SAMPLE_RATE, block_seconds: float = 10.0) -> Iterator[np.ndarray]:
    """Decode a recording block by block: mono float32 blocks at ``target_sr`` (about ``block_seconds`` each).

    Memory stays at a block or two whatever the recording's length. Raises :class:`AudioError` naming the file.
    """
    import soundfile as sf
    import soxr

    path = _existing(path)
    try:
        f = sf.SoundFile(str(path))
    except Exception as exc:
        raise AudioError(f"{path}: cannot decode ({exc})") from exc
    with f:
        sr = f.samplerate
        stream = None if sr == target_sr else soxr.ResampleStream(sr, target_sr, 1, dtype="float32", quality="HQ")
        block = max(1, int(block_seconds * sr))
        while True:
            try:
                x = f.read(block, dtype="float32", always_2d=True)
            except Exception as exc:
                raise AudioError(f"{path}: decoding failed at {f.tell() / sr:.1f} s ({exc})") from exc
            last = len(x) < block
            x = to_mono(x)
            if not np.isfinite(x).all():
                raise AudioError(f"{path}: decoded audio contains NaN or infinite samples")
            if stream is not None:
                x = stream.resample_chunk(x, last=last)
            yield x
            if last:
                break


def stream_segments(
    path: str | Path, target_sr: int = SAMPLE_RATE, block_seconds: float = 10.0
) -> Iterator[tuple[int, np.ndarray]]:
    """Decode a long recording block by block and yield its non-overlapping 15-s segments.

    Memory stays at a few blocks whatever the recording's length (a 20-min MAESTRO WAV is never held whole).
    Yields ``(index, float32 window)``; the last partial window is dropped. Raises :class:`AudioError`.
    """
    buf = np.zeros(0, dtype=np.float32)
    index = 0
    for x in stream_blocks(path, target_sr, block_seconds):
        buf = np.concatenate([buf, x])
        while len(buf) >= SEGMENT_SAMPLES:
            yield index, buf[:SEGMENT_SAMPLES]
            buf = buf[SEGMENT_SAMPLES:]
            index += 1
