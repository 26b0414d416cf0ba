"""Prepare-stage throughput and memory: Ray prepare vs pure decode vs a naive librosa loop, at N and 10N files.

    python bench/prepare.py [--n 20] [--scale 10] [--repeat 3] [--out /tmp/mdlda-bench-prepare]

Input: the first N and 10N Mid-level clips of ``generate_demo(size="small")`` (224 MP3s, ~15 s, 44.1 kHz; made
once in ``<out>/demo``; past 224 clips repeat under new song ids and artists). Measured on each folder:

- prepare: ``pipelines.prepare``, ``ray.init(num_cpus=2)`` in a fresh subprocess, timed after a warm-up prepare of
  the N folder;
- pure decode (the target's reference): the per-file code path prepare runs, ``mdlda.shards.decode_item`` (decode,
  resample, crop/pad, int16, row digest), rows discarded;
- decode only: ``mdlda.audio.load`` alone (the reference of earlier runs);
- decode + write: prepare's task body (``pipelines.prepare.decode_group``: decode_item, Arrow table, one Parquet
  file per group of items, grouped as prepare groups them) without Ray: what is left is Ray's own cost;
- a naive ``librosa.load(sr=22050)`` loop.

The three pools are ``ProcessPoolExecutor(2)`` at the niceness read from a Ray worker (Ray runs its workers at
nice 15, RAY_worker_niceness), warmed up first; the naive loop runs at ours. Each is timed ``--repeat`` times and
the fastest run is reported (the least disturbed by other work on a shared machine). "cores" is CPU time of the measured
process tree / wall time; "CPU ms/file" moves far less than wall time when other work shares the machine. During the
timed ``prepare()`` a thread sums every 0.1 s the RSS of the driver's process tree: Ray daemons (gcs_server,
raylet, dashboard, agents) and workers (every other ``ray::`` process; other Ray sessions on the machine are not
counted); every 0.5 s it reads plasma's bytes in use; the peak over all timed runs is reported. Shared pages count
once per process.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from importlib.metadata import version
from pathlib import Path

os.environ["RAY_AUTH_MODE"] = "disabled"  # before any ray import, here and in the subprocesses
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"

import psutil  # noqa: E402

DAEMONS = ("gcs_server", "raylet", "dashboard", "DashboardAgent", "log_monitor", "runtime_env", "monitor.py")
KNOBS = ("chunk_items", "files_per_task")  # PrepareConfig options the command line can override


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=20, help="files in the small folder (N)")
    p.add_argument("--scale", type=int, default=10, help="the large folder holds scale x N files")
    p.add_argument("--out", default="/tmp/mdlda-bench-prepare", help="work folder; results.json goes here")
    p.add_argument("--repeat", type=int, default=3, help="timed runs of each; the fastest is reported")
    for knob in KNOBS:
        p.add_argument(f"--{knob.replace('_', '-')}", type=int, help=f"PrepareConfig.{knob} (default: its own)")
    for internal in ("--child", "--warm", "--result"):  # a subprocess preparing one folder
        p.add_argument(internal, help=argparse.SUPPRESS)
    return p.parse_args()


def build_set(demo: Path, dst: Path, k: int) -> list[Path]:
    """A Mid-level folder with the first ``k`` clips of ``demo`` (repeated under new ids/artists past its end)."""
    import pandas as pd

    from mdlda.datasets.midlevel import ANNOTATIONS, AUDIO_DIR, METADATA

    ann = pd.read_csv(demo / ANNOTATIONS, dtype={"song_id": str})
    meta = pd.read_csv(demo / METADATA, sep=";", dtype={"song id": str}).set_index("song id")
    pick = [j % len(ann) for j in range(k)]
    old_ids, new_ids = list(ann["song_id"].iloc[pick]), [str(j + 1) for j in range(k)]
    new_ann = ann.iloc[pick].assign(song_id=new_ids)
    new_meta = meta.loc[old_ids].reset_index(drop=True)
    new_meta["Artist"] = [a if j < len(ann) else f"{a} (copy {j // len(ann)})" for j, a in enumerate(new_meta.Artist)]
    new_meta.insert(0, "song id", new_ids)
    new_meta["file name"] = [f"{j + 1:05d}.mp3" for j in range(k)]
    shutil.rmtree(dst, ignore_errors=True)
    (dst / ANNOTATIONS.parent).mkdir(parents=True)
    (dst / AUDIO_DIR).mkdir()
    new_ann.to_csv(dst / ANNOTATIONS, index=False)
    new_meta.to_csv(dst / METADATA, sep=";", index=False)
    for old, new in zip(old_ids, new_ids, strict=True):
        shutil.copyfile(demo / AUDIO_DIR / f"{old}.mp3", dst / AUDIO_DIR / f"{new}.mp3")
    return [dst / AUDIO_DIR / f"{new}.mp3" for new in new_ids]


def tree_cpu() -> dict[int, float]:
    """CPU seconds (user + system) of this process and its live descendants, by pid."""
    out = {}
    for p in [psutil.Process(), *psutil.Process().children(recursive=True)]:
        try:
            out[p.pid] = sum(p.cpu_times()[:2])
        except psutil.Error:
            pass
    return out


def timed(fn) -> dict:
    cpu0, load, t0 = tree_cpu(), os.getloadavg()[0], time.perf_counter()
    out = fn()
    wall = time.perf_counter() - t0
    cpu = sum(t - cpu0.get(pid, 0.0) for pid, t in tree_cpu().items())
    return {"wall_s": wall, "cpu_s": cpu, "cores": cpu / wall, "load1": load, **(out if isinstance(out, dict) else {})}


def fastest(runs: list[dict]) -> dict:
    """The run with the least wall time (the one least disturbed by other work), with every run's wall time."""
    return min(runs, key=lambda r: r["wall_s"]) | {"walls_s": [round(r["wall_s"], 3) for r in runs]}


