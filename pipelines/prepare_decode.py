"""The decoding half of `mdlda prepare`: groups of index items decoded, resampled and segmented by Ray Data
``map`` tasks, each writing its group as one Parquet file; only the per-item outcomes come back.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from mdlda.manifest import DATA_DIR
from mdlda.params import MAX_PAD_SECONDS, SEGMENT_SAMPLES
from mdlda.pcm import to_column, with_metadata
from mdlda.shards import decode_item
from pipelines.prepare_folder import STATE_DIR, rmdir_if_empty
from pipelines.shards import WRITE_OPTIONS

# list<float32> holding exactly NUM_FEATURES values, or null. Not a fixed-size list: pyarrow 25 writes null
# fixed-size lists to Parquet but cannot read them back ("Expected all lists to be of size=7").
LABEL_TYPE = pa.list_(pa.float32())


def _rows_to_table(rows: list[dict]) -> pa.Table:
    # one chunk per row over the row's own PCM (no copy): the file is the same as from one stacked array, and a
    # task neither copies nor page-faults its group's audio a second time (shards are written one row per row group)
    empty = [to_column(np.zeros((0, SEGMENT_SAMPLES), dtype=np.int16))]
    audio = pa.chunked_array([to_column(r["audio"][None, :]) for r in rows] or empty)
    labels = pa.array([None if r["labels"] is None else r["labels"].tolist() for r in rows], type=LABEL_TYPE)
    cols = {
        c: pa.array([r[c] for r in rows], type=pa.string()) for c in ("clip_id", "dataset", "domain", "split", "group")
    }
    cols["offset_s"] = pa.array([float(r["offset_s"]) for r in rows], type=pa.float32())
    return with_metadata(pa.table({**cols, "audio": audio, "labels": labels}))


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


def _decode_row(row: dict[str, Any]) -> dict[str, Any]:
    """Ray Data ``map`` body: decode one group of items, write its Parquet file, return the outcomes (as JSON: the
    audio never travels through the object store, only these small records do)."""
    Path(row["path"]).parent.mkdir(parents=True, exist_ok=True)
    records = decode_group(json.loads(row["items"]), row["path"], row["max_pad_s"])
    return {"chunk": row["chunk"], "part": row["part"], "records": json.dumps(records)}


def run_chunks(
    out: Path, chunks: list[tuple[int, pd.DataFrame]], per_task: int, config, advance: Callable
) -> Iterator[tuple[int, list[dict]]]:
    """Decode the chunks with one streaming Ray Data pipeline over groups of ``per_task`` items, each group decoded
    and written as one Parquet file by a ``map`` task (:func:`_decode_row`).

    Yields ``(chunk, records)`` once all files of a chunk are in ``<out>/data``; ``advance(items)`` is called as
    each group's outcome arrives. One dataset for all chunks: groups of the next chunk run while a chunk's last
    group finishes, and Ray Data's start-up is paid once. Closing the iterator early stops the pipeline.
    Each task writing its own file costs less CPU per file than ``map_batches`` + ``write_parquet`` of the segments
    and needs no actor to collect the outcomes. ``config``: the :class:`pipelines.prepare.PrepareConfig`.
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
    # cluster's CPUs back for operators that do not exist here, leaving decode CPUs idle.
    # This dataset's own context; the process-wide DataContext is left as it is.
    ds.context.op_resource_reservation_enabled = False
    # Outcomes are keyed by chunk and part: any order will do (the chain's Ray setup asks for ordered batches).
    ds.context.execution_options.preserve_order = False
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
