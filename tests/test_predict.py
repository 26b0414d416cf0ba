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
