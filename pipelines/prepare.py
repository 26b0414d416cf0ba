"""Stage 1, `mdlda prepare`: audio files -> 15-s int16 segments in Parquet shards, with Ray Data.

index (pandas) -> parallel decode + resample + segment (Ray Data ``map_batches``) -> ``write_parquet``, chunk by
chunk. A finished chunk is recorded in ``<out>/.prepare/``; rerunning an interrupted run redoes only unfinished
chunks, and rerunning a finished one does nothing. Bad files are reported skips (in the manifest), and the run
stops with an error when more than ``max_failure_share`` of the items fail.
"""

from __future__ import annotations

import json
import math
import shutil
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import ray

from mdlda.audio import decoder_info
from mdlda.manifest import DATA_DIR, MANIFEST, build_manifest, index_digest, read_manifest, write_manifest
from mdlda.params import MAX_PAD_SECONDS, NUM_FEATURES  # noqa: F401 (LABEL_TYPE's length)
from mdlda.shards import decode_item
from pipelines.shards import WRITE_OPTIONS, tensor_array

STATE_DIR = ".prepare"


class PrepareError(RuntimeError):
    """The prepare stage refused to write a dataset (too many failures, a folder holding other shards, ...)."""


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
    chunk_items: int = 512  # items per resumable chunk (one Ray Data run each)
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


@ray.remote(num_cpus=0)
class _Ledger:
    """Collects per-item outcomes from the decode tasks (digests, fitting, failures) for the manifest."""

    def __init__(self) -> None:
        self.items: list[dict] = []

    def add(self, records: list[dict]) -> None:
        self.items.extend(records)

    def count(self) -> int:
        return len(self.items)

    def take(self) -> list[dict]:
        items, self.items = self.items, []
        return items


# list<float32> holding exactly NUM_FEATURES values, or null. Not a fixed-size list: pyarrow 25 writes null
# fixed-size lists to Parquet but cannot read them back ("Expected all lists to be of size=7").
LABEL_TYPE = pa.list_(pa.float32())


def _rows_to_table(rows: list[dict]) -> pa.Table:
    audio = tensor_array(np.stack([r["audio"] for r in rows]) if rows else np.zeros((0, 1), dtype=np.int16))
    labels = pa.array([None if r["labels"] is None else r["labels"].tolist() for r in rows], type=LABEL_TYPE)
    cols = {
        c: pa.array([r[c] for r in rows], type=pa.string()) for c in ("clip_id", "dataset", "domain", "split", "group")
    }
    cols["offset_s"] = pa.array([float(r["offset_s"]) for r in rows], type=pa.float32())
    return pa.table({**cols, "audio": audio, "labels": labels})


def _decode_batch(batch: pd.DataFrame, ledger, max_pad_s: float) -> pa.Table:
    rows, records = [], []
    for item in batch.to_dict("records"):
        item["labels"] = json.loads(item["labels"])
        res = decode_item(item, max_pad_s)
        rows.extend(res.rows)
        records.append(
            {
                "item": res.item,
                "error": res.error,
                "fitting": res.fitting,
                "rows": [(r["clip_id"], r["split"], r["digest"]) for r in res.rows],
            }
        )
    ray.get(ledger.add.remote(records))
    return _rows_to_table(rows)


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


def _load_state(state_dir: Path) -> dict:
    path = state_dir / "state.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _clean_unfinished(out: Path, done: set[int]) -> None:
    """Remove staging folders and data files of chunks that did not finish (so nothing is duplicated)."""
    for staging in (out / STATE_DIR).glob("staging-*"):
        shutil.rmtree(staging, ignore_errors=True)
    for f in (out / DATA_DIR).glob("chunk-*.parquet"):
        if int(f.name.split("-")[1]) not in done:
            f.unlink()


