"""Turn one index item (a Mid-level clip or a MAESTRO performance) into shard rows. Pure numpy, no Ray.

A row follows the shard schema (README, data contract): clip_id, dataset, domain, split, group, offset_s, audio (int16
[330750]) and labels (7 floats on the 1..10 scale, or None).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mdlda.audio import AudioError, fit_clip, load, stream_segments, to_pcm16
from mdlda.manifest import row_digest
from mdlda.params import MAX_PAD_SECONDS, SAMPLE_RATE, SEGMENT_SAMPLES

COLUMNS = ("clip_id", "dataset", "domain", "split", "group", "offset_s", "audio", "labels")


@dataclass
class ItemResult:
    """What decoding one index item gave: rows, or the reason it was skipped."""

    item: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None
    fitting: str | None = None  # Mid-level: exact / cropped / padded
    warning: str | None = None  # rows were written, but fewer than the index expected (a truncated file)


def _row(item: dict, clip_id: str, offset_s: float, pcm: np.ndarray) -> dict[str, Any]:
    labels = item.get("labels")
    labels = None if labels is None else np.asarray(labels, dtype=np.float32)
    return {
        "clip_id": clip_id,
        "dataset": item["dataset"],
        "domain": item["domain"],
        "split": item["split"],
        "group": item["group"],
        "offset_s": np.float32(offset_s),
        "audio": pcm,
        "labels": labels,
        "digest": row_digest(clip_id, item["split"], labels, pcm.tobytes()),
    }


def _fewer_segments(item: dict, got: int) -> str | None:
    """A MAESTRO performance that decodes to fewer segments than its CSV duration implies: a truncated file (or a
    wrong duration). Its rows are kept; the shortfall is reported as a counted warning in the manifest."""
    expected = item.get("expected_segments")
    if expected is None or got >= int(expected):
        return None
    return (
        f"{item['path']}: decoded to {got} of the {int(expected)} segments its CSV duration "
        f"({float(item.get('duration', 0.0)):.1f} s) implies ({got * SEGMENT_SAMPLES / SAMPLE_RATE:.0f}+ s of audio): "
        "the file looks truncated; the segments it has were kept"
    )


def decode_item(item: dict, max_pad_s: float = MAX_PAD_SECONDS) -> ItemResult:
    """Decode one index row. Mid-level: one cropped/padded segment; MAESTRO: every full 15-s segment.

    Never raises for bad audio: the failure comes back in ``ItemResult.error`` with the file named.
    """
    from mdlda.datasets.maestro import segment_id

    result = ItemResult(item=str(item["clip_id"]))
    try:
        if item["dataset"] == "maestro":
            for i, seg in stream_segments(item["path"]):
                result.rows.append(
                    _row(item, segment_id(item["clip_id"], i), i * SEGMENT_SAMPLES / SAMPLE_RATE, to_pcm16(seg))
                )
            if not result.rows:
                raise AudioError(f"{item['path']}: shorter than one {SEGMENT_SAMPLES / SAMPLE_RATE:.0f}-s segment")
            result.warning = _fewer_segments(item, len(result.rows))
        else:
            x = load(item["path"])
            try:
                seg, result.fitting = fit_clip(x, max_pad_s)
            except AudioError as exc:
                raise AudioError(f"{item['path']}: {exc}") from exc
            result.rows.append(_row(item, str(item["clip_id"]), 0.0, to_pcm16(seg)))
    except AudioError as exc:
        result.rows, result.error = [], str(exc)
    except Exception as exc:  # an unexpected decoder failure is still a reported skip, never a lost batch
        result.rows, result.error = [], f"{item['path']}: {type(exc).__name__}: {exc}"
    return result
