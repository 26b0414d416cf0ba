"""What writing and reading the shards' audio column costs per 15-s segment, by layout and codec.

    python bench/parquet_write.py [--clips 32] [--repeat 5] [--out /tmp/mdlda-bench-parquet]

Decodes ``--clips`` clips of the generated small demo (made once in ``<out>/demo``) with prepare's per-file path
(``mdlda.shards.decode_item``) and times, in this one process, CPU ms per segment of:

- the decode itself (the "pure decode" of bench/prepare.py);
- ``pq.write_table`` of the audio column into memory, and reading it back to a ``(B, N)`` int16 array
  (``pq.read_table`` + the layout's decode), for
  - the shards' layout (mdlda/pcm.py): raw little-endian int16 PCM in a ``fixed_size_binary[661500]`` column,
    uncompressed (what prepare writes), lz4 and zstd;
  - the old layout: Ray's int16 tensor column (an Arrow ``large_list<int16>``, which Parquet stores as nested
    INT32 with a repetition and a definition level per sample), byte-stream split + zstd as prepare wrote it.

Each option is timed ``--repeat`` times, interleaved (write and read of every option, then again), and the fastest
is reported with the bytes per segment. "decode/(decode+write)" is the best prepare / pure decode ratio the option
allows if decoding and writing were all there is.
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
    p.add_argument("--repeat", type=int, default=5, help="timed rounds; the fastest of each is reported")
    p.add_argument("--out", default="/tmp/mdlda-bench-parquet", help="work folder (the generated demo)")
    return p.parse_args()


def cpu_of(fn) -> tuple[float, object]:
    t0 = time.process_time()
    out = fn()
    return time.process_time() - t0, out


def old_layout(audio: np.ndarray) -> pa.Table:
    """The pre-issue-14 audio column: large_list<int16> (the storage of Ray's tensor column)."""
    n, k = audio.shape
    offsets = pa.array(np.arange(0, (n + 1) * k, k, dtype=np.int64))
    return pa.table({"audio": pa.LargeListArray.from_arrays(offsets, pa.array(audio.reshape(-1)))})


def read_old(buf: bytes) -> np.ndarray:
    col = pq.read_table(pa.BufferReader(buf)).column("audio").combine_chunks()
    return col.flatten().to_numpy().reshape(len(col), -1)


def read_pcm(buf: bytes) -> np.ndarray:
    from mdlda.pcm import from_column

    return from_column(pq.read_table(pa.BufferReader(buf)).column("audio"))


def main() -> None:
    args = parse_args()
    from mdlda.datasets import generate_demo, index_midlevel
    from mdlda.pcm import to_column, with_metadata
    from mdlda.shards import decode_item
    from pipelines.shards import WRITE_OPTIONS

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
    pcm = with_metadata(pa.table({"audio": to_column(audio)}))
    base = {"use_dictionary": False, "write_statistics": False}
    options = {
        "PCM binary, uncompressed (prepare's)": (pcm, {**base, "compression": WRITE_OPTIONS["compression"]}, read_pcm),
        "PCM binary, lz4": (pcm, {**base, "compression": "lz4"}, read_pcm),
        "PCM binary, zstd": (pcm, {**base, "compression": "zstd"}, read_pcm),
        "old: large_list<int16>, bss + zstd": (
            old_layout(audio),
            {**base, "compression": "zstd", "column_encoding": {"audio.list.element": "BYTE_STREAM_SPLIT"}},
            read_old,
        ),
    }
    best = {name: {"write": float("inf"), "read": float("inf")} for name in options}
    for _ in range(args.repeat + 1):  # the first round warms up
        for name, (tab, kw, read) in options.items():
            sink = io.BytesIO()
            w, _ = cpu_of(lambda tab=tab, kw=kw, sink=sink: pq.write_table(tab, sink, **kw))
            data = sink.getvalue()
            r, back = cpu_of(lambda read=read, data=data: read(data))
            assert np.array_equal(back, audio), name
            b = best[name]
            b["write"], b["read"], b["bytes"] = min(b["write"], w), min(b["read"], r), len(data)
    print(f"{n} segments of {audio.shape[1]} int16 samples; pure decode {decode_ms:.2f} ms CPU per segment\n")
    print(f"{'audio column':40}{'write ms':>9}{'read ms':>8}{'read seg/s':>11}{'MB/seg':>8}{'decode/(dec+write)':>19}")
    for name, b in best.items():
        w, r = 1000 * b["write"] / n, 1000 * b["read"] / n
        mb, ceiling = b["bytes"] / n / 1e6, decode_ms / (decode_ms + w)
        print(f"{name:40}{w:>9.2f}{r:>8.2f}{1000 / r:>11.0f}{mb:>8.3f}{ceiling:>18.2f}x")


if __name__ == "__main__":
    main()