def _progress(total: int, enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("[bold]prepare[/]"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("files"),
        TimeRemainingColumn(),
        disable=not enabled,
        transient=False,
    )


def prepare(config: PrepareConfig) -> PrepareResult:
    """Run the prepare stage; returns the manifest of the finished shard folder."""
    out = Path(config.out).resolve()
    index = _index(config)
    table = index.table.reset_index(drop=True)
    options = {"dataset": config.dataset, "max_pad_s": config.max_pad_s, **index.options}
    digest = index_digest(table, options)

    if (out / MANIFEST).exists():
        manifest = read_manifest(out)
        if manifest.get("index_digest") == digest:
            return PrepareResult(str(out), manifest, skipped_work=True)
        if not config.overwrite:
            raise PrepareError(
                f"{out} already holds shards made from other input (or other options). "
                "Write to a new folder, or pass --overwrite to replace them."
            )
    state_dir = out / STATE_DIR
    state = _load_state(state_dir)
    if state.get("index_digest") != digest or config.overwrite:
        shutil.rmtree(out / DATA_DIR, ignore_errors=True)
        shutil.rmtree(state_dir, ignore_errors=True)
        (out / MANIFEST).unlink(missing_ok=True)
        state = {"index_digest": digest, "done": []}
    state_dir.mkdir(parents=True, exist_ok=True)
    (out / DATA_DIR).mkdir(parents=True, exist_ok=True)
    (state_dir / "state.json").write_text(json.dumps(state))
    done = set(state["done"])
    _clean_unfinished(out, done)

    n_items = len(table)
    index_failures = [s for s in index.skipped if s.get("counts_as_failure", True)]
    n_total = n_items + len(index_failures)
    allowed = config.max_failure_share * max(n_total, 1)
    if len(index_failures) > allowed:
        raise PrepareError(_too_many(index_failures, n_total, config))

    chunks = [
        (i, table.iloc[s : s + config.chunk_items]) for i, s in enumerate(range(0, n_items, max(1, config.chunk_items)))
    ]
    ledger = _Ledger.remote()
    with _progress(n_items, config.progress) as bar:
        task = bar.add_task("decode", total=n_items)
        bar.advance(task, sum(len(c) for i, c in chunks if i in done))
        for i, chunk in chunks:
            if i in done:
                continue
            records = _run_chunk(out, i, chunk, ledger, config, bar, task)
            (state_dir / f"chunk-{i:05d}.json").write_text(json.dumps(records))
            done.add(i)
            state["done"] = sorted(done)
            (state_dir / "state.json").write_text(json.dumps(state))
            failed = index_failures + _failures(state_dir)
            if len(failed) > allowed:
                raise PrepareError(_too_many(failed, n_total, config))
    return _finish(out, state_dir, index, digest, options, config)


def _run_chunk(out: Path, i: int, chunk: pd.DataFrame, ledger, config: PrepareConfig, bar, task) -> list[dict]:
    staging = out / STATE_DIR / f"staging-{i:05d}"
    items = [{k: v for k, v in item.items()} for item in chunk.to_dict("records")]
    for item in items:  # labels travel as a JSON string: Ray would turn lists-or-None into tensor columns
        item["labels"] = json.dumps(None if item["labels"] is None else [float(v) for v in item["labels"]])
    per_task = config.files_per_task or (1 if config.dataset == "maestro" else 16)
    ds = ray.data.from_items(items, override_num_blocks=math.ceil(len(items) / per_task))
    ds = ds.map_batches(
        _decode_batch,
        batch_size=per_task,
        batch_format="pandas",
        num_cpus=config.num_cpus_per_task,
        fn_kwargs={"ledger": ledger, "max_pad_s": config.max_pad_s},
    )
    seen = [0]
    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(0.5):
            n = ray.get(ledger.count.remote())
            bar.advance(task, n - seen[0])
            seen[0] = n

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    try:
        # each decode task writes its own file
        ds.write_parquet(str(staging), **WRITE_OPTIONS)
    finally:
        stop.set()
        poller.join()
    records = ray.get(ledger.take.remote())
    bar.advance(task, len(records) - seen[0])
    for f in sorted(staging.glob("*.parquet")):
        f.rename(out / DATA_DIR / f"chunk-{i:05d}-{f.name}")
    shutil.rmtree(staging, ignore_errors=True)
    return records


def _failures(state_dir: Path) -> list[dict]:
    out = []
    for f in sorted(state_dir.glob("chunk-*.json")):
        out += [{"item": r["item"], "reason": r["error"]} for r in json.loads(f.read_text()) if r["error"]]
    return out


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
    for f in sorted(state_dir.glob("chunk-*.json")):
        for rec in json.loads(f.read_text()):
            if rec["error"]:
                skipped.append({"item": rec["item"], "reason": rec["error"]})
                continue
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
    )
    write_manifest(out, manifest)
    return PrepareResult(str(out), manifest, failures=[s for s in skipped if s.get("reason")])
