"""Aligning performances of one piece in time: streamed chroma features and dynamic time warping (librosa).

Features: a 12-bin chroma vector every :data:`HOP` samples (0.1 s at 22.05 kHz) from a :data:`N_FFT`-point STFT
(186 ms Hann frames, not centred: frame ``i`` covers samples ``[i * HOP, i * HOP + N_FFT)``), computed with
``librosa.feature.chroma_stft`` at a fixed reference tuning (A4 = 440 Hz, ``tuning=0``: the same bins for every
block and every recording), each frame divided by its largest bin and log-compressed, ``log(1 + 100 x)``, so
that quiet passages and soft bins count next to loud ones and a recording's level does not matter.
:class:`ChromaStream` computes them from decoded blocks as they arrive, so a recording is decoded once (for the
model's windows and the chroma together) and never held whole.

Alignment: ``librosa.sequence.dtw`` on the cosine distance between the reference's and a performance's frames,
with librosa's standard step sizes ``(1, 1), (0, 1), (1, 0)`` (diagonal, one frame of one recording against the
same frame of the other), equal weights, no band and both ends pinned (the recordings start and end together:
trim long silences first). Any tempo ratio is allowed. The cost matrix is ``N x M`` frames; for long recordings
consecutive frames are averaged so that neither side exceeds :data:`MAX_FRAMES` (memory stays under ~250 MB:
0.1 s resolution up to 5 minutes, 0.4 s for 20 minutes). The warping path becomes a monotone time map,
reference seconds -> performance seconds (:class:`Alignment`), linear between frame centres.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mdlda.params import SAMPLE_RATE

N_FFT = 4096  # samples per chroma frame (186 ms at 22.05 kHz)
HOP = 2205  # samples between chroma frames (0.1 s)
LOG_GAMMA = 100.0  # log compression of the max-normalised chroma
MAX_FRAMES = 3000  # per recording in one DTW; more are averaged in groups (see the module docstring)
STEP_SIZES = np.array([[1, 1], [0, 1], [1, 0]])  # librosa's standard steps, equal weights


class ChromaStream:
    """Chroma frames of a recording fed block by block (:meth:`feed`); :meth:`frames` gives them all, (12, F).

    Holds at most one block plus one frame of audio; the frames are the same as those of the whole recording.
    """

    def __init__(self, sr: int = SAMPLE_RATE) -> None:
        self.sr = sr
        self._buf = np.zeros(0, dtype=np.float32)
        self._frames: list[np.ndarray] = []
        self.samples = 0

    def feed(self, block: np.ndarray) -> None:
        import librosa

        self.samples += len(block)
        self._buf = np.concatenate([self._buf, np.asarray(block, dtype=np.float32)])
        n = (len(self._buf) - N_FFT) // HOP + 1  # whole frames available
        if n <= 0:
            return
        y = self._buf[: (n - 1) * HOP + N_FFT]
        c = librosa.feature.chroma_stft(y=y, sr=self.sr, n_fft=N_FFT, hop_length=HOP, center=False, tuning=0.0)
        self._frames.append(np.log1p(LOG_GAMMA * c).astype(np.float32))  # (12, n); each frame max-normalised
        self._buf = self._buf[n * HOP :]

    def frames(self) -> np.ndarray:
        if not self._frames:
            raise ValueError(f"{self.samples / self.sr:.2f} s of audio is shorter than one chroma frame")
        return np.concatenate(self._frames, axis=1)


def frame_times(n: int, group: int = 1, sr: int = SAMPLE_RATE) -> np.ndarray:
    """Centre (seconds) of each of ``n`` frames, each the average of ``group`` consecutive chroma frames."""
    first = (np.arange(n) * group + (group - 1) / 2) * HOP
    return (first + N_FFT / 2) / sr


def _pool(c: np.ndarray, group: int) -> np.ndarray:
    """Average ``group`` consecutive frames of ``c`` (12, F); a partial last group is averaged over what it has."""
    if group == 1:
        return c
    f = c.shape[1]
    idx = np.arange(f) // group
    sums = np.zeros((c.shape[0], idx[-1] + 1), dtype=np.float64)
    np.add.at(sums.T, idx, c.T)
    return (sums / np.bincount(idx)).astype(np.float32)


@dataclass(frozen=True)
class Alignment:
    """A monotone time map between a reference and a performance, from a DTW path.

    ``reference_s`` is strictly increasing; ``performance_s`` is non-decreasing; linear in between, clamped at
    the ends to ``[0, durations]``.
    """

    reference_s: np.ndarray
    performance_s: np.ndarray
    reference_duration: float
    performance_duration: float
    resolution_s: float  # seconds per DTW frame (HOP / sr x the averaging group)
    cost: float  # mean cosine distance along the path

    def to_performance(self, t: np.ndarray) -> np.ndarray:
        """Performance seconds of reference seconds ``t``."""
        return np.interp(t, self.reference_s, self.performance_s)

    def to_reference(self, t: np.ndarray) -> np.ndarray:
        """Reference seconds of performance seconds ``t`` (the inverse map; a held frame maps to its middle)."""
        p, idx = np.unique(self.performance_s, return_inverse=True)
        r = np.bincount(idx, self.reference_s) / np.bincount(idx)
        return np.interp(t, p, r)


def align(
    reference: np.ndarray,
    performance: np.ndarray,
    durations: tuple[float, float] | None = None,
    sr: int = SAMPLE_RATE,
) -> Alignment:
    """DTW-align ``performance``'s chroma frames (12, M) to ``reference``'s (12, N) (see the module docstring).

    ``durations``: the recordings' lengths in seconds (the map's end points); by default, what the frames cover.
    """
    import librosa

    n, m = reference.shape[1], performance.shape[1]
    group = max(1, -(-max(n, m) // MAX_FRAMES))
    x, y = _pool(reference, group), _pool(performance, group)
    eps = 1e-6  # a silent frame (all zeros) has no direction: make it a uniform one
    cost, path = librosa.sequence.dtw(X=x + eps, Y=y + eps, metric="cosine", step_sizes_sigma=STEP_SIZES)
    path = path[::-1]  # (L, 2) index pairs, start to end
    tr, tp = frame_times(x.shape[1], group, sr)[path[:, 0]], frame_times(y.shape[1], group, sr)[path[:, 1]]
    ref_s, inverse = np.unique(tr, return_inverse=True)
    perf_s = np.bincount(inverse, tp) / np.bincount(inverse)  # a reference frame held over several: their middle
    dur_r, dur_p = durations or ((n - 1) * HOP / sr + N_FFT / sr, (m - 1) * HOP / sr + N_FFT / sr)
    ref_s, perf_s = np.concatenate([[0.0], ref_s, [dur_r]]), np.concatenate([[0.0], perf_s, [dur_p]])
    return Alignment(
        reference_s=ref_s,
        performance_s=np.maximum.accumulate(perf_s),
        reference_duration=dur_r,
        performance_duration=dur_p,
        resolution_s=group * HOP / sr,
        cost=float(cost[-1, -1] / len(path)),
    )
