"""Tests of the spectrogram front end (mdlda/frontend.py)."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch

from mdlda import audio as mdlda_audio
from mdlda.frontend import Frontend, FrontendConfig, log_filterbank, standardization_stats
from mdlda.params import PCM_SCALE, SAMPLE_RATE, SEGMENT_SAMPLES

HOP = 704
FRAME = 2048


@pytest.fixture(scope="module")
def frontend() -> Frontend:
    return Frontend()


def _sines(freqs, amps, sr: int, seconds: float, phases=None) -> np.ndarray:
    t = np.arange(int(round(sr * seconds))) / sr
    phases = np.zeros(len(freqs)) if phases is None else phases
    x = sum(a * np.sin(2 * np.pi * f * t + p) for f, a, p in zip(freqs, amps, phases, strict=True))
    return np.asarray(x, dtype=np.float64)


# --- filterbank -------------------------------------------------------------------------------------------


def test_filterbank_matches_reference_layout():
    weights, centres = log_filterbank(FrontendConfig())
    assert weights.shape == (1024, 149) and weights.dtype == np.float32
    assert centres.shape == (149,)
    assert centres[0] == pytest.approx(32.3, abs=0.1)
    assert centres[-1] == pytest.approx(10852.7, abs=0.1)
    assert np.all(np.diff(centres) > 0)
    # each centre is an FFT bin frequency k * sr / 2048 and the filter peaks there
    k = np.round(centres * FRAME / SAMPLE_RATE).astype(int)
    np.testing.assert_allclose(k * SAMPLE_RATE / FRAME, centres)
    np.testing.assert_array_equal(weights.argmax(axis=0), k)


def test_filters_sum_to_one_and_are_unique():
    weights, _ = log_filterbank(FrontendConfig())
    np.testing.assert_allclose(weights.sum(axis=0), 1.0, atol=1e-6)
    assert (weights >= 0).all()
    assert len(np.unique(weights.T, axis=0)) == weights.shape[1]
    # overlapping triangles: each filter ends where its neighbours' centres are (zero weight there)
    support = [np.flatnonzero(weights[:, b]) for b in range(weights.shape[1])]
    peaks = weights.argmax(axis=0)
    for b in range(1, weights.shape[1] - 1):
        assert support[b][0] == peaks[b - 1] + 1 and support[b][-1] == peaks[b + 1] - 1


def test_without_unique_filters_there_are_duplicates():
    # at 24 bands/octave, low frequencies are finer than the 10.8 Hz bins: merging them is what gives 149
    _, centres = log_filterbank(FrontendConfig(unique_filters=False))
    assert len(centres) > 149 and len(np.unique(centres)) < len(centres)


def test_config_round_trip_and_unknown_keys():
    cfg = FrontendConfig(hop_size=512)
    assert FrontendConfig.from_dict(cfg.to_dict()) == cfg
    assert FrontendConfig.from_dict({}) == FrontendConfig()
    with pytest.raises(ValueError, match="hop_sizee"):
        FrontendConfig.from_dict({"hop_sizee": 512})
    with pytest.raises(ValueError):
        FrontendConfig(fmin=100.0, fmax=50.0)


# --- spectrogram --------------------------------------------------------------------------------------------


def test_segment_shape(frontend):
    x = torch.randn(2, SEGMENT_SAMPLES) * 0.1
    out = frontend(x)
    assert frontend.num_bands == 149
    assert frontend.num_frames(SEGMENT_SAMPLES) == 469
    assert out.shape == (2, 1, 149, 469) and out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_stft_frames_match_numpy(frontend):
    """Frame t is np.hanning(2048) * x[t*hop - 1024 : t*hop + 1024] (zeros outside), rfft, |.|, 1024 bins."""
    rng = np.random.default_rng(0)
    n = 20 * HOP + 300
    x = rng.uniform(-1, 1, n).astype(np.float32)
    mag = frontend.magnitude(torch.from_numpy(x)[None])[0].double().numpy()  # (1024, 20)
    assert mag.shape == (1024, n // HOP)
    padded = np.concatenate([np.zeros(FRAME // 2), x.astype(np.float64), np.zeros(FRAME // 2)])
    fb = frontend.filterbank.double().numpy()
    for t in (0, 1, 7, n // HOP - 1):  # edge frames check the zero padding, middle ones the offsets
        frame = padded[t * HOP : t * HOP + FRAME] * np.hanning(FRAME)
        ref = np.abs(np.fft.rfft(frame))[:1024]
        np.testing.assert_allclose(mag[:, t], ref, rtol=1e-4, atol=1e-3)
        log_ref = np.log10(1 + ref @ fb)
        spec = frontend.spectrogram(torch.from_numpy(x)[None])[0, :, t].double().numpy()
        np.testing.assert_allclose(spec, log_ref, atol=1e-5)


@pytest.mark.parametrize("freq", [110.0, 440.0, 1000.0, 3000.0, 6000.0])
def test_sine_lands_in_nearest_band(frontend, freq):
    x = 0.5 * _sines([freq], [1.0], SAMPLE_RATE, 2.0)
    spec = frontend.spectrogram(torch.from_numpy(x).float()[None])[0]  # (149, T)
    band = int(spec.mean(dim=1).argmax())
    nearest = int(np.argmin(np.abs(frontend.center_frequencies - freq)))
    assert band == nearest, (freq, frontend.center_frequencies[band], frontend.center_frequencies[nearest])


def test_silence_is_the_floor(frontend):
    spec = frontend.spectrogram(torch.zeros(1, 5 * HOP))
    assert torch.equal(spec, torch.zeros(1, 149, 5))
    pcm = frontend.spectrogram(torch.zeros(1, 5 * HOP, dtype=torch.int16))
    assert torch.equal(pcm, spec)


def test_int16_input_is_scaled(frontend):
    x = (0.3 * _sines([440.0, 1500.0], [1.0, 0.5], SAMPLE_RATE, 1.0)).astype(np.float32)
    pcm = mdlda_audio.to_pcm16(x)
    from_pcm = frontend(torch.from_numpy(pcm)[None])
    from_float = frontend(torch.from_numpy(pcm.astype(np.float32) / PCM_SCALE)[None])
    torch.testing.assert_close(from_pcm, from_float)


def test_resampled_stereo_wav_matches_direct_mono(tmp_path, frontend):
    """A 44.1 kHz stereo WAV, decoded and soxr-resampled by mdlda.audio.load, gives the features of the same
    signal sampled directly at 22.05 kHz.

    The signal is analytic (a chord + 'noise' made of 300 quiet random sines below 9 kHz, with 50-ms fades),
    so both versions sample the same continuous waveform. What differs is soxr's passband ripple and stopband
    leakage (HQ: tiny, and everything here is inside its passband), the 16-bit quantisation of the WAV
    (~ -95 dBFS) and float32 rounding. On log10(1 + x) features ranging 0..1.8, interior frames differ by
    ~2e-4 (measured; 1e-6 with a float WAV, so the 16-bit quantisation dominates): we allow 1e-3. The first
    and last 3 frames (windows reaching the signal's ends) also see soxr's edge transient: measured 1.6e-3,
    allowed 5e-3. A half-hop framing shift changes these features by ~0.6, a wrong band or window by far more.
    """
    rng = np.random.default_rng(1)
    seconds = 4.0
    freqs = np.concatenate([[220.0, 277.18, 329.63, 440.0, 1318.5], rng.uniform(50.0, 9000.0, 300)])
    amps = np.concatenate([[0.15, 0.12, 0.12, 0.1, 0.05], np.full(300, 0.002)])
    phases = rng.uniform(0, 2 * np.pi, len(freqs))

    def faded(sr: int) -> np.ndarray:
        x = _sines(freqs, amps, sr, seconds, phases)
        n_fade = int(0.05 * sr)
        ramp = 0.5 - 0.5 * np.cos(np.linspace(0, np.pi, n_fade))
        x[:n_fade] *= ramp
        x[-n_fade:] *= ramp[::-1]
        return x

    hi = faded(44_100)
    assert np.abs(hi).max() < 0.9
    path = tmp_path / "chord.wav"
    sf.write(path, np.stack([hi, hi], axis=1), 44_100, subtype="PCM_16")
    decoded = mdlda_audio.load(path)
    direct = faded(SAMPLE_RATE).astype(np.float32)
    assert decoded.dtype == np.float32 and decoded.shape == direct.shape

    spec_file = frontend.spectrogram(torch.from_numpy(decoded)[None])[0]  # (149, T)
    spec_direct = frontend.spectrogram(torch.from_numpy(direct)[None])[0]
    assert spec_direct.max() > 0.5  # the comparison is not between near-silences
    diff = (spec_file - spec_direct).abs()  # (149, T)
    assert diff[:, 3:-3].max().item() < 1e-3, diff[:, 3:-3].max().item()
    assert diff.max().item() < 5e-3, diff.max().item()


# --- standardisation ---------------------------------------------------------------------------------------


def test_standardization_buffers(frontend):
    fe = Frontend()
    keys = set(fe.state_dict())
    assert keys == {"mean", "std"}
    assert {name for name, _ in fe.named_buffers()} == {"mean", "std", "window", "filterbank"}
    x = torch.randn(1, 10 * HOP) * 0.2
    spec = fe.spectrogram(x)  # (1, 149, 10)
    torch.testing.assert_close(fe(x)[:, 0], spec)  # init: mean 0, std 1
    mean = torch.linspace(0.0, 1.0, 149)
    std = torch.linspace(0.5, 2.0, 149)
    fe.set_standardization(mean, std.numpy())
    torch.testing.assert_close(fe(x)[:, 0], (spec - mean[:, None]) / std[:, None])
    fe2 = Frontend()
    fe2.load_state_dict(fe.state_dict())  # weights_only-style round trip
    torch.testing.assert_close(fe2(x), fe(x))


def test_set_standardization_validates():
    fe = Frontend()
    with pytest.raises(ValueError, match="shape"):
        fe.set_standardization(torch.zeros(148), torch.ones(148))
    with pytest.raises(ValueError, match="NaN"):
        fe.set_standardization(torch.full((149,), float("nan")), torch.ones(149))
    with pytest.raises(ValueError, match="> 0"):
        fe.set_standardization(torch.zeros(149), torch.zeros(149))
    fe.set_standardization(np.zeros(149), np.full(149, 1e-9))
    assert torch.all(fe.std == 1e-5)


def test_standardization_stats_match_numpy(frontend):
    rng = np.random.default_rng(2)
    batches = [
        torch.from_numpy(rng.normal(0, s, (b, n)).astype(np.float32))
        for s, b, n in [(0.05, 2, 6 * HOP), (0.3, 1, 9 * HOP + 100), (0.01, 3, 4 * HOP)]
    ]
    mean, std = standardization_stats(frontend, iter(batches))  # a one-pass iterator is enough
    assert mean.shape == std.shape == (149,)
    specs = [frontend.spectrogram(b).double().numpy() for b in batches]  # (B, 149, T) each
    flat = np.concatenate([s.transpose(1, 0, 2).reshape(149, -1) for s in specs], axis=1)  # (149, frames)
    np.testing.assert_allclose(mean.numpy(), flat.mean(axis=1), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(std.numpy(), flat.std(axis=1), rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError):
        standardization_stats(frontend, [])


def test_autocast_keeps_fp32(frontend):
    fe = Frontend()
    fe.set_standardization(torch.full((149,), 0.3), torch.full((149,), 0.7))
    x = torch.randn(2, 12 * HOP) * 0.2
    ref = fe(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fe(x.bfloat16())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, fe(x.bfloat16().float()), rtol=0, atol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out32 = fe(x)
    torch.testing.assert_close(out32, ref, rtol=0, atol=0)


def test_bands_without_training_energy_are_centred_not_scaled():
    from mdlda.frontend import floored_std

    std = np.array([0.3, 0.25, 0.2, 0.28, 0.03, 0.001, 0.0])  # median 0.2: 10% of it is 0.02
    out = floored_std(std, 0.1)
    assert out.tolist() == [0.3, 0.25, 0.2, 0.28, 0.03, 1.0, 1.0]
    assert floored_std(std, 0.0).tolist() == [0.3, 0.25, 0.2, 0.28, 0.03, 0.001, 1.0]  # only the 1e-4 rule
    assert floored_std(std, 0.5)[4] == 1.0


def test_spectrogram_masks_only_in_training_and_within_their_widths():
    torch.manual_seed(0)
    audio = torch.randn(4, SEGMENT_SAMPLES) * 0.1
    noised = Frontend(FrontendConfig(freq_mask=10, time_mask=30, masks=2))
    clean = Frontend()(audio)
    assert torch.equal(noised.eval()(audio), clean)  # evaluation, pseudo-labels and serving: never masked
    out = noised.train()(audio)[:, 0]  # (B, 149, T)
    changed = out != clean[:, 0]
    assert torch.all(out[changed] == 0)  # masked values are the training mean, everything else untouched
    bands = changed.all(dim=2).sum(dim=1)  # whole bands masked per segment
    frames = changed.all(dim=1).sum(dim=1)  # whole frames masked per segment
    assert bands.max() <= 2 * 10 and frames.max() <= 2 * 30
    assert changed.any(dim=(1, 2)).sum() >= 3  # a 0-wide draw is possible, but not for 3 of 4 segments twice
    # every changed value lies in a masked band or frame: masks are whole bands and whole frames
    assert torch.equal(changed, changed.all(dim=2, keepdim=True) | changed.all(dim=1, keepdim=True))
    with pytest.raises(ValueError, match="freq_mask and time_mask must be >= 0"):
        FrontendConfig(freq_mask=-1)
