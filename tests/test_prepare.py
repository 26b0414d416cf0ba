"""The prepare stage on a local Ray: real decoding of the generated dataset into Parquet shards."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from mdlda.manifest import DATA_DIR, MANIFEST
from mdlda.params import SEGMENT_SAMPLES, AudioParamsMismatch

pytestmark = pytest.mark.slow


def _cfg(root: Path, out: Path, **kw):
    from pipelines.prepare import PrepareConfig

    ml = root / "midlevel"
    return PrepareConfig(
        dataset="midlevel",
        root=str(ml),
        out=str(out),
        piano_ids=str(ml / "piano_ids.csv"),
        progress=False,
        **kw,
    )


def _rows(out: Path, columns=("clip_id", "split", "group", "domain", "labels")):
    return pq.read_table(out / DATA_DIR, columns=list(columns)).to_pandas()


def test_midlevel_shards_follow_the_index(midlevel_shards, demo_root):
    from mdlda.datasets import index_midlevel

    ml = demo_root / "midlevel"
    index = index_midlevel(ml, piano_ids=ml / "piano_ids.csv", seed=0)
    m = midlevel_shards.manifest
    assert m["counts"] == {k: v for k, v in index.split_sizes.items() if v}
    rows = _rows(Path(midlevel_shards.out))
    assert len(rows) == m["rows"] == len(index.table)
    assert rows.clip_id.is_unique
    # artists never cross splits
    assert rows.groupby("group").split.nunique().max() == 1
    assert set(rows[rows.split == "piano_test"].domain) == {"target"}
    assert all(len(v) == 7 and 1 <= min(v) and max(v) <= 10 for v in rows.labels)
    assert m["audio"]["segment_samples"] == SEGMENT_SAMPLES
    assert m["decoder"]["decoder"] == "libsndfile" and m["content_digest"]
    assert sum(m["clip_fitting"].values()) == m["rows"]


def _to_old_layout(folder: Path) -> None:
    """Rewrite a shard folder as an older mdlda wrote it: audio as large_list<int16>, no layout in the manifest."""
    import pyarrow as pa

    from pipelines.prepare import STATE_DIR

    for f in (folder / DATA_DIR).glob("*.parquet"):
        t = pq.read_table(f)
        pcm = np.frombuffer(t.column("audio").combine_chunks().buffers()[1], dtype="<i2").reshape(t.num_rows, -1)
        offsets = pa.array(np.arange(0, pcm.size + 1, pcm.shape[1], dtype=np.int64))
        old = pa.LargeListArray.from_arrays(offsets, pa.array(pcm.reshape(-1)))
        t = t.set_column(t.schema.get_field_index("audio"), "audio", old).replace_schema_metadata(None)
        pq.write_table(t, f, compression="zstd")
    m = json.loads((folder / MANIFEST).read_text())
    for key in ("layout", "segment_bytes"):
        del m["audio"][key]
    m["index_digest"] = "0" * 64  # the digest covers the audio parameters: an older mdlda's differs
    (folder / MANIFEST).write_text(json.dumps(m))
    state = folder / STATE_DIR / "state.json"
    state.write_text(json.dumps({**json.loads(state.read_text()), "index_digest": "0" * 64}))


def test_old_layout_shards_are_refused_and_prepare_overwrite_rewrites_them(midlevel_shards, demo_root, tmp_path):
    from mdlda.params import OldShardLayout
    from pipelines.prepare import prepare
    from pipelines.shards import local_rows, read_shards

    out = tmp_path / "old"
    shutil.copytree(midlevel_shards.out, out)
    _to_old_layout(out)
    with pytest.raises(OldShardLayout, match=r"(?s)old layout.*Rerun `mdlda prepare` \(with --overwrite"):
        read_shards(out)
    with pytest.raises(OldShardLayout, match="Rerun `mdlda prepare`"):
        prepare(_cfg(demo_root, out, chunk_items=8))  # the same command without --overwrite: told what to do
    m = json.loads((out / MANIFEST).read_text())
    m["audio"] = midlevel_shards.manifest["audio"]  # a manifest that claims the new layout over old files
    (out / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(OldShardLayout, match=r"large_list.*rerun `mdlda prepare`"):
        read_shards(out)
    with pytest.raises(OldShardLayout, match=r"large_list.*rerun `mdlda prepare`"):
        local_rows(out)  # the local reader checks the same
    again = prepare(_cfg(demo_root, out, chunk_items=8, overwrite=True))
    assert again.manifest["content_digest"] == midlevel_shards.manifest["content_digest"]  # the same PCM bytes
    assert read_shards(out)[1]["audio"]["layout"] == midlevel_shards.manifest["audio"]["layout"]


def test_rerun_is_idempotent(midlevel_shards, demo_root):
    from pipelines.prepare import prepare

    out = Path(midlevel_shards.out)
    before = {f.name: f.stat().st_mtime_ns for f in (out / DATA_DIR).iterdir()}
    again = prepare(_cfg(demo_root, out, chunk_items=8))
    assert again.skipped_work
    assert {f.name: f.stat().st_mtime_ns for f in (out / DATA_DIR).iterdir()} == before


def test_interrupted_run_completes_with_same_content(midlevel_shards, demo_root, tmp_path):
    from pipelines.prepare import STATE_DIR, prepare

    out = tmp_path / "copy"
    shutil.copytree(midlevel_shards.out, out)
    # Simulate a crash after the first chunk: no manifest, later chunks unfinished, a half-written staging dir.
    (out / MANIFEST).unlink()
    state = json.loads((out / STATE_DIR / "state.json").read_text())
    for i in state["done"][1:]:
        (out / STATE_DIR / f"chunk-{i:05d}.json").unlink()
    state["done"] = state["done"][:1]
    (out / STATE_DIR / "state.json").write_text(json.dumps(state))
    (out / STATE_DIR / "staging-00001").mkdir()
    (out / STATE_DIR / "staging-00001" / "partial.parquet").write_bytes(b"garbage")
    kept = sorted(f.name for f in (out / DATA_DIR).glob("chunk-00000-*"))
    result = prepare(_cfg(demo_root, out, chunk_items=8))
    assert not result.skipped_work
    assert sorted(f.name for f in (out / DATA_DIR).glob("chunk-00000-*")) == kept  # finished chunk not redone
    assert result.manifest["content_digest"] == midlevel_shards.manifest["content_digest"]
    assert _rows(out).clip_id.is_unique and len(_rows(out)) == midlevel_shards.manifest["rows"]


def test_rebuild_gives_same_digest(midlevel_shards, demo_root, tmp_path):
    import ray

    from pipelines.prepare import prepare

    ctx = ray.data.DataContext.get_current()
    before = ctx.op_resource_reservation_enabled
    ctx.op_resource_reservation_enabled = True
    try:
        again = prepare(_cfg(demo_root, tmp_path / "rebuild", chunk_items=64))
        # prepare turns Ray Data's per-operator reservation off on its own dataset only, never process-wide
        assert ray.data.DataContext.get_current().op_resource_reservation_enabled is True
    finally:
        ctx.op_resource_reservation_enabled = before
    assert again.manifest["content_digest"] == midlevel_shards.manifest["content_digest"]


def _broken_copy(demo_root: Path, tmp_path: Path) -> tuple[Path, list[str]]:
    root = tmp_path / "data"
    shutil.copytree(demo_root / "midlevel", root / "midlevel")
    audio = sorted((root / "midlevel" / "audio").glob("*.mp3"))
    corrupt, empty, short = audio[0], audio[1], audio[2]
    corrupt.write_bytes(b"ID3\x03\x00\x00\x00" + bytes(range(256)) * 40)  # an mp3 header, then garbage
    empty.write_bytes(b"")
    import soundfile as sf

    sf.write(short, np.zeros(22050 * 5, dtype=np.float32), 22050, format="MP3")  # 5 s: clearly too short
    return root, [corrupt.stem, empty.stem, short.stem]


def test_bad_files_are_reported_and_the_rest_written(ray_local, demo_root, tmp_path, midlevel_shards):
    from pipelines.prepare import prepare

    root, bad = _broken_copy(demo_root, tmp_path)
    result = prepare(_cfg(root, tmp_path / "out", max_failure_share=0.5))
    skipped = {s["item"]: s["reason"] for s in result.manifest["skipped"]}
    assert set(bad) <= set(skipped)
    assert "empty" in skipped[bad[1]] and "short" in skipped[bad[2]]
    assert result.manifest["rows"] == midlevel_shards.manifest["rows"] - 3
    assert not set(bad) & set(_rows(tmp_path / "out").clip_id)


def test_too_many_failures_write_nothing(ray_local, demo_root, tmp_path):
    from pipelines.prepare import PrepareError, prepare

    root, _ = _broken_copy(demo_root, tmp_path)
    with pytest.raises(PrepareError, match="max_failure_share"):
        prepare(_cfg(root, tmp_path / "out", max_failure_share=0.01))
    assert not (tmp_path / "out" / MANIFEST).exists()


def test_other_input_into_same_folder_is_refused(midlevel_shards, demo_root, tmp_path):
    from pipelines.prepare import PrepareError, prepare

    out = tmp_path / "copy"
    shutil.copytree(midlevel_shards.out, out)
    with pytest.raises(PrepareError, match="other input"):
        prepare(_cfg(demo_root, out, seed=1))


def test_shards_with_other_audio_parameters_are_refused(midlevel_shards, tmp_path):
    from pipelines.shards import read_shards

    out = tmp_path / "copy"
    shutil.copytree(midlevel_shards.out, out)
    m = json.loads((out / MANIFEST).read_text())
    m["audio"]["sample_rate"] = 16000
    (out / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(AudioParamsMismatch, match="sample_rate"):
        read_shards(out)


def test_maestro_segments(ray_local, demo_root, tmp_path):
    from mdlda.datasets import index_maestro
    from pipelines.prepare import PrepareConfig, prepare

    index = index_maestro(demo_root / "maestro")
    result = prepare(
        PrepareConfig(dataset="maestro", root=str(demo_root / "maestro"), out=str(tmp_path / "m"), progress=False)
    )
    rows = _rows(tmp_path / "m", ["clip_id", "group", "labels", "offset_s", "domain"])
    assert result.manifest["rows"] == int(index.table.expected_segments.sum()) == len(rows)
    assert rows.labels.isna().all() and set(rows.domain) == {"target"}
    first = rows[rows.group == rows.group.iloc[0]].sort_values("offset_s")
    assert list(first.offset_s) == [15.0 * i for i in range(len(first))]
    assert all(cid == f"{g}#{int(o // 15)}" for cid, g, o in zip(rows.clip_id, rows.group, rows.offset_s, strict=True))


def test_a_folder_holding_user_files_is_refused_and_they_survive(demo_root, tmp_path):
    """The README's layouts keep raw data in <X>/data: `--out <X>` must not clear it (not even with --overwrite)."""
    from pipelines.prepare import PrepareError, prepare

    out = tmp_path / "demo_work"
    (out / "data" / "midlevel").mkdir(parents=True)
    song = out / "data" / "midlevel" / "song.mp3"
    song.write_bytes(b"the user's audio")
    (out / "notes.txt").write_text("mine")
    for overwrite in (False, True):
        with pytest.raises(PrepareError, match="is not an mdlda shard folder") as info:
            prepare(_cfg(demo_root, out, overwrite=overwrite))
        assert str(out) in str(info.value) and "new or empty folder" in str(info.value)
    assert song.read_bytes() == b"the user's audio" and (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in out.rglob("*")) == ["data", "midlevel", "notes.txt", "song.mp3"]


