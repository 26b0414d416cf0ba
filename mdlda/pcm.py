"""The shards' ``audio`` column: raw little-endian int16 PCM, one fixed-size binary value per segment.

A segment is ``SEGMENT_SAMPLES`` samples = ``SEGMENT_BYTES`` bytes (661,500 for 15 s at 22.05 kHz). Writing is
a view of the ``(B, N)`` int16 array's memory as an Arrow ``fixed_size_binary`` column; reading is
``np.frombuffer`` over the column's one data buffer, reshaped to ``(B, N)``: no copy either way. Ray's tensor
column (an Arrow ``large_list<int16>``) is not used because Parquet stores a repetition and a definition level per
sample of it, which every read has to decode; shards in that layout are refused (:func:`check_schema`) with the
command that rewrites them.

The audio parameters are also in every Parquet file's schema metadata (key :data:`SCHEMA_KEY`), so a file read
without its manifest still says what its bytes are.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pyarrow as pa

from mdlda.params import AUDIO_LAYOUT, SEGMENT_BYTES, SEGMENT_SAMPLES, OldShardLayout, audio_params

DTYPE = np.dtype("<i2")  # little-endian int16, whatever the machine's byte order
AUDIO_TYPE = pa.binary(SEGMENT_BYTES)  # fixed_size_binary[661500]
SCHEMA_KEY = b"mdlda.audio"


def to_column(x: np.ndarray) -> pa.FixedSizeBinaryArray:
    """``(B, N)`` int16 PCM -> a ``fixed_size_binary[2 N]`` column over the same memory (copies only when ``x``
    is not C-contiguous little-endian int16)."""
    x = np.ascontiguousarray(x, dtype=DTYPE)
    if x.ndim != 2:
        raise ValueError(f"PCM must be (B, N) int16; got shape {x.shape}")
    n, k = x.shape
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(2 * k), n, [None, pa.py_buffer(x)])


def from_column(col: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A fixed-size binary PCM column -> ``(B, N)`` int16, a read-only view of the column's buffer (a chunked
    column of more than one chunk is combined first, which copies)."""
    if isinstance(col, pa.ChunkedArray):
        col = col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()
    if not pa.types.is_fixed_size_binary(col.type):
        raise OldShardLayout(
            f"the audio column is {col.type}, not raw int16 PCM in a fixed-size binary column ({AUDIO_LAYOUT}): "
            "shards of an older mdlda. Rerun `mdlda prepare` (with --overwrite for the same folder)."
        )
    if col.null_count:
        raise ValueError(f"the audio column has {col.null_count} null segment(s)")
    width = col.type.byte_width
    data = col.buffers()[1]
    x = np.frombuffer(data, dtype=DTYPE, count=len(col) * width // 2, offset=col.offset * width)
    return x.reshape(len(col), width // 2)


def schema_metadata() -> dict[bytes, bytes]:
    """What every shard file's schema metadata carries: the audio parameters, as JSON."""
    return {SCHEMA_KEY: json.dumps(audio_params(), sort_keys=True).encode()}


def with_metadata(table: pa.Table) -> pa.Table:
    return table.replace_schema_metadata({**(table.schema.metadata or {}), **schema_metadata()})


def file_params(schema: pa.Schema) -> dict[str, Any] | None:
    """The audio parameters a Parquet file's schema metadata records, or None (a file of the old layout)."""
    raw = (schema.metadata or {}).get(SCHEMA_KEY)
    return None if raw is None else json.loads(raw)


def check_schema(schema: pa.Schema, where: str) -> None:
    """Refuse a shard file whose ``audio`` column is not this layout (:class:`OldShardLayout`, naming ``where``
    and the fix) or whose schema metadata lacks the audio parameters."""
    if "audio" not in schema.names:
        return  # a file without audio (none of ours; the manifest check covers the folder)
    kind = schema.field("audio").type
    if kind != AUDIO_TYPE or file_params(schema) is None:
        raise OldShardLayout(
            f"{where}: its audio column is {kind} "
            f"({'no' if file_params(schema) is None else 'with'} mdlda audio metadata), not raw little-endian int16 "
            f"PCM in a fixed-size binary column of {SEGMENT_BYTES} bytes ({SEGMENT_SAMPLES} samples). These shards "
            "were written by an older mdlda: rerun `mdlda prepare` (with --overwrite for the same folder)."
        )


def numpy_batch(table: pa.Table) -> dict[str, np.ndarray]:
    """A batch of shard rows (Arrow) -> numpy: PCM columns as ``(B, N)`` int16 views (:func:`from_column`),
    a list column of equal-length lists without nulls (``labels``) as ``(B, k)`` float32, the rest as arrays."""
    out = {}
    for name, col in zip(table.column_names, table.columns, strict=True):
        if pa.types.is_fixed_size_binary(col.type):
            out[name] = from_column(col)
        elif pa.types.is_list(col.type) and col.null_count == 0 and len(col):
            lists = col.combine_chunks()
            lengths = lists.value_lengths().to_numpy()
            if lengths.min() == lengths.max():
                values = lists.flatten().to_numpy(zero_copy_only=False)
                out[name] = values.astype(np.float32, copy=False).reshape(len(lists), int(lengths[0]))
            else:
                out[name] = col.to_numpy(zero_copy_only=False)
        else:
            out[name] = col.to_numpy(zero_copy_only=False)
    return out
