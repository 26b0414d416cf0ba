"""Can the data path feed a GPU? Segments/s per CPU core delivered as training batches, against a bare read.

    python bench/datapath.py [--clips 600] [--batch 32] [--epochs 3] [--repeat 3] [--out /tmp/mdlda-bench-datapath]
                             [--gpu-tflops 989] [--efficiency 0.25] [--gflop-per-sample G | --width 128]

Input: ``--clips`` Mid-level clips of the generated small demo (repeated under new ids past its 224 clips, as
bench/prepare.py builds its sets), through the real ``mdlda prepare`` into shards (made once in ``<out>``). Every
way below delivers the ``train`` split, ``--epochs`` epochs, as ``(B, 330750)`` int16 batches copied into one
host tensor (pinned when CUDA is there: what a ``.to(device, non_blocking=True)`` reads from):

- bare: ``pq.read_table`` of each shard file's ``audio`` and ``split`` columns, ``np.frombuffer`` over the PCM
  bytes (mdlda/pcm.py), the train rows copied straight into the tensor; files in a seeded random order, one
  process, no Ray. The reference the targets are stated against: reading the same bytes with pyarrow and nothing
  else around it.
- bare preadv: the floor under any reader of these files: each train segment's PCM read with one ``preadv``
  straight into the tensor at the offset its one-row row group's footer gives.
- shards: ``pipelines.batches.train_batches`` over the streamed set as ``load_stage_data`` makes it (a Dataset
  carrying its row index, pipelines/shard_reader.py): a seeded permutation of all rows every epoch, each segment
  read by one ``preadv`` into its batch by a background thread, no Ray Data executor.
- shards via Ray Data random_shuffle: the previous path, the same Dataset without the index: Ray Data streams the
  Parquet files every epoch through its seeded ``random_shuffle``.
- materialised: the same over the dataset held in the object store in one-row blocks (what ``load_stage_data``
  does when it fits), where the global shuffle is a seeded random block order.

CPU time is that of this process and all its descendants (Ray's workers and daemons: ``ray.init`` here starts a
private 2-CPU Ray), live ones and those that exited in between (their reaped CPU, as their parents' children
times), so "seg/s per core" = segments / CPU seconds. The ways are run in interleaved rounds (bare, bare preadv,
shards, Ray Data shuffle, materialised, then again) so other load on the machine hits all of them; the fastest
round of each (by CPU) is reported, with every round's figure.

GPU demand: a GPU of ``--gpu-tflops`` peak at ``--efficiency`` trains peak x efficiency / FLOPs-per-sample
segments/s; the FLOPs per training sample (forward + backward) are counted with ``FlopCounterMode`` on the
RF-ResNet at ``--width`` (or given with ``--gflop-per-sample``). Divided by the measured seg/s per core, that is
the CPUs a GPU trial needs to never wait for data.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

os.environ["RAY_AUTH_MODE"] = "disabled"  # before any ray import
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"

import numpy as np  # noqa: E402
import psutil  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))  # bench/prepare.py's set builder
# a read-only numpy view (the shard bytes) is copied into the host tensor, never written
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clips", type=int, default=600, help="Mid-level clips in the shards")
    p.add_argument("--batch", type=int, default=32, help="segments per training batch")
    p.add_argument("--epochs", type=int, default=3, help="epochs per timed run")
    p.add_argument("--repeat", type=int, default=3, help="interleaved rounds; the fastest of each way is reported")
    p.add_argument("--out", default="/tmp/mdlda-bench-datapath", help="work folder (demo, shards, results.json)")
    p.add_argument("--gpu-tflops", type=float, default=989.0, help="GPU peak, TFLOP/s (H100 SXM bf16 dense: 989)")
    p.add_argument("--efficiency", type=float, default=0.25, help="share of the peak a training step reaches")
    p.add_argument("--gflop-per-sample", type=float, help="training FLOPs per segment (default: counted)")
    p.add_argument("--width", type=int, default=128, help="RF-ResNet width whose FLOPs are counted")
    p.add_argument("--skip-ray-shuffle", action="store_true", help="leave out the previous Ray Data shuffle path")
    return p.parse_args()


def tree_cpu() -> float:
    """CPU seconds (user + system) of this process and its live descendants, plus those of every descendant that
    exited and was reaped (its parent's ``children_user`` / ``children_system``: a Ray worker that exits between
    two readings is counted by its raylet's)."""
    total = 0.0
    for p in [psutil.Process(), *psutil.Process().children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
        except psutil.Error:
            pass
    return total


def host_tensor(batch: int, samples: int):
    import torch

    pinned = torch.cuda.is_available()
    return torch.empty((batch, samples), dtype=torch.int16, pin_memory=pinned), pinned


def bare(files: list[Path], out, batch: int, epochs: int) -> int:
    """Read each file's PCM, copy its train rows into ``out`` batch by batch; segments delivered."""
    import pyarrow.parquet as pq

    from mdlda.pcm import from_column

    host = out.numpy()
    n = 0
    for epoch in range(epochs):
        for f in np.random.default_rng(epoch).permutation(files):
            t = pq.read_table(f, columns=["audio", "split"])
            train = t.column("split").to_numpy(zero_copy_only=False) == "train"
            rows = [r for c in t.column("audio").chunks for r in from_column(c)]  # views of each row group's bytes
            picked = [r for r, keep in zip(rows, train, strict=True) if keep]
            for i in range(0, len(picked), batch):
                for j, r in enumerate(picked[i : i + batch]):
                    host[j] = r
                n += len(picked[i : i + batch])
    return n


def bare_pread(files: list[Path], out, batch: int, epochs: int) -> int:
    """The floor under any reader of these files: each train segment's PCM read with one ``preadv`` straight into
    the host tensor, at the offset its one-row row group's footer gives (as pipelines/shard_reader.py does, without
    its shuffle, batch arrays and thread); segments delivered."""
    import pyarrow.parquet as pq

    from pipelines.shard_index import AUDIO, _leaf, _pcm_offset

    host, n, width = out.numpy(), 0, out.shape[1] * 2
    for epoch in range(epochs):
        for f in np.random.default_rng(epoch).permutation(files):
            pf = pq.ParquetFile(f)
            md, leaf = pf.metadata, _leaf(pf.metadata, AUDIO)
            train = pf.read(columns=["split"]).column("split").to_numpy(zero_copy_only=False) == "train"
            offsets = [_pcm_offset(md, int(g), leaf, width) for g in np.flatnonzero(train)]  # one row per row group
            fd = os.open(f, os.O_RDONLY)
            try:
                for i in range(0, len(offsets), batch):
                    for j, at in enumerate(offsets[i : i + batch]):
                        assert os.preadv(fd, [host[j]], at) == width
                    n += len(offsets[i : i + batch])
            finally:
                os.close(fd)
    return n


def ray_way(ds, out, batch: int, epochs: int, global_shuffle: bool) -> int:
    import torch

    from pipelines.batches import Sampling, train_batches

    n = 0
    for epoch in range(epochs):
        for b in train_batches(ds, Sampling(batch, seed=0, global_shuffle=global_shuffle), epoch):
            k = len(b["audio"])
            out[:k].copy_(torch.from_numpy(b["audio"]))
            n += k
    return n


def timed(fn) -> dict:
    c0, t0 = tree_cpu(), time.perf_counter()
    n = fn()
    wall, cpu = time.perf_counter() - t0, tree_cpu() - c0
    return {"segments": n, "wall_s": wall, "cpu_s": cpu, "per_core": n / cpu, "per_s": n / wall, "cores": cpu / wall}


def gflop_per_sample(width: int) -> float:
    """Forward + backward FLOPs of one 15-s segment through the RF-ResNet at ``width`` (counted, batch of 2)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from mdlda.models import create_model
    from mdlda.params import SEGMENT_SAMPLES

    model = create_model("rfresnet", width=width).train()
    x = 0.1 * torch.randn(2, SEGMENT_SAMPLES)
    with FlopCounterMode(display=False) as counter:
        model(x).sum().backward()
    return counter.get_total_flops() / 2 / 1e9


def make_shards(args: argparse.Namespace, out: Path) -> Path:
    from prepare import build_set

    from mdlda.datasets import generate_demo
    from pipelines.prepare import PrepareConfig, prepare

    shards = out / f"shards-{args.clips}"
    if (shards / "manifest.json").exists():
        return shards
    demo = out / "demo" / "midlevel"
    if not (demo / "metadata_annotations" / "metadata.csv").exists():
        generate_demo(out / "demo", seed=0, size="small")
    root = build_set(demo, out / f"set-{args.clips}", args.clips)[0].parents[1]
    prepare(PrepareConfig("midlevel", str(root), str(shards), progress=False))
    return shards


def main() -> None:
    args = parse_args()
    import ray
    import torch

    from mdlda.manifest import DATA_DIR
    from mdlda.params import SEGMENT_SAMPLES
    from pipelines.data import TRAIN_COLUMNS, _materialize
    from pipelines.shard_dataset import _attach_index
    from pipelines.shard_index import build_index
    from pipelines.shards import read_shards

    torch.set_num_threads(1)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    tmp = str(out / "ray")
    for attempt in range(6):  # on a loaded machine the raylet can miss Ray's 30-s start-up deadline
        try:
            ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=tmp)
            break
        except Exception as exc:  # noqa: BLE001
            print(f"ray.init attempt {attempt + 1} failed: {exc}", file=sys.stderr)
            ray.shutdown()
    else:
        raise SystemExit("could not start a local Ray")
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars, ctx.print_on_execution_start = False, False
    shards = make_shards(args, out)
    files = sorted((shards / DATA_DIR).glob("*.parquet"))
    t0 = time.perf_counter()
    streamed, manifest = read_shards(shards, splits=["train"], columns=TRAIN_COLUMNS)
    streamed = _attach_index(streamed, build_index(shards, ["train"], TRAIN_COLUMNS))  # as load_stage_data does
    index_s = time.perf_counter() - t0
    lazy, _ = read_shards(shards, splits=["train"], columns=TRAIN_COLUMNS)  # no index: Ray Data runs it
    held = _materialize(lazy, rows_per_block=1)
    buf, pinned = host_tensor(args.batch, SEGMENT_SAMPLES)
    ways = {
        "bare read -> host tensor": lambda: bare(files, buf, args.batch, args.epochs),
        "bare preadv -> host tensor": lambda: bare_pread(files, buf, args.batch, args.epochs),
        "shards (seeded row permutation)": lambda: ray_way(streamed, buf, args.batch, args.epochs, True),
        "shards via Ray Data random_shuffle": lambda: ray_way(lazy, buf, args.batch, args.epochs, True),
        "materialised (global shuffle)": lambda: ray_way(held, buf, args.batch, args.epochs, True),
    }
    if args.skip_ray_shuffle:
        del ways["shards via Ray Data random_shuffle"]
    for fn in ways.values():  # warm-up: workers started, files in the page cache
        fn()
    rounds: dict[str, list[dict]] = {k: [] for k in ways}
    for _ in range(args.repeat):
        for name, fn in ways.items():
            rounds[name].append(timed(fn))
    best = {k: max(v, key=lambda r: r["per_core"]) for k, v in rounds.items()}
    ref = best["bare read -> host tensor"]["per_core"]
    gflop = args.gflop_per_sample or gflop_per_sample(args.width)
    demand = args.gpu_tflops * 1e12 * args.efficiency / (gflop * 1e9)
    res = {
        "args": vars(args),
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "train_rows": manifest["counts"]["train"],
        "index_build_s": index_s,
        "pinned": pinned,
        "rounds": rounds,
        "best": best,
        "gflop_per_sample": gflop,
        "gpu_demand_seg_s": demand,
    }
    (out / "results.json").write_text(json.dumps(res, indent=2))
    ray.shutdown()

    print(
        f"{manifest['counts']['train']} train segments x {args.epochs} epochs, batches of {args.batch}; host tensor "
        f"{'pinned' if pinned else 'not pinned (no CUDA here)'}; load average before {load_before[0]:.1f}, "
        f"after {res['load_after'][0]:.1f}\n"
    )
    print(f"row index of the streamed set built in {index_s:.2f} s (footers and small columns of every file)\n")
    print(f"{'delivered as training batches':38}{'seg/s/core':>11}{'vs bare':>8}{'seg/s':>8}{'cores':>6}  rounds")
    for name, b in best.items():
        every = "/".join(f"{r['per_core']:.0f}" for r in rounds[name])
        print(
            f"{name:38}{b['per_core']:>11.0f}{b['per_core'] / ref:>7.2f}x{b['per_s']:>8.0f}{b['cores']:>6.2f}  {every}"
        )
    print("\ntargets: shards and materialised >= 0.8x of bare; >= 2,000 seg/s per core from shards")
    print(
        f"\nGPU demand: {gflop:.1f} GFLOP per training segment (RF-ResNet width {args.width}, fwd + bwd); a "
        f"{args.gpu_tflops:.0f}-TFLOP/s GPU at {args.efficiency:.0%} trains {demand:,.0f} segments/s"
    )
    for name in list(best)[2:]:
        print(f"  CPUs per GPU to keep up, {name}: {demand / best[name]['per_core']:.1f}")
    print(f"\nresults: {out / 'results.json'}")


if __name__ == "__main__":
    main()