def test_a_stranger_in_our_data_folder_is_refused_and_kept(midlevel_shards, demo_root, tmp_path):
    from pipelines.prepare import PrepareError, prepare

    out = tmp_path / "copy"
    shutil.copytree(midlevel_shards.out, out)
    stranger = out / DATA_DIR / "extra.parquet"
    stranger.write_bytes(b"not ours")
    before = sorted(f.name for f in (out / DATA_DIR).iterdir())
    with pytest.raises(PrepareError, match=r"did not write: data/extra\.parquet"):
        prepare(_cfg(demo_root, out, seed=1, overwrite=True))
    assert stranger.read_bytes() == b"not ours" and sorted(f.name for f in (out / DATA_DIR).iterdir()) == before


def test_overwrite_replaces_only_our_files(midlevel_shards, demo_root, tmp_path):
    from pipelines.prepare import prepare

    out = tmp_path / "copy"
    shutil.copytree(midlevel_shards.out, out)
    (out / "notes.txt").write_text("mine")  # beside the manifest: not read as shards, and never deleted
    result = prepare(_cfg(demo_root, out, seed=1, overwrite=True, chunk_items=64))
    assert not result.skipped_work and (out / "notes.txt").read_text() == "mine"
    assert result.manifest["options"]["seed"] == 1
    assert len(_rows(out)) == result.manifest["rows"] and _rows(out).clip_id.is_unique


