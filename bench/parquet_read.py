"""Ray Data's two Parquet readers on mdlda's shards: V1 (what mdlda runs) against V2 (Ray 2.60's default).

    python bench/parquet_read.py [--clips 600] [--repeat 3] [--out /tmp/mdlda-bench-datapath]

Input: the shards of bench/datapath.py (``--clips`` Mid-level clips through the real ``mdlda prepare``, made once
in ``<out>``; the same folder as datapath.py's, so one build serves both). In one process with a private 2-CPU
Ray, each reader in turn (``DataContext.use_datasource_v2``), interleaved rounds (V1, V2, V1, V2, ...):

- small read: ``read_shards`` of the ``test`` split (the split selection the stages use), every column, pulled
  whole into the driver: the fixed cost a stage pays per read whatever its size;
- stream: the ``train`` split through ``iter_batches`` (batches of 32), as a set that is not materialised is read
  every epoch by Ray Train's iterators: segments/s and segments per CPU second;
- materialise: the ``train`` split held in the object store in one-row blocks, as ``load_stage_data`` does when it
  fits.

Wall time and the CPU of this process tree (Ray's workers and daemons included, as bench/datapath.py counts it);
the fastest round of each by wall is reported, with every round. Rows are checked equal between the readers.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ["RAY_AUTH_MODE"] = "disabled"  # before any ray import
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
sys.path.insert(0, str(Path(__file__).parent))  # bench/datapath.py's shard builder and CPU counter

from datapath import make_shards, tree_cpu  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clips", type=int, default=600, help="Mid-level clips in the shards")
    p.add_argument("--repeat", type=int, default=3, help="interleaved rounds; the fastest of each is reported")
    p.add_argument("--out", default="/tmp/mdlda-bench-datapath", help="work folder (shared with datapath.py)")
    return p.parse_args()


def small_read(shards: Path) -> tuple[int, list]:
    from pipelines.shards import numpy_batches, read_shards

    ds, _ = read_shards(shards, splits=["test"])
    ids = [c for b in numpy_batches(ds) for c in b["clip_id"]]
    return len(ids), sorted(ids)


def stream(shards: Path) -> tuple[int, list]:
    from pipelines.shards import read_shards

    ds, _ = read_shards(shards, splits=["train"], columns=["clip_id", "audio", "labels"])
    n, ids = 0, []
    for b in ds.iter_batches(batch_size=32, batch_format="pyarrow"):
        n += b.num_rows
        ids += b.column("clip_id").to_pylist()
    return n, sorted(ids)


def materialise(shards: Path) -> tuple[int, list]:
    from pipelines.data import TRAIN_COLUMNS, _materialize
    from pipelines.shards import read_shards

    ds, _ = read_shards(shards, splits=["train"], columns=TRAIN_COLUMNS)
    held = _materialize(ds, 1)
    return held.count(), []


def timed(fn, shards: Path) -> dict:
    c0, t0 = tree_cpu(), time.perf_counter()
    n, ids = fn(shards)
    wall, cpu = time.perf_counter() - t0, tree_cpu() - c0
    return {"rows": n, "wall_s": wall, "cpu_s": cpu, "ids": ids}


def main() -> None:
    args = parse_args()
    import ray

    from pipelines.raysetup import init_ray

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()[0]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=str(out / "ray"))
    init_ray()
    shards = make_shards(argparse.Namespace(clips=args.clips), out)
    ctx = ray.data.DataContext.get_current()
    ways = {"small read (test split)": small_read, "stream (train split)": stream, "materialise (train)": materialise}
    results: dict[tuple[str, str], list[dict]] = {}
    stream(shards)  # warm: workers started, files in the page cache
    for _ in range(args.repeat):
        for reader, v2 in (("V1", False), ("V2", True)):
            ctx.use_datasource_v2 = v2
            for name, fn in ways.items():
                results.setdefault((name, reader), []).append(timed(fn, shards))
    for name in ways:  # both readers give the same rows
        a, b = results[(name, "V1")][0], results[(name, "V2")][0]
        assert a["rows"] == b["rows"] and a["ids"] == b["ids"], name
    print(
        f"\n{args.clips} clips, {args.repeat} interleaved rounds; load average {load:.1f} before, "
        f"{os.getloadavg()[0]:.1f} after\n"
    )
    print("| read | reader | rows | wall s (fastest) | CPU s | rows/s | rounds (wall s) |")
    print("|---|---|---:|---:|---:|---:|---|")
    for name in ways:
        for reader in ("V1", "V2"):
            runs = results[(name, reader)]
            best = min(runs, key=lambda r: r["wall_s"])
            rounds = " / ".join(f"{r['wall_s']:.2f}" for r in runs)
            print(
                f"| {name} | {reader} | {best['rows']} | {best['wall_s']:.2f} | {best['cpu_s']:.2f} | "
                f"{best['rows'] / best['wall_s']:,.0f} | {rounds} |"
            )
    ray.shutdown()


if __name__ == "__main__":
    main()
