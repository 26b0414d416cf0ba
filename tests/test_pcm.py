"""The shards' audio column (mdlda/pcm.py): raw little-endian int16 PCM in a fixed-size binary column."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mdlda.params import SEGMENT_BYTES, AudioParamsMismatch, OldShardLayout, audio_params, check_audio_params
from mdlda.pcm import AUDIO_TYPE, SCHEMA_KEY, check_schema, from_column, numpy_batch, to_column, with_metadata


def _pcm(n: int = 3, k: int = 16) -> np.ndarray:
    return (np.arange(n * k, dtype=np.int16) * 997 - 20_000).reshape(n, k)


def test_the_column_is_the_arrays_own_little_endian_bytes_both_ways():
    x = _pcm()
    col = to_column(x)
    assert col.type == pa.binary(32) and len(col) == 3
    assert col.buffers()[1].to_pybytes() == x.astype("<i2").tobytes()  # raw PCM, nothing else
    back = from_column(col)
    assert back.dtype == np.dtype("<i2") and np.array_equal(back, x)
    assert np.shares_memory(back, x)  # no copy written, none read
    assert np.array_equal(from_column(col.slice(1, 2)), x[1:])  # a slice's offset is honoured
    big_endian = x.astype(">i2")
    assert np.array_equal(from_column(to_column(big_endian)), x)  # stored little-endian whatever it came as


def test_a_parquet_file_keeps_the_type_and_the_audio_parameters(tmp_path):
    x = np.zeros((2, SEGMENT_BYTES // 2), dtype=np.int16)
    x[:, ::1000] = 1234
    table = with_metadata(pa.table({"clip_id": ["a", "b"], "audio": to_column(x)}))
    pq.write_table(table, tmp_path / "f.parquet", compression="none")
    schema = pq.read_schema(tmp_path / "f.parquet")
    assert schema.field("audio").type == AUDIO_TYPE  # fixed_size_binary[661500]
    assert json.loads(schema.metadata[SCHEMA_KEY]) == audio_params()
    check_schema(schema, "f.parquet")  # ours: accepted
    batch = numpy_batch(pq.read_table(tmp_path / "f.parquet"))
    assert batch["audio"].shape == x.shape and np.array_equal(batch["audio"], x)
    assert list(batch["clip_id"]) == ["a", "b"]


def test_the_old_list_layout_is_refused_with_the_command_that_rewrites_it():
    n, k = 2, SEGMENT_BYTES // 2
    offsets = pa.array(np.arange(0, (n + 1) * k, k, dtype=np.int64))
    old = pa.LargeListArray.from_arrays(offsets, pa.array(np.zeros(n * k, np.int16)))
    with pytest.raises(OldShardLayout, match=r"(?i)rerun `mdlda prepare`"):
        check_schema(pa.schema([("audio", old.type)]), "old.parquet")
    with pytest.raises(OldShardLayout, match="(?i)rerun `mdlda prepare`"):
        from_column(old)
    without_metadata = pa.schema([("audio", AUDIO_TYPE)])
    with pytest.raises(OldShardLayout, match="no mdlda audio metadata"):
        check_schema(without_metadata, "bare.parquet")
    old_manifest = {k: v for k, v in audio_params().items() if k not in ("layout", "segment_bytes")}
    with pytest.raises(OldShardLayout, match=r"old layout.*Rerun `mdlda prepare` \(with --overwrite"):
        check_audio_params(old_manifest, "shards/midlevel")
    assert issubclass(OldShardLayout, AudioParamsMismatch)  # callers that refuse other parameters refuse it too


def test_labels_come_out_as_a_float_matrix_and_nulls_stay_objects():
    labels = pa.array([[1.0] * 7, [2.5] * 7], type=pa.list_(pa.float32()))
    b = numpy_batch(pa.table({"audio": to_column(_pcm(2)), "labels": labels}))
    assert b["labels"].shape == (2, 7) and b["labels"].dtype == np.float32 and b["labels"][1, 0] == 2.5
    with_null = pa.array([[1.0] * 7, None], type=pa.list_(pa.float32()))
    assert numpy_batch(pa.table({"labels": with_null}))["labels"].dtype == object