def _interrupt_after_first_chunk(out: Path) -> None:
    """What a crash after the first chunk leaves: no manifest, only chunk 0 recorded as done."""
    from pipelines.prepare import STATE_DIR

    (out / MANIFEST).unlink()
    state = json.loads((out / STATE_DIR / "state.json").read_text())
    for i in state["done"][1:]:
        (out / STATE_DIR / f"chunk-{i:05d}.json").unlink()
    state["done"] = state["done"][:1]
    (out / STATE_DIR / "state.json").write_text(json.dumps(state))


def test_resume_with_another_chunk_size_writes_every_row(midlevel_shards, demo_root, tmp_path):
    """Interrupted with --chunk-items 8, resumed with 512: every row is written once (not just the first chunk's)."""
    from pipelines.prepare import prepare

    out = tmp_path / "copy"
    shutil.copytree(midlevel_shards.out, out)
    _interrupt_after_first_chunk(out)
    result = prepare(_cfg(demo_root, out, chunk_items=512))
    rows = _rows(out)
    assert len(rows) == result.manifest["rows"] == midlevel_shards.manifest["rows"] and rows.clip_id.is_unique
    assert result.manifest["content_digest"] == midlevel_shards.manifest["content_digest"]


def test_a_deleted_or_truncated_shard_file_is_noticed_and_redone(midlevel_shards, demo_root, tmp_path):
    from pipelines.prepare import prepare

    out = tmp_path / "copy"
    shutil.copytree(midlevel_shards.out, out)
    files = sorted((out / DATA_DIR).glob("chunk-*.parquet"))
    gone, cut = files[0], files[-1]
    gone.unlink()
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    again = prepare(_cfg(demo_root, out, chunk_items=8))
    assert not again.skipped_work
    assert any(line.startswith(f"{gone.name}: missing") for line in again.repaired)
    assert any(line.startswith(f"{cut.name}: unreadable") for line in again.repaired)
    assert again.manifest["content_digest"] == midlevel_shards.manifest["content_digest"]
    assert len(_rows(out)) == midlevel_shards.manifest["rows"] and _rows(out).clip_id.is_unique
    assert prepare(_cfg(demo_root, out, chunk_items=8)).skipped_work  # intact again: nothing to do


