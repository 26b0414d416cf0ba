"""What writing the shards' audio column costs, next to decoding it: the floor under prepare / pure decode.

    python bench/parquet_write.py [--clips 32] [--repeat 5] [--out /tmp/mdlda-bench-parquet]

Decodes ``--clips`` clips of the generated small demo (made once in ``<out>/demo``) with prepare's per-file path
(``mdlda.shards.decode_item``) and times, in this one process, CPU ms per 15-s segment of:

- the decode itself (the "pure decode" of bench/prepare.py);
- ``pq.write_table`` of the shard schema's audio column (Ray's int16 tensor column = Arrow large_list<int16>,
  which Parquet stores as a nested INT32 column with a repetition and definition level per sample) with
  prepare's options (byte-stream split + zstd) and with others (no compression, lz4, lower zstd levels);
- for comparison, the same samples as a flat int16 column (no list levels: not the shard schema).

Each write is timed ``--repeat`` times into memory and the fastest is reported, with the bytes per segment. The last
column is the best prepare / pure decode ratio the option allows if decoding and writing were all there is
(decode / (decode + write)).
"""

from __future__ import annotations

import argparse
import io
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clips", type=int, default=32, help="demo clips decoded and written")
    p.add_argument("--repeat", type=int, default=5, help="timed writes of each option; the fastest is reported")
    p.add_argument("--out", default="/tmp/mdlda-bench-parquet", help="work folder (the generated demo)")
    return p.parse_args()


def best_cpu(fn, repeat: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.process_time()
        out = fn()
        best = min(best, time.process_time() - t0)
    return best, out


def main() -> None:
    args = parse_args()
    from mdlda.datasets import generate_demo, index_midlevel
    from mdlda.shards import decode_item
    from pipelines.shards import WRITE_OPTIONS, tensor_array

    out = Path(args.out)
    demo = out / "demo"
    if not (demo / "midlevel" / "metadata_annotations" / "metadata.csv").exists():
        generate_demo(demo, seed=0, size="small")
    items = index_midlevel(demo / "midlevel").table.to_dict("records")[: args.clips]
    decode_item(items[0])  # warm-up: imports, codec start-up
    t0 = time.process_time()
    rows = [r for it in items for r in decode_item(it).rows]
    decode_ms = 1000 * (time.process_time() - t0) / len(rows)
    audio = np.stack([r["audio"] for r in rows])
    n = len(audio)
    table = pa.table({"audio": tensor_array(audio)})
    flat = pa.table({"audio": pa.array(audio.reshape(-1))})
    bss = {"audio.list.element": "BYTE_STREAM_SPLIT"}
    base = {"use_dictionary": False, "write_statistics": False}
    ours = {k: WRITE_OPTIONS[k] for k in ("compression", "column_encoding")}
    zstd_fast = {"compression": "zstd", "compression_level": -5, "column_encoding": bss}
    options = {
        "prepare's (bss + zstd)": (table, {**base, **ours}),
        "no compression": (table, {**base, "compression": "none"}),
        "bss, no compression": (table, {**base, "compression": "none", "column_encoding": bss}),
        "bss + zstd level -5": (table, {**base, **zstd_fast}),
        "bss + lz4": (table, {**base, "compression": "lz4", "column_encoding": bss}),
        "flat int16, none (not the schema)": (flat, {**base, "compression": "none"}),
        "flat int16, bss + zstd (not the schema)": (
            flat,
            {**base, "compression": "zstd", "column_encoding": {"audio": "BYTE_STREAM_SPLIT"}},
        ),
    }
    print(f"{n} segments of {audio.shape[1]} int16 samples; pure decode {decode_ms:.2f} ms CPU per segment\n")
    print(f"{'audio column written as':42}{'ms/seg':>8}{'MB/seg':>8}{'decode/(decode+write)':>23}")
    for name, (tab, kw) in options.items():

        def write(tab=tab, kw=kw) -> int:
            buf = io.BytesIO()
            pq.write_table(tab, buf, **kw)
            return buf.tell()

        write()  # warm-up
        cpu, size = best_cpu(write, args.repeat)
        ms = 1000 * cpu / n
        print(f"{name:42}{ms:>8.2f}{size / n / 1e6:>8.3f}{decode_ms / (decode_ms + ms):>22.2f}x")


if __name__ == "__main__":
    main()
