"""The audio parameters and label order, in one place.

Every shard manifest records :func:`audio_params`; a shard whose parameters differ from these is refused
(see :func:`check_audio_params`). The front end's own parameters travel inside the model instead.
"""

from __future__ import annotations

import math
from typing import Any

SAMPLE_RATE = 22_050
SEGMENT_SECONDS = 15.0
SEGMENT_SAMPLES = int(SAMPLE_RATE * SEGMENT_SECONDS)  # 330_750
# A Mid-level clip at most this much shorter than a segment is zero-padded; a shorter one is a reported skip.
MAX_PAD_SECONDS = 1.0
PCM_SCALE = 32_767.0  # float [-1, 1] <-> int16
# How a segment is stored in the shards' `audio` column (mdlda/pcm.py): raw little-endian int16 PCM, one
# fixed-size binary value of SEGMENT_BYTES per row.
AUDIO_LAYOUT = "pcm_s16le/fixed_size_binary"
SEGMENT_BYTES = 2 * SEGMENT_SAMPLES  # 661_500

FEATURES: tuple[str, ...] = (
    "melodiousness",
    "articulation",
    "rhythm_complexity",
    "rhythm_stability",
    "dissonance",
    "tonal_stability",
    "minorness",
)
NUM_FEATURES = len(FEATURES)
RATING_MIN, RATING_MAX = 1.0, 10.0
# Labels are ratings / LABEL_SCALE inside the model's contract (0..1); reports use the 1..10 scale.
LABEL_SCALE = 10.0


def audio_params() -> dict[str, Any]:
    """The parameters every shard is written with (recorded in its manifest)."""
    return {
        "sample_rate": SAMPLE_RATE,
        "segment_seconds": SEGMENT_SECONDS,
        "segment_samples": SEGMENT_SAMPLES,
        "channels": 1,
        "pcm": "int16",
        "layout": AUDIO_LAYOUT,
        "segment_bytes": SEGMENT_BYTES,
        "features": list(FEATURES),
    }


class AudioParamsMismatch(ValueError):
    """Shards were made with audio parameters that differ from the code's."""


class OldShardLayout(AudioParamsMismatch):
    """Shards store audio in a layout this code no longer reads (the ``large_list<int16>`` column)."""


def check_audio_params(found: dict[str, Any], where: str) -> None:
    """Raise :class:`AudioParamsMismatch` naming every differing parameter of ``found`` (from ``where``)."""
    expected = audio_params()
    if found.get("layout") != AUDIO_LAYOUT:
        raise OldShardLayout(
            f"{where} stores its audio as {found.get('layout') or 'a list<int16> tensor column (the old layout)'}; "
            f"this mdlda reads raw little-endian int16 PCM in a fixed-size binary column ({AUDIO_LAYOUT}, "
            f"{SEGMENT_BYTES} bytes a segment). Rerun `mdlda prepare` (with --overwrite to rewrite the same folder)."
        )
    diffs = []
    for key, want in expected.items():
        got = found.get(key)
        same = (isinstance(want, float) and isinstance(got, int | float) and math.isclose(want, got)) or got == want
        if not same:
            diffs.append(f"{key}: shards have {got!r}, this code uses {want!r}")
    if diffs:
        raise AudioParamsMismatch(
            f"{where} was written with other audio parameters ({'; '.join(diffs)}). "
            "Re-run `mdlda prepare` into a new folder with this version of mdlda; shards are never mixed."
        )