def test_damage_without_resume_state_is_refused(midlevel_shards, demo_root, tmp_path):
    from pipelines.prepare import STATE_DIR, PrepareError, prepare

    out = tmp_path / "copy"
    shutil.copytree(midlevel_shards.out, out)
    shutil.rmtree(out / STATE_DIR)
    victim = sorted((out / DATA_DIR).glob("chunk-*.parquet"))[0]
    victim.unlink()
    with pytest.raises(PrepareError, match=rf"{victim.name}: missing.*--overwrite"):
        prepare(_cfg(demo_root, out, chunk_items=8))


def test_truncated_maestro_wav_and_a_path_out_of_the_root_are_reported(ray_local, demo_root, tmp_path):
    """A WAV shorter than its CSV duration is a counted warning (manifest + report line, its segments kept); an
    audio_filename leading out of the root is a reported skip naming the CSV line; every other row is written."""
    import pandas as pd
    import soundfile as sf
    from typer.testing import CliRunner

    from mdlda.datasets import index_maestro
    from mdlda.datasets.maestro import CSV_NAME
    from pipelines.cli import app

    root = tmp_path / "maestro"
    shutil.copytree(demo_root / "maestro", root)
    full = index_maestro(root)
    victim = root / full.table.path.iloc[0].split(str(root) + "/")[1]
    x, sr = sf.read(victim, always_2d=True)
    sf.write(victim, x[: int(sr * 16)], sr)  # 16 s of a ~40 s recording: 1 of its 2 segments left
    (tmp_path / "secret.wav").write_bytes(victim.read_bytes())
    df = pd.read_csv(root / CSV_NAME)
    df.loc[len(df)] = ["C", "T", "train", 2018, "x.midi", "../secret.wav", 40.0]
    df.to_csv(root / CSV_NAME, index=False)

    argv = ["prepare", "maestro", "--root", str(root), "--out", str(tmp_path / "m"), "--max-failure-share", "0.5"]
    res = CliRunner().invoke(app, argv)
    assert res.exit_code == 0, res.output
    out = " ".join(res.output.split())
    assert "warning:" in out and victim.name in out and "truncated" in out
    m = json.loads((tmp_path / "m" / MANIFEST).read_text())
    assert m["n_warnings"] == 1 and victim.name in m["warnings"][0]["reason"]
    assert "decoded to 1 of the 2 segments" in m["warnings"][0]["reason"]
    reasons = {s["item"]: s["reason"] for s in m["skipped"]}
    assert "outside the dataset root" in reasons["../secret.wav"] and f"line {len(df) + 1}" in reasons["../secret.wav"]
    assert m["rows"] == full.options["expected_segments"] - 1 == len(_rows(tmp_path / "m"))
