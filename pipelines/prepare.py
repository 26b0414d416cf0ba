"""Stage 1, `mdlda prepare`: audio files -> 15-s int16 segments in Parquet shards, with Ray Data.

index (pandas) -> one streaming Ray Data pipeline over groups of items, each ``map`` task decoding, resampling and
segmenting its group and writing it as one Parquet file -> ``<out>/data``, chunk by chunk; the later stages read the
shards with Ray Data. Only the per-item outcomes (digests, skips) flow back through Ray Data, never the audio (see
``_run_chunks`` for what that saves). A finished chunk is recorded in ``<out>/.prepare/``; rerunning an interrupted
run redoes only unfinished chunks, and rerunning a finished one does nothing. Bad files are reported skips (in the
manifest), a MAESTRO file with fewer segments than its CSV duration implies is a counted warning there, and the
run stops with an error when more than ``max_failure_share`` of the items fail. ``<out>`` must be new, empty or a
shard folder of ours, and only files prepare wrote are ever deleted there (``prepare_folder``).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from mdlda.audio import decoder_info
from mdlda.manifest import DATA_DIR, MANIFEST, build_manifest, index_digest, read_manifest, write_manifest
from mdlda.params import MAX_PAD_SECONDS, NUM_FEATURES, SEGMENT_SAMPLES, check_audio_params  # noqa: F401
from mdlda.pcm import to_column, with_metadata
from mdlda.shards import decode_item
from pipelines.prepare_folder import (
    STATE_DIR,
    STATE_FILE,
    PrepareError,
    check_files,
    check_out_folder,
    chunk_of,
    data_files,
    remove_chunk_files,
    remove_ours,
    rmdir_if_empty,
    write_json_atomic,
)
from pipelines.shards import WRITE_OPTIONS

logger = logging.getLogger(__name__)

__all__ = ["STATE_DIR", "PrepareConfig", "PrepareError", "PrepareResult", "decode_group", "prepare"]


@dataclass
class PrepareConfig:
    dataset: str  # "midlevel" or "maestro"
    root: str
    out: str
    piano_ids: str | None = None  # Mid-level: CSV with a `song id` column (the piano_test clips)
    seed: int = 0
    eval_fraction: float = 0.1  # Mid-level: share of the source drawn (from single-track artists) for valid+test
    valid_fraction: float = 0.2  # Mid-level: share of that evaluation set used for validation
    splits: list[str] | None = None  # MAESTRO: which of its splits to keep (default all)
    max_performances: int | None = None  # MAESTRO: a seeded subset of performances
    max_pad_s: float = MAX_PAD_SECONDS
    max_failure_share: float = 0.1
    chunk_items: int = 512  # items per resumable chunk
    files_per_task: int | None = None  # items decoded and written per task; None: 16 clips or 1 performance
    num_cpus_per_task: float = 1.0
    overwrite: bool = False
    progress: bool = True


@dataclass
class PrepareResult:
    out: str
    manifest: dict[str, Any]
    skipped_work: bool = False
    chunks_done: int = 0
    failures: list[dict] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)  # damaged or missing shard files found and redone


# list<float32> holding exactly NUM_FEATURES values, or null. Not a fixed-size list: pyarrow 25 writes null
# fixed-size lists to Parquet but cannot read them back ("Expected all lists to be of size=7").
LABEL_TYPE = pa.list_(pa.float32())


def _rows_to_table(rows: list[dict]) -> pa.Table:
    audio = np.stack([r["audio"] for r in rows]) if rows else np.zeros((0, SEGMENT_SAMPLES), dtype=np.int16)
    labels = pa.array([None if r["labels"] is None else r["labels"].tolist() for r in rows], type=LABEL_TYPE)
    cols = {
        c: pa.array([r[c] for r in rows], type=pa.string()) for c in ("clip_id", "dataset", "domain", "split", "group")
    }
    cols["offset_s"] = pa.array([float(r["offset_s"]) for r in rows], type=pa.float32())
    return with_metadata(pa.table({**cols, "audio": to_column(audio), "labels": labels}))


def decode_group(items: list[dict], path: str, max_pad_s: float = MAX_PAD_SECONDS) -> list[dict]:
    """Decode a group of index items and write their rows as one Parquet file at ``path`` (none if no rows).

    Returns one outcome per item (rows with digests, fitting, or the error) for the chunk's record. The body of a
    prepare task; plain Python, so bench/prepare.py can run it without Ray.
    """
    rows, records = [], []
    for item in items:
        res = decode_item(item, max_pad_s)
        rows.extend(res.rows)
        records.append(
            {
                "item": res.item,
                "error": res.error,
                "fitting": res.fitting,
                "warning": res.warning,
                "rows": [(r["clip_id"], r["split"], r["digest"]) for r in res.rows],
            }
        )
    if rows:
        pq.write_table(_rows_to_table(rows), path, **WRITE_OPTIONS)
    return records


def _index(config: PrepareConfig):
    from mdlda.datasets import index_maestro, index_midlevel

    if config.dataset == "midlevel":
        return index_midlevel(
            config.root,
            piano_ids=config.piano_ids,
            seed=config.seed,
            eval_fraction=config.eval_fraction,
            valid_fraction=config.valid_fraction,
        )
    if config.dataset == "maestro":
        return index_maestro(
            config.root, splits=config.splits, max_performances=config.max_performances, seed=config.seed
        )
    raise PrepareError(f"unknown dataset {config.dataset!r}: expected 'midlevel' or 'maestro'")


def _progress(total: int, enabled: bool, dataset: str = ""):
    from mdlda.console import progress_bar  # count, rate, ETA

    return progress_bar(f"prepare {dataset}".strip(), "files", enabled=enabled)


def prepare(config: PrepareConfig) -> PrepareResult:
    """Run the prepare stage; returns the manifest of the finished shard folder."""
    out = Path(config.out).resolve()
    check_out_folder(out)  # before any work: a folder holding other files is refused, never cleared
    index = _index(config)
    table = index.table.reset_index(drop=True)
    options = {"dataset": config.dataset, "max_pad_s": config.max_pad_s, **index.options}
    digest = index_digest(table, options)
    state_dir = out / STATE_DIR

    repaired: list[str] = []
    if (out / MANIFEST).exists():
        manifest = read_manifest(out, check_params=False)  # other parameters or layout: rebuilt or refused below
        if manifest.get("index_digest") != digest and not config.overwrite:
            check_audio_params(manifest.get("audio", {}), str(out))  # an old layout says so, and how to rewrite
        if manifest.get("index_digest") == digest:
            problems = check_files(out, manifest)  # "up to date" only when the files are what the manifest lists
            if not problems:
                return PrepareResult(str(out), manifest, skipped_work=True)
            if config.overwrite:  # rebuilt below
                repaired = [f"{name}: {why}" for name, why in problems]
            else:
                repaired = _reopen_damaged(out, state_dir, digest, problems)
        elif not config.overwrite:
            raise PrepareError(
                f"{out} already holds shards made from other input (or other options). "
                "Write to a new folder, or pass --overwrite to replace them."
            )
    state = {} if config.overwrite else _load_state(state_dir)
    if state.get("index_digest") != digest:
        remove_ours(out)  # only the files prepare wrote (check_out_folder refused anything else)
        state = {"index_digest": digest, "done": []}
    done_records = _done_records(state_dir, state["done"])
    done = set(done_records)  # a finished chunk without its record is redone
    state["done"] = sorted(done)
    write_json_atomic(state_dir / STATE_FILE, state)  # first: the folder is marked as ours before data lands
    (out / DATA_DIR).mkdir(parents=True, exist_ok=True)
    remove_chunk_files(out, done)

    n_items = len(table)
    index_failures = [s for s in index.skipped if s.get("counts_as_failure", True)]
    n_total = n_items + len(index_failures)
    allowed = config.max_failure_share * max(n_total, 1)
    if len(index_failures) > allowed:
        raise PrepareError(_too_many(index_failures, n_total, config))

    # What is left to do is decided by item, not by chunk number: a resume with another --chunk-items (or after
    # a damaged chunk was reopened) decodes exactly the items no finished chunk holds, in new chunk numbers.
    finished = {rec["item"] for records in done_records.values() for rec in records}
    rest = table[~table.clip_id.astype(str).isin(finished)]
    size, first = max(1, config.chunk_items), max(done, default=-1) + 1
    todo = [(first + k, rest.iloc[s : s + size]) for k, s in enumerate(range(0, len(rest), size))]
    per_task = config.files_per_task or (1 if config.dataset == "maestro" else 16)
    failed = index_failures.copy()  # and those of the chunks done before an interruption:
    for records in done_records.values():
        failed += _failures(records)
    with _progress(n_items, config.progress, config.dataset) as bar:
        task = bar.add_task("decode", total=n_items)
        bar.advance(task, n_items - len(rest))
        runs = _run_chunks(out, todo, per_task, config, advance=lambda n: bar.advance(task, n))
        with closing(runs):  # leaving early (an error) cancels the tasks still running
            for i, records in runs:
                write_json_atomic(state_dir / f"chunk-{i:05d}.json", records)
                done.add(i)
                state["done"] = sorted(done)
                write_json_atomic(state_dir / STATE_FILE, state)
                failed += _failures(records)
                if len(failed) > allowed:
                    raise PrepareError(_too_many(failed, n_total, config))
    result = _finish(out, state_dir, index, digest, options, config)
    result.repaired = repaired
    return result


def _load_state(state_dir: Path) -> dict:
    path = state_dir / STATE_FILE
    if not path.exists():
        return {}
    try:
        state = json.loads(path.read_text())
        if not isinstance(state, dict) or not isinstance(state.get("done", []), list):
            raise ValueError("expected an object with a 'done' list")
    except ValueError as exc:
        raise PrepareError(
            f"{path} is unreadable ({exc}): the resume state of an interrupted run. Pass --overwrite to start "
            "this shard folder again (only the files prepare wrote are replaced)."
        ) from exc
    return state


def _done_records(state_dir: Path, done: list[int]) -> dict[int, list[dict]]:
    """The per-item records of the finished chunks; a chunk whose record is missing or unreadable is dropped."""
    out = {}
    for i in done:
        try:
            out[int(i)] = json.loads((state_dir / f"chunk-{int(i):05d}.json").read_text())
        except (OSError, ValueError):
            logger.warning("prepare: the record of finished chunk %s in %s is missing: redoing it", i, state_dir)
    return out


def _reopen_damaged(out: Path, state_dir: Path, digest: str, problems: list[tuple[str, str]]) -> list[str]:
    """The manifest's files do not match the data folder: mark the chunks of the damaged files unfinished (their
    items are redone) and drop the manifest; refuse when there is no resume state to redo them from."""
    lines = [f"{name}: {why}" for name, why in problems]
    state = _load_state(state_dir)
    chunks = {chunk_of(name) for name, _ in problems}
    if state.get("index_digest") != digest or None in chunks:
        raise PrepareError(
            f"{out}: the shard files do not match {MANIFEST} ({'; '.join(lines[:5])}), and there is no resume state "
            f"in {STATE_DIR}/ to redo only them. Pass --overwrite to rebuild the folder."
        )
    for line in lines:
        logger.warning("prepare: %s/%s/%s: redoing its chunk", out, DATA_DIR, line)
    state["done"] = sorted(set(state["done"]) - chunks)
    write_json_atomic(state_dir / STATE_FILE, state)
    (out / MANIFEST).unlink()
    return lines


def _decode_row(row: dict[str, Any]) -> dict[str, Any]:
    """Ray Data ``map`` body: decode one group of items, write its Parquet file, return the outcomes (as JSON: the
    audio never travels through the object store, only these small records do)."""
    Path(row["path"]).parent.mkdir(parents=True, exist_ok=True)
    records = decode_group(json.loads(row["items"]), row["path"], row["max_pad_s"])
    return {"chunk": row["chunk"], "part": row["part"], "records": json.dumps(records)}


def _run_chunks(
    out: Path, chunks: list[tuple[int, pd.DataFrame]], per_task: int, config: PrepareConfig, advance: Callable
) -> Iterator[tuple[int, list[dict]]]:
    """Decode the chunks with one streaming Ray Data pipeline over groups of ``per_task`` items, each group decoded
    and written as one Parquet file by a ``map`` task (:func:`_decode_row`).

    Yields ``(chunk, records)`` once all files of a chunk are in ``<out>/data``; ``advance(items)`` is called as
    each group's outcome arrives. One dataset for all chunks: groups of the next chunk run while a chunk's last
    group finishes, and Ray Data's start-up is paid once. Closing the iterator early stops the pipeline.
    Each task writing its own file costs less CPU per file than ``map_batches`` + ``write_parquet`` of the segments
    and needs no actor to collect the outcomes (bench/prepare.py measures it; figures in bench/README.md).
    """
    slots = max(1, int(ray.cluster_resources().get("CPU", 1) / config.num_cpus_per_task))  # tasks at once
    groups = []
    for i, chunk in chunks:
        items = chunk.to_dict("records")
        for item in items:
            item["labels"] = None if item["labels"] is None else [float(v) for v in item["labels"]]
        # at most per_task items per group, in a multiple of `slots` groups of (nearly) equal size: no CPU idles
        # while another finishes a chunk's last, larger group
        n = -(-len(items) // per_task)
        n = min(len(items), -(-n // slots) * slots)
        bounds = [len(items) * k // n for k in range(n + 1)]
        for k in range(n):
            path = out / STATE_DIR / f"staging-{i:05d}" / f"part-{k:05d}.parquet"
            part = items[bounds[k] : bounds[k + 1]]
            groups.append(
                {"chunk": i, "part": k, "items": json.dumps(part), "path": str(path), "max_pad_s": config.max_pad_s}
            )
    if not groups:
        return
    left = Counter(g["chunk"] for g in groups)
    parts: dict[int, dict[int, list[dict]]] = {i: {} for i in left}
    ds = ray.data.from_items(groups, override_num_blocks=len(groups))
    ds = ds.map(_decode_row, num_cpus=config.num_cpus_per_task)
    # One operator with nothing to reserve resources against: Ray Data's per-operator reservation holds half the
    # cluster's CPUs back for operators that do not exist here, leaving decode CPUs idle (bench/README.md).
    # This dataset's own context; the process-wide DataContext is left as it is.
    ds.context.op_resource_reservation_enabled = False
    rows = iter(ds.iter_rows())
    try:
        for row in rows:
            i, k = int(row["chunk"]), int(row["part"])
            parts[i][k] = json.loads(row["records"])
            advance(len(parts[i][k]))
            left[i] -= 1
            if left[i] == 0:
                staging = out / STATE_DIR / f"staging-{i:05d}"
                for f in sorted(staging.glob("part-*.parquet")):
                    f.rename(out / DATA_DIR / f"chunk-{i:05d}-{f.name}")
                rmdir_if_empty(staging)  # kept if something not ours is in it
                done = parts.pop(i)
                yield i, [rec for k in sorted(done) for rec in done[k]]
    finally:
        close = getattr(rows, "close", None)
        if close is not None:
            close()  # stops the streaming executor


def _failures(records: list[dict]) -> list[dict]:
    return [{"item": r["item"], "reason": r["error"]} for r in records if r["error"]]


def _too_many(failed: list[dict], total: int, config: PrepareConfig) -> str:
    examples = "\n".join(f"  {f.get('item')}: {f.get('reason')}" for f in failed[:5])
    return (
        f"{len(failed)} of {total} items failed (more than max_failure_share={config.max_failure_share:.0%}); "
        f"no dataset was written. First failures:\n{examples}\n"
        "Fix the input, or raise --max-failure-share if these losses are acceptable."
    )


def _finish(out: Path, state_dir: Path, index, digest: str, options: dict, config: PrepareConfig) -> PrepareResult:
    counts: dict[str, int] = {}
    digests: dict[str, str] = {}
    fitting: dict[str, int] = {}
    skipped = list(index.skipped)
    warnings: list[dict] = []
    for f in sorted(state_dir.glob("chunk-*.json")):
        for rec in json.loads(f.read_text()):
            if rec["error"]:
                skipped.append({"item": rec["item"], "reason": rec["error"]})
                continue
            if rec.get("warning"):
                warnings.append({"item": rec["item"], "reason": rec["warning"]})
            if rec["fitting"]:
                fitting[rec["fitting"]] = fitting.get(rec["fitting"], 0) + 1
            for clip_id, split, row_digest in rec["rows"]:
                if clip_id in digests:
                    raise PrepareError(f"duplicate clip id {clip_id!r} in the decoded rows of {config.root}")
                digests[clip_id] = row_digest
                counts[split] = counts.get(split, 0) + 1
    manifest = build_manifest(
        dataset=config.dataset,
        source_root=str(Path(config.root).resolve()),
        counts=counts,
        skipped=skipped,
        row_digests=digests,
        index_digest=digest,
        options={**options, "config": asdict(config)},
        decoder=decoder_info(),
        clip_fitting=fitting,
        files=data_files(out),
        warnings=warnings,
    )
    write_manifest(out, manifest)
    return PrepareResult(str(out), manifest, failures=[s for s in skipped if s.get("reason")])
