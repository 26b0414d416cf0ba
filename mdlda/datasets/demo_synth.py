"""Synthesis behind the demo dataset: a tiny composer whose knobs are the 7 mid-level features, and a sampler.

:func:`compose` turns seven knobs in [0, 1] (in :data:`mdlda.params.FEATURES` order) into note events:

- melodiousness: a prominent line in stepwise scale motion (high) vs a quieter, fragmented line of random
  leaps of 4-12 scale degrees (low);
- articulation: sounding length / inter-onset interval, legato 1.0 (low) down to staccato 0.15 (high);
- rhythm complexity: one steady note value (low) vs mixed dotted/short/long values, syncopated chords, drums;
- rhythm stability: a steady grid and a bass pulse on every beat (high) vs tempo drift plus onset jitter,
  melody, chords and drums apart (low);
- dissonance: plain triads (low) vs added minor seconds, tritones and major sevenths (high);
- tonal stability: one key, diatonic notes over a tonic pedal (high) vs frequent chromatic modulations, altered
  notes and a wandering bass (low);
- minorness: the fraction of bars in the (parallel) natural minor mode.

:class:`ToneBank` renders one tone per (timbre, pitch) once (deterministic, cached per generation run) and
:func:`render` places cut, faded copies of them on a buffer: vectorised, fast, and the same for every caller.
Source timbres are non-piano (bowed string, clarinet, brass, flute, plucked guitar, plus drums); the target
domain is a piano model (fast attack, two-stage exponential decay, slightly inharmonic partials).
"""

from __future__ import annotations

import numpy as np

from mdlda.params import SAMPLE_RATE

SR = SAMPLE_RATE  # render rate; files are upsampled to 44.1/48 kHz when written
SOURCE_TIMBRES: tuple[str, ...] = ("strings", "clarinet", "brass", "flute", "guitar")
PIANO = "piano"
MELODY, CHORD, CLASH = 0, 1, 2  # voices of a note event
MAJOR = np.array([0, 2, 4, 5, 7, 9, 11])
MINOR = np.array([0, 2, 3, 5, 7, 8, 10])
PROGRESSIONS = ((0, 3, 4, 0), (0, 5, 3, 4), (0, 4, 5, 3), (0, 3, 0, 4))
# Pitch ranges (MIDI) of the melody per timbre; chords sit in the octave around its bottom, the bass below.
MELODY_RANGE = {
    "strings": (60, 84),
    "clarinet": (55, 79),
    "brass": (55, 79),
    "flute": (67, 91),
    "guitar": (52, 76),
    PIANO: (62, 86),
}
TONE_SECONDS = 2.6  # longest sounding note; longer notes are cut
RELEASE_S = {"strings": 0.12, "clarinet": 0.04, "brass": 0.06, "flute": 0.05, "guitar": 0.05, PIANO: 0.08}


def _raised_cos(n: int) -> np.ndarray:
    return (0.5 - 0.5 * np.cos(np.linspace(0.0, np.pi, max(n, 1)))).astype(np.float32)