class Sampler(threading.Thread):
    """Peak summed RSS (MiB) of the driver, Ray workers and Ray daemons, and peak plasma bytes used."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.halt, self.kinds, self.store_error = threading.Event(), {}, None
        self.peak = dict.fromkeys(("total", "driver_workers", "driver", "workers", "daemons", "store"), 0.0)
        self.peak |= {"n_workers": 0, "daemons_min": float("inf")}

    def sample(self, store: bool) -> None:
        me = psutil.Process()
        mem = {"driver": me.memory_info().rss / 2**20, "workers": 0.0, "daemons": 0.0, "n_workers": 0}
        for p in me.children(recursive=True):
            try:
                if p.pid not in self.kinds:
                    cmd = " ".join(p.cmdline()) or p.name()
                    self.kinds[p.pid] = "daemons" if any(d in cmd for d in DAEMONS) else "workers"
                kind = self.kinds[p.pid]
                mem[kind] += p.memory_info().rss / 2**20
            except psutil.Error:
                continue
            mem["n_workers"] += kind == "workers"
        mem["driver_workers"] = mem["driver"] + mem["workers"]
        mem["total"], mem["daemons_min"] = mem["driver_workers"] + mem["daemons"], mem["daemons"]
        if store:
            try:  # a private API: record the failure rather than stop the benchmark
                from ray._private.internal_api import get_memory_info_reply
                from ray._private.state import state

                mem["store"] = get_memory_info_reply(state).store_stats.object_store_bytes_used / 2**20
            except Exception as exc:
                self.store_error = f"{type(exc).__name__}: {exc}"
        self.peak = {k: (min if k == "daemons_min" else max)(v, mem.get(k, v)) for k, v in self.peak.items()}

    def run(self) -> None:
        k = 0
        while not self.halt.wait(0 if k == 0 else 0.1):
            self.sample(store=k % 5 == 0)
            k += 1
        self.cpu_s = time.thread_time()  # this thread's own CPU, taken out of prepare's

    def stop(self) -> dict:
        self.halt.set()
        self.join()
        self.sample(store=True)
        return {"rss_mib": {k: round(v, 1) for k, v in self.peak.items()}, "store_error": self.store_error}


def child(args: argparse.Namespace) -> None:
    """Warm up with one prepare of ``--warm``, then time and sample one prepare of ``--child``."""
    import ray

    from pipelines.prepare import PrepareConfig, prepare

    knobs = {k: getattr(args, k) for k in KNOBS if getattr(args, k)}
    for attempt in range(3):  # on a loaded machine the raylet can miss Ray's 30-s start-up deadline
        try:
            ray.init(address="local", num_cpus=2, log_to_driver=False)  # "local": never join another session's Ray
            break
        except Exception as exc:  # noqa: BLE001
            print(f"ray.init attempt {attempt + 1} failed: {exc}", file=sys.stderr)
            ray.shutdown()
    else:
        raise SystemExit("could not start a local Ray")
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars, ctx.print_on_execution_start = False, False

    def run(root: str, name: str):
        shutil.rmtree(Path(args.out) / name, ignore_errors=True)
        return prepare(PrepareConfig("midlevel", root, str(Path(args.out) / name), progress=False, **knobs))

    run(args.warm, "warm-up")
    worker_nice = ray.get(ray.remote(num_cpus=1)(lambda: os.nice(0)).remote())
    runs = []
    for _ in range(args.repeat):  # each into a new folder: a full prepare every time
        sampler = Sampler()
        sampler.start()
        res = timed(lambda: {"rows": run(args.child, "timed").manifest["rows"]})
        res.update(sampler.stop())
        res["cpu_s"] -= sampler.cpu_s
        res["cores"], res["sampler_cpu_s"] = res["cpu_s"] / res["wall_s"], sampler.cpu_s
        runs.append(res)
    res = fastest(runs) | {"worker_nice": worker_nice}
    peaks = [r["rss_mib"] for r in runs]  # memory: the peak over all runs
    res["rss_mib"] = {k: (min if k == "daemons_min" else max)(p[k] for p in peaks) for k in peaks[0]}
    res["config"] = {k: v for k, v in vars(PrepareConfig("midlevel", "", "", **knobs)).items() if k in KNOBS}
    Path(args.result).write_text(json.dumps(res))
    ray.shutdown()


def run_prepare(args: argparse.Namespace, folder: str, warm: str, name: str) -> dict:
    out = Path(args.out)
    cmd = [sys.executable, __file__, "--child", folder, "--warm", warm, "--out", str(out / f"prepare-{name}")]
    cmd += ["--result", str(out / f"prepare-{name}.json"), "--repeat", str(args.repeat)]
    cmd += [x for k in KNOBS if getattr(args, k) for x in (f"--{k.replace('_', '-')}", str(getattr(args, k)))]
    with open(out / f"prepare-{name}.log", "w") as log:  # Ray's own logging goes here
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)
    return json.loads((out / f"prepare-{name}.json").read_text())


def _decode_item(item: dict) -> int:
    from mdlda.shards import decode_item

    res = decode_item(item)
    if res.error:
        raise RuntimeError(res.error)
    return len(res.rows)  # the rows themselves are discarded


def _load(item: dict) -> int:
    from mdlda.audio import load

    return len(load(item["path"]))


def _decode_write(job: tuple[list[dict], str]) -> int:
    from pipelines.prepare_decode import decode_group

    return len(decode_group(*job))


def _renice(nice: int) -> None:
    os.nice(nice - os.nice(0))


def pure_decode(root: str, fn, nice: int, repeat: int, write_to: Path | None = None, per_task: int = 16) -> dict:
    """``fn`` over every item of the folder's index in a ``ProcessPoolExecutor(2)``, items in index order.

    With ``write_to``, ``fn`` takes groups of items and a Parquet path, grouped as prepare groups them (an even
    number of nearly equal groups of at most ``per_task`` items).
    """
    from mdlda.datasets import index_midlevel

    items = index_midlevel(root).table.to_dict("records")
    jobs = items
    if write_to is not None:
        shutil.rmtree(write_to, ignore_errors=True)
        write_to.mkdir(parents=True)
        n = -(-len(items) // per_task)
        n = -(-n // 2) * 2
        bounds = [len(items) * k // n for k in range(n + 1)]
        jobs = [(items[bounds[k] : bounds[k + 1]], str(write_to / f"part-{k:05d}.parquet")) for k in range(n)]
        items = [(items[k : k + 1], str(write_to / f"warm-{k}.parquet")) for k in range(4)]
    with ProcessPoolExecutor(2, initializer=_renice, initargs=(nice,)) as pool:
        list(pool.map(fn, items[:4]))  # warm-up: both workers started, imports done
        return fastest([timed(lambda: list(pool.map(fn, jobs))) for _ in range(repeat)])


def naive(paths: list[Path], repeat: int) -> dict:
    import librosa

    librosa.load(paths[0], sr=22050, mono=True)  # warm-up
    return fastest([timed(lambda: [librosa.load(p, sr=22050, mono=True) for p in paths]) for _ in range(repeat)])


def report(res: dict) -> str:
    m, fmt = res["machine"], lambda xs: "/".join(f"{x:.2f}" for x in xs)
    lines = [
        f"machine: nproc {m['nproc']}, {m['cpu']}; ray {m['ray']}, soundfile {m['soundfile']} "
        f"(libsndfile {m['libsndfile']}), soxr {m['soxr']}, librosa {m['librosa']}, pyarrow {m['pyarrow']}",
        f"load average 1/5/15 min: before {fmt(res['load_before'])}, after {fmt(res['load_after'])}",
        f"prepare config: {res['prepare_config']}; Ray worker niceness {res['worker_nice']} (pools too)",
        "",
        f"{'throughput':<27}{'files':>6}{'audio s':>8}{'wall s':>8}{'files/s':>8}{'audio-s/s':>10}"
        f"{'cores':>6}{'CPU ms/file':>12}{'load1':>6}",
    ]
    labels = {"prepare": "prepare (Ray, 2 CPUs)", "decode": "pure decode (2 procs)", "load": "decode only (2 procs)"}
    labels |= {"write": "decode + write (2 procs)", "naive": "naive librosa loop"}
    for name, s in res["sets"].items():
        for how, t in res["throughput"][name].items():
            lines.append(
                f"{labels[how] + ' ' + name:<27}{s['files']:>6}{s['audio_s']:>8.0f}{t['wall_s']:>8.2f}"
                f"{t['files_per_s']:>8.2f}{t['audio_s_per_s']:>10.1f}{t['cores']:>6.2f}"
                f"{1000 * t['cpu_s'] / s['files']:>12.1f}{t['load1']:>6.1f}"
            )
    lines.append(
        "wall s of every run: "
        + "; ".join(
            f"{how} {name} {'/'.join(f'{w:.2f}' for w in t['walls_s'])}"
            for name in res["sets"]
            for how, t in res["throughput"][name].items()
        )
    )
    lines.append("")
    for name, r in res["ratios"].items():
        lines.append(
            f"{name}: prepare / pure decode = {r['decode']:.2f}x (target >= 0.8x; by CPU per file "
            f"{r['decode_cpu']:.2f}x)\n  prepare / decode only = {r['load']:.2f}x (by CPU {r['load_cpu']:.2f}x), "
            f"prepare / decode + write = {r['write']:.2f}x (by CPU {r['write_cpu']:.2f}x), "
            f"prepare / naive = {r['naive']:.2f}x (by CPU {r['naive_cpu']:.2f}x)"
        )
    (a, ma), (b, mb) = ((k, v["prepare"]["rss_mib"]) for k, v in res["throughput"].items())
    lines += ["", f"{'peak during prepare(), MiB':<32}{a:>9}{b:>9}{'ratio':>8}"]
    keys = "driver_workers driver workers n_workers daemons daemons_min total store".split()
    labels = "RSS driver + workers|  driver|  workers|  worker processes (count)|RSS Ray daemons|  daemons, lowest"
    for key, label in zip(keys, (labels + "|RSS total|object store used").split("|"), strict=True):
        ratio = f"{mb[key] / ma[key]:>7.2f}x" if ma[key] else f"{'-':>8}"
        lines.append(f"{label:<32}{ma[key]:>9}{mb[key]:>9}{ratio}")
    lines.append(f"peak RSS (driver + workers) {b} / {a} = {res['rss_ratio']:.2f}x (target <= 1.3x)")
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    if args.child:
        return child(args)
    import soundfile as sf

    from mdlda.datasets import generate_demo
    from pipelines.prepare import CLIPS_PER_TASK

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    args.out = str(out)
    cpu = [ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")]
    res: dict = {"load_before": os.getloadavg(), "args": vars(args)}
    res["machine"] = {"nproc": os.cpu_count(), "cpu": cpu[0] if cpu else "?", "libsndfile": sf.__libsndfile_version__}
    res["machine"] |= {p: version(p) for p in ("ray", "soundfile", "soxr", "librosa", "pyarrow")}
    demo = out / "demo" / "midlevel"
    if not (demo / "metadata_annotations" / "metadata.csv").exists():
        generate_demo(out / "demo", seed=0, size="small")
    sizes = {"N": args.n, f"{args.scale}N": args.n * args.scale}
    paths = {name: build_set(demo, out / "sets" / f"n{k}", k) for name, k in sizes.items()}
    res["sets"] = {n: {"files": len(p), "audio_s": sum(sf.info(str(f)).duration for f in p)} for n, p in paths.items()}
    roots = {name: str(p[0].parents[1]) for name, p in paths.items()}
    thr = {name: {"prepare": run_prepare(args, root, roots["N"], name)} for name, root in roots.items()}
    nice = thr["N"]["prepare"]["worker_nice"]
    for name in reversed(sizes):  # the limit of the large folder right after its prepare run
        thr[name]["decode"] = pure_decode(roots[name], _decode_item, nice, args.repeat)
        thr[name]["load"] = pure_decode(roots[name], _load, nice, args.repeat)
        per_task = args.files_per_task or CLIPS_PER_TASK
        thr[name]["write"] = pure_decode(roots[name], _decode_write, nice, args.repeat, out / "pool-write", per_task)
    for name in sizes:
        thr[name]["naive"] = naive(paths[name], args.repeat)
    res["load_after"] = os.getloadavg()
    res["prepare_config"], res["worker_nice"] = thr["N"]["prepare"]["config"], nice
    for name, s in res["sets"].items():
        for t in thr[name].values():
            t.update(files_per_s=s["files"] / t["wall_s"], audio_s_per_s=s["audio_s"] / t["wall_s"])
    res["throughput"], res["ratios"] = thr, {}
    for name, t in thr.items():  # same files: a throughput ratio is the inverse ratio of wall (or CPU) times
        hows = ("decode", "load", "write", "naive")
        res["ratios"][name] = {h: t[h]["wall_s"] / t["prepare"]["wall_s"] for h in hows}
        res["ratios"][name] |= {h + "_cpu": t[h]["cpu_s"] / t["prepare"]["cpu_s"] for h in hows}
    big, small = thr[f"{args.scale}N"]["prepare"]["rss_mib"], thr["N"]["prepare"]["rss_mib"]
    res["rss_ratio"] = big["driver_workers"] / small["driver_workers"]
    (out / "results.json").write_text(json.dumps(res, indent=2, default=str))
    print(report(res))
    print(f"\nresults: {out / 'results.json'}")


if __name__ == "__main__":
    main()
