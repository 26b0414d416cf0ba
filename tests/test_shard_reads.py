"""Reading prepared shards back: Ray Data's reader (split selection, the raw-PCM column), the in-process reader over
the shard index (the same rows), and the pseudolabel stage's file selection."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from mdlda.manifest import DATA_DIR
from mdlda.params import SEGMENT_SAMPLES

pytestmark = pytest.mark.slow


def test_reader_gives_int16_segments_of_one_split(midlevel_shards):
    from mdlda.params import audio_params
    from mdlda.pcm import AUDIO_TYPE, file_params
    from pipelines.shards import numpy_batches, read_shards

    ds, manifest = read_shards(midlevel_shards.out, splits=["train"], columns=["clip_id", "audio", "labels"])
    batch = next(numpy_batches(ds, 4))
    assert batch["audio"].shape == (4, SEGMENT_SAMPLES) and batch["audio"].dtype == np.int16
    assert batch["labels"].shape == (4, 7) and batch["labels"].dtype == np.float32
    assert np.abs(batch["audio"]).max() > 100  # real audio, not zeros
    # counted on a Dataset never iterated: Ray 2.60's V1 Parquet reader (mdlda's, pipelines/raysetup.py) can count
    # only the rows a partial iteration read, after that iteration is dropped (mdlda counts materialised sets only)
    assert read_shards(midlevel_shards.out, splits=["train"])[0].count() == manifest["counts"]["train"]
    for f in (Path(midlevel_shards.out) / DATA_DIR).glob("*.parquet"):  # raw PCM, the parameters in every file
        schema = pq.read_schema(f)
        assert schema.field("audio").type == AUDIO_TYPE and file_params(schema) == audio_params()
        meta = pq.ParquetFile(f).metadata
        audio = [meta.row_group(0).column(i) for i in range(meta.num_columns)]
        audio = next(c for c in audio if c.path_in_schema == "audio")
        assert audio.physical_type == "FIXED_LEN_BYTE_ARRAY" and audio.compression == "UNCOMPRESSED"
    assert manifest["audio"] == audio_params() and manifest["audio"]["segment_bytes"] == 2 * SEGMENT_SAMPLES


def test_a_local_read_gives_ray_datas_rows_of_each_split(midlevel_shards):
    """local_rows (no Ray: evaluation splits, samples, OOD passes) holds exactly the rows Ray Data reads, in storage
    order, and refuses what read_shards refuses."""
    from mdlda.manifest import ShardError
    from pipelines.shards import local_rows, numpy_batches, read_shards

    cols = ["clip_id", "split", "audio", "labels"]
    for split in ("train", "valid", "test", "piano_test"):
        ds, manifest = read_shards(midlevel_shards.out, splits=[split], columns=cols)
        ray_rows = {}
        for b in numpy_batches(ds):
            ray_rows.update({c: (a, lab) for c, a, lab in zip(b["clip_id"], b["audio"], b["labels"], strict=True)})
        local = local_rows(midlevel_shards.out, [split], cols)
        assert len(local["clip_id"]) == manifest["counts"][split] == len(ray_rows)
        assert set(local["split"]) == {split} and local["audio"].dtype == np.int16
        for c, a, lab in zip(local["clip_id"], local["audio"], local["labels"], strict=True):
            assert np.array_equal(a, ray_rows[c][0]) and np.array_equal(lab, ray_rows[c][1])
    everything = local_rows(midlevel_shards.out)
    assert len(everything["clip_id"]) == midlevel_shards.manifest["rows"] and "audio" in everything
    with pytest.raises(ShardError, match="no rows in split"):
        local_rows(midlevel_shards.out, ["nope"])
    # a seeded sample reads only its rows: the same rows as drawing from the whole split
    from pipelines.scoring import _sample

    train = local_rows(midlevel_shards.out, ["train"], ["audio"])["audio"]
    pick = np.sort(np.random.default_rng(3).choice(len(train), 5, replace=False))
    assert np.array_equal(_sample(midlevel_shards.out, ["train"], 5, 3), train[pick])
    assert np.array_equal(_sample(midlevel_shards.out, ["train"], 10_000, 3), train)


def test_pseudolabel_reads_only_the_files_holding_its_segments(midlevel_shards):
    """choose_segments names the files that hold the chosen ids; read_shards(files=...) reads only those."""
    from mdlda.manifest import ShardError
    from pipelines.pseudolabel import choose_segments
    from pipelines.shards import local_index, read_shards

    index = local_index(midlevel_shards.out, ["train"], ["clip_id"])
    ids, files = choose_segments(midlevel_shards.out, 3, 0, ["train"])
    assert len(ids) == 3 and set(ids) <= set(index.small["clip_id"])
    holding = {index.files[k] for k, c in zip(index.file, index.small["clip_id"], strict=True) if c in ids}
    assert set(files) == holding and len(files) < len(index.files)
    ds, _ = read_shards(midlevel_shards.out, splits=["train"], columns=["clip_id", "split"], files=files)
    got = ds.to_pandas()
    in_files = {c for k, c in zip(index.file, index.small["clip_id"], strict=True) if index.files[k] in holding}
    assert set(got.clip_id) == in_files and set(got.split) == {"train"}  # every train row of those files, no more
    with pytest.raises(ShardError, match="empty file list"):
        read_shards(midlevel_shards.out, splits=["train"], files=[])
    with pytest.raises(ShardError, match="not one of this folder's data files"):
        read_shards(midlevel_shards.out, files=[*files, "/etc/passwd"])
