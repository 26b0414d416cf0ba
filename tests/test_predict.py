"""Windowing whole recordings and averaging over time (no Ray; a tiny real model stands in for a served one)."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from mdlda.audio import AudioError
from mdlda.params import FEATURES, SAMPLE_RATE, SEGMENT_SAMPLES
from mdlda.predict import predict_recording, time_average, window_starts, windows


def test_window_starts_cover_the_tail_without_padding():
    seg = SEGMENT_SAMPLES
    assert window_starts(seg, seg) == [0]
    assert window_starts(2 * seg, seg) == [0, seg]
    n = 2 * seg + 1000
    assert window_starts(n, seg) == [0, seg, n - seg]  # last window aligned to the end
    assert window_starts(n, seg // 2)[-1] == n - seg
    assert all(s + seg <= n for s in window_starts(n, seg // 3))


def test_short_audio_is_padded_above_the_minimum_and_refused_below():
    starts, w = windows(np.ones(SAMPLE_RATE * 6, np.float32), 15.0, min_seconds=5.0)
    assert starts == [0] and w.shape == (1, SEGMENT_SAMPLES) and w[0, -1] == 0 and w[0, 0] == 1
    with pytest.raises(AudioError, match="shorter than the 5 s minimum"):
        windows(np.ones(SAMPLE_RATE * 2, np.float32), 15.0, min_seconds=5.0, name="x.wav")


def test_predict_recording_any_rate_and_time_average(tmp_path):
    import torch

    from mdlda.models import create_model
    from mdlda.tracking import RatingModel

    model = RatingModel(create_model("rfresnet", width=4)).eval()
    sr = 44_100
    t = np.arange(int(sr * 40)) / sr  # 40 s, stereo, 44.1 kHz: 3 windows (0, 15, 25)
    x = 0.2 * np.sin(2 * np.pi * 440 * t)
    path = tmp_path / "piece.flac"
    sf.write(path, np.stack([x, x], 1), sr)
    frame = predict_recording(model, path, hop_s=15.0, batch_size=2)
    assert list(frame.start_s.round(2)) == [0.0, 15.0, 25.0]
    assert list(frame.columns[3:]) == list(FEATURES) and np.isfinite(frame[list(FEATURES)].to_numpy()).all()
    avg = time_average(frame)
    # weights: 15 s, 15 s and the 10 s of new audio the last window adds
    expect = np.average(frame[FEATURES[0]], weights=[15, 15, 10])
    assert avg[FEATURES[0]].iloc[0] == pytest.approx(expect, rel=1e-6)
    with torch.no_grad():  # batching does not change results
        one = predict_recording(model, path, hop_s=15.0, batch_size=1)
    assert np.allclose(one[list(FEATURES)], frame[list(FEATURES)], atol=1e-4)


def test_unreadable_file_is_named(tmp_path):
    bad = tmp_path / "broken.mp3"
    bad.write_bytes(b"not audio at all" * 100)
    with pytest.raises(AudioError, match="broken.mp3"):
        predict_recording(lambda a: a[:, :7], bad)


@pytest.mark.parametrize(
    "n_s, hop_s, block_s",
    [(6.0, 15.0, 2.0), (15.0, 15.0, 4.0), (47.3, 15.0, 10.0), (47.3, 4.0, 3.0), (61.0, 40.0, 7.0), (33.0, 1.0, 15.0)],
)
def test_streamed_windows_are_the_windows_of_the_whole_recording(n_s, hop_s, block_s):
    """stream_windows over blocks gives exactly windows() of the whole array: same starts, same samples."""
    from mdlda.predict import stream_windows

    x = np.random.default_rng(0).standard_normal(int(n_s * SAMPLE_RATE)).astype(np.float32)
    starts, w = windows(x, hop_s, min_seconds=5.0)
    b = int(block_s * SAMPLE_RATE)
    got = list(stream_windows((x[i : i + b] for i in range(0, len(x), b)), hop_s, 5.0))
    assert [s for s, _, _ in got] == starts and got[-1][2] == len(x)
    assert np.array_equal(np.stack([g for _, g, _ in got]), w)


def test_streamed_predictions_match_the_whole_file_path(tmp_path):
    """predict_recording (streaming) gives the numbers of decoding the whole file and stacking its windows."""
    import torch

    from mdlda.audio import load
    from mdlda.models import create_model
    from mdlda.tracking import RatingModel

    torch.manual_seed(0)
    model = RatingModel(create_model("rfresnet", width=4)).eval()
    x = 0.3 * np.random.default_rng(1).standard_normal(int(SAMPLE_RATE * 52)).astype(np.float32)
    path = tmp_path / "take.wav"
    sf.write(path, x, SAMPLE_RATE, subtype="FLOAT")
    frame = predict_recording(model, path, hop_s=7.0, batch_size=3)
    starts, w = windows(load(path), 7.0, 5.0)
    with torch.no_grad():
        whole = model(torch.from_numpy(w)).numpy()
    assert list(frame.start_s * SAMPLE_RATE) == starts
    assert np.allclose(frame[list(FEATURES)].to_numpy(), whole, atol=1e-5)


@pytest.mark.parametrize("batch_size", [0, -1])
def test_a_batch_size_below_one_is_a_clear_error(tmp_path, batch_size):
    with pytest.raises(ValueError, match="batch size must be >= 1"):
        predict_recording(lambda a: a[:, :7], tmp_path / "x.wav", batch_size=batch_size)