def _wavetable(f0: float, amps: np.ndarray, phase_cycles: np.ndarray) -> np.ndarray:
    """Band-limited periodic wave with harmonic amplitudes ``amps`` (1-based), read at ``phase_cycles``."""
    size = 4096
    k_max = min(len(amps), int(0.45 * SR / f0), size // 2 - 1)
    spec = np.zeros(size // 2 + 1, dtype=np.complex128)
    spec[1 : k_max + 1] = -1j * amps[:k_max] * size / 2  # sines
    table = np.fft.irfft(spec, n=size)
    idx = (np.mod(phase_cycles, 1.0) * size).astype(np.int64) % size
    return table[idx]


def _midi_hz(p: float) -> float:
    return 440.0 * 2.0 ** ((p - 69) / 12)


class ToneBank:
    """One rendered tone per (timbre, MIDI pitch), normalised to peak 1, built on first use."""

    def __init__(self) -> None:
        self._tones: dict[tuple[str, int], np.ndarray] = {}
        self.n = int(TONE_SECONDS * SR)
        self.t = np.arange(self.n) / SR

    def get(self, timbre: str, pitch: int) -> np.ndarray:
        key = (timbre, int(pitch))
        tone = self._tones.get(key)
        if tone is None:
            rng = np.random.default_rng([int(pitch), *map(ord, timbre)])  # same tone whatever the order of use
            tone = getattr(self, f"_{timbre}")(_midi_hz(pitch), rng).astype(np.float32)
            tone /= max(float(np.abs(tone).max()), 1e-6)
            self._tones[key] = tone
        return tone

    def _env(self, attack_s: float) -> np.ndarray:
        env = np.ones(self.n, dtype=np.float32)
        a = int(attack_s * SR)
        env[:a] = _raised_cos(a)
        return env

    def _vibrato_phase(self, f0: float, rate: float, depth: float, delay_s: float) -> np.ndarray:
        ramp = np.clip((self.t - delay_s) / 0.3, 0.0, 1.0)
        freq = f0 * (1.0 + depth * ramp * np.sin(2 * np.pi * rate * self.t))
        return np.cumsum(freq) / SR

    def _strings(self, f0: float, rng: np.random.Generator) -> np.ndarray:  # bowed: slow attack, vibrato
        k = np.arange(1, 41)
        x = _wavetable(f0, np.exp(-k / 9.0) / k, self._vibrato_phase(f0, 5.5, 0.006, 0.2))
        return x * self._env(0.18) * (1 + 0.05 * np.sin(2 * np.pi * 3.1 * self.t))

    def _clarinet(self, f0: float, rng: np.random.Generator) -> np.ndarray:  # odd harmonics (square-like)
        k = np.arange(1, 41)
        amps = np.where(k % 2 == 1, 1.0 / k, 0.02 / k)
        return _wavetable(f0, amps, f0 * self.t) * self._env(0.04)

    def _brass(self, f0: float, rng: np.random.Generator) -> np.ndarray:  # sawtooth, brightening attack
        k = np.arange(1, 41)
        bright = _wavetable(f0, 1.0 / k**0.8, f0 * self.t)
        dull = _wavetable(f0, 1.0 / k**2.5, f0 * self.t)
        mix = np.clip(self.t / 0.12, 0.0, 1.0)
        return (mix * bright + (1 - mix) * dull) * self._env(0.05)

    def _flute(self, f0: float, rng: np.random.Generator) -> np.ndarray:  # near-sine + breath noise
        x = _wavetable(f0, np.array([1.0, 0.2, 0.08, 0.03]), self._vibrato_phase(f0, 5.0, 0.004, 0.3))
        noise = rng.standard_normal(self.n)
        noise = np.convolve(noise, np.ones(4) / 4, mode="same")  # soft, slightly low-passed breath
        return (x + 0.08 * noise) * self._env(0.07)

    def _guitar(self, f0: float, rng: np.random.Generator) -> np.ndarray:  # Karplus-Strong plucked string
        period = max(int(round(SR / f0)), 2)
        blocks = -(-self.n // period) + 1
        y = np.zeros(blocks * period + 1)
        y[1 : period + 1] = rng.uniform(-1, 1, period)
        g = 0.996 ** (220.0 / f0) ** 0.5  # higher strings ring a little less
        for j in range(1, blocks):  # y[n] = g/2 (y[n-P] + y[n-P-1]), one period at a time
            s = 1 + j * period
            y[s : s + period] = 0.5 * g * (y[s - period : s] + y[s - period - 1 : s - 1])
        return y[1 : self.n + 1]

    def _piano(self, f0: float, rng: np.random.Generator) -> np.ndarray:  # fast attack, inharmonic decay
        pitch = 69 + 12 * np.log2(f0 / 440.0)
        inharm = 1.5e-4 * 2 ** ((pitch - 60) / 24)
        tau = 2.2 * 2 ** (-(pitch - 60) / 30)
        t32 = self.t.astype(np.float32)
        x = np.zeros(self.n, dtype=np.float32)
        for k in range(1, 11):
            fk = k * f0 * np.sqrt(1 + inharm * k * k)  # stretched partials (string stiffness)
            if fk > 0.45 * SR:
                break
            tk = tau / (1 + 0.45 * (k - 1))  # upper partials die faster
            # Two-stage decay (fast, then slow); the slow part from two slightly detuned strings (beating).
            fast = np.exp(t32 / np.float32(-(0.12 * tk + 0.02)))
            slow = np.exp(t32 / np.float32(-tk))
            detuned = fk * (1 + rng.uniform(-4e-4, 4e-4))
            s1 = np.sin(np.float32(2 * np.pi) * np.mod(fk * self.t, 1.0).astype(np.float32))
            s2 = np.sin(np.float32(2 * np.pi) * np.mod(detuned * self.t, 1.0).astype(np.float32))
            x += np.float32(k**-1.1) * (1.3 * fast * s1 + 0.35 * slow * (s1 + s2))
        hammer = rng.standard_normal(int(0.01 * SR)) * np.linspace(1, 0, int(0.01 * SR))
        x[: len(hammer)] += 0.3 * hammer
        return x * self._env(0.003)


def _drum(kind: str, rng: np.random.Generator) -> np.ndarray:
    n = int({"kick": 0.35, "snare": 0.2, "hat": 0.06}[kind] * SR)
    t = np.arange(n) / SR
    if kind == "kick":
        return np.sin(2 * np.pi * (45 * t + 60 * (1 - np.exp(-t / 0.04)) * 0.04)) * np.exp(-t / 0.12)
    noise = rng.standard_normal(n)
    if kind == "snare":
        return 0.6 * noise * np.exp(-t / 0.05) + 0.5 * np.sin(2 * np.pi * 190 * t) * np.exp(-t / 0.04)
    return 0.4 * np.diff(noise, prepend=0.0) * np.exp(-t / 0.015)  # hat: differentiated noise (bright)


def compose(knobs: np.ndarray, seconds: float, rng: np.random.Generator, timbre: str, drums: bool) -> dict:
    """Note events for one clip from its seven knobs (FEATURES order, each in [0, 1]).

    Returns ``{"notes": (N, 5) array of onset_s, dur_s, pitch, velocity, voice, "hits": [(drum, onsets_s)],
    "tonic": pitch class, "minor_bars": bool per bar, "beat": s}``; voice is MELODY, CHORD or CLASH.
    """
    mel, art, rcx, rst, dis, ton, mnr = (float(v) for v in knobs)
    beat = 60.0 / rng.uniform(80, 132)
    n_beats = int(seconds / beat) + 8
    n_bars = n_beats // 4 + 1
    tonic = int(rng.integers(0, 12))
    minor = np.zeros(n_bars, dtype=bool)
    minor[rng.choice(n_bars, int(round(mnr * n_bars)), replace=False)] = True
    modulate = rng.random(n_bars) < 0.8 * (1 - ton)
    pedal = rng.random(n_bars) < ton  # a tonic pedal in the bass anchors the key
    key = np.cumsum(np.where(modulate, rng.choice([-6, -3, -2, -1, 1, 2, 3, 6], n_bars), 0))
    key[0] = 0
    progression = PROGRESSIONS[int(rng.integers(len(PROGRESSIONS)))]
    # Beats -> seconds: tempo drift and onset jitter (melody, chords and drums apart) grow as stability falls.
    periods, phases = rng.uniform(6, 12, 2), rng.uniform(0, 2 * np.pi, 2)
    drift = 0.35 * (1 - rst)  # slope of the wobble stays < 1: time never runs backwards
    jitter = 0.12 * (1 - rst)

    def warp(b: np.ndarray) -> np.ndarray:
        wobble = sum(np.sin(2 * np.pi * b / p + f) - np.sin(f) for p, f in zip(periods, phases, strict=True))
        return beat * (b + drift * wobble)

    def onsets(b: np.ndarray) -> np.ndarray:  # notes struck together (a chord) share their jitter
        grid, which = np.unique(b, return_inverse=True)
        shift = beat * np.clip(rng.normal(0, jitter, len(grid)), -0.3, 0.3)
        return np.maximum(warp(b) + shift[which], 0.0)

    def pitch_of(bar: int, degree: np.ndarray) -> np.ndarray:
        scale = MINOR if minor[bar] else MAJOR
        return tonic + key[bar] + 12 * (degree // 7) + scale[degree % 7]

    notes = []  # (onset_beat, dur_beat, pitch, velocity, voice)
    lo, hi = MELODY_RANGE[timbre]
    base_value = float(rng.choice([0.5, 1.0]))
    b, degree = 0.0, int(7 * ((lo + hi) / 2 - tonic) // 12)  # start near the middle of the range
    while b < n_beats:
        value = float(rng.choice([0.25, 0.5, 0.75, 1.5, 2.0])) if rng.random() < rcx else base_value
        if rng.random() < mel:
            degree += int(rng.choice([-2, -1, -1, 0, 1, 1, 2]))
        else:
            degree += int(rng.choice([-1, 1]) * rng.integers(4, 13))
        bar = min(int(b // 4), n_bars - 1)
        p = int(pitch_of(bar, np.array(degree)))
        while p < lo or p > hi:  # fold back into the range
            degree += -7 if p > hi else 7
            p = int(pitch_of(bar, np.array(degree)))
        if rng.random() < 0.6 * (1 - ton):
            p += int(rng.choice([-1, 1]))
        vel = rng.uniform(0.75, 1.0) * (0.55 + 0.45 * mel)  # a clear melody stands out
        if rng.random() < 0.3 * (1 - mel):  # an unmelodic line is also fragmented
            b += value
            continue
        notes.append((b, value, p, vel, MELODY))
        if rng.random() < 0.7 * dis:  # a clashing second voice: minor second, tritone or major seventh below
            notes.append((b, value, p - int(rng.choice([1, 6, 11])), 0.7 * vel, CLASH))
        b += value
    simple, complex_ = (
        (0.0, 2.0),
        [(0.0, 1.5, 3.0), (0.0, 0.75, 2.5), (0.5, 1.5, 2.75), (0.0, 1.0, 1.75, 3.5)],
    )
    for bar in range(n_bars):
        triad = pitch_of(bar, progression[bar % 4] + np.array([0, 2, 4]))
        root = int(triad[0])
        if rng.random() < 0.6 * (1 - ton):
            triad = triad + int(rng.choice([-1, 1, 6]))
            root = int(triad[0])
        extras = rng.choice(
            [root + 1, root + 6, root + 11, int(triad[1]) + 1, int(triad[2]) + 1],
            rng.binomial(3, dis),
            replace=False,
        )
        voiced = lo - 7 + np.mod(np.concatenate([triad, extras]) - (lo - 7), 12)  # about the melody's bottom
        hits = complex_[int(rng.integers(len(complex_)))] if rng.random() < rcx else simple
        ends = [*hits[1:], 4.0]
        for h, e in zip(hits, ends, strict=True):
            for q in voiced:
                notes.append((4 * bar + h, e - h, int(q), 0.4 / np.sqrt(len(voiced) + 1), CHORD))
        # The bass: a steady pulse on every beat in a share `rst` of the bars, else one long note.
        bass = lo - 19 + ((tonic if pedal[bar] else root) - (lo - 19)) % 12
        pulse = rng.random() < rst
        for h in range(4) if pulse else (0,):
            notes.append((4 * bar + h, 1.0 if pulse else 4.0, bass, 0.35, CHORD))
    ev = np.array(notes, dtype=np.float64)
    start = np.zeros(len(ev))
    for group in (ev[:, 4] != CHORD, ev[:, 4] == CHORD):
        start[group] = onsets(ev[group, 0])
    gate = 1.0 - 0.85 * art
    dur = np.maximum((warp(ev[:, 0] + ev[:, 1]) - warp(ev[:, 0])) * gate, 0.05)
    hits: list[tuple[str, np.ndarray]] = []
    if drums:
        grid = np.arange(0, n_beats, 0.25)
        pos = np.mod(grid, 4)
        extra = rng.random((3, len(grid))) < 0.3 * rcx
        keep = rng.random((3, len(grid))) > 0.3 * rcx
        kick = (np.isin(pos, [0.0, 2.0]) & keep[0]) | extra[0]
        snare = (np.isin(pos, [1.0, 3.0]) & keep[1]) | (extra[1] & ~kick)
        hat = (np.mod(pos, 0.5) == 0) & keep[2] | extra[2]
        hits = [(k, onsets(grid[m])) for k, m in (("kick", kick), ("snare", snare), ("hat", hat))]
    notes_s = np.column_stack([start, dur, ev[:, 2:]])
    keep_notes = notes_s[:, 0] < seconds
    return {"notes": notes_s[keep_notes], "hits": hits, "tonic": tonic, "minor_bars": minor, "beat": beat}


def render(
    score: dict, timbre: str, n_samples: int, bank: ToneBank, rng: np.random.Generator, pan: bool = False
) -> np.ndarray:
    """Mix ``score`` into a (n_samples,) float32 buffer, or (n_samples, 2) when ``pan`` (piano: low left)."""
    out = np.zeros((n_samples, 2 if pan else 1), dtype=np.float32)
    rel = int(RELEASE_S[timbre] * SR)
    fade = _raised_cos(rel)[::-1]
    for onset, dur, pitch, vel, _ in score["notes"]:
        i0 = int(onset * SR)
        tone = bank.get(timbre, int(pitch))
        n = min(int(dur * SR), len(tone) - rel)
        seg = tone[: n + rel] * np.float32(vel)
        seg[n:] *= fade[: len(seg) - n]
        seg = seg[: max(n_samples - i0, 0)]
        gains = [1.0]
        if pan:
            theta = (0.2 + 0.6 * np.clip((pitch - 21) / 88, 0, 1)) * np.pi / 2
            gains = [np.cos(theta), np.sin(theta)]
        for c, g in enumerate(gains):
            out[i0 : i0 + len(seg), c] += g * seg
    for kind, times in score["hits"]:
        sample = _drum(kind, rng).astype(np.float32) * 0.5
        for t0 in times:
            i0 = int(t0 * SR)
            if 0 <= i0 < n_samples:
                seg = sample[: n_samples - i0] * np.float32(rng.uniform(0.7, 1.0))
                out[i0 : i0 + len(seg)] += seg[:, None]
    out /= max(float(np.abs(out).max()), 1e-6) / 0.8
    return out if pan else out[:, 0]
