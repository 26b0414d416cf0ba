"""Prepare-stage throughput and memory: Ray prepare vs pure decode vs a naive librosa loop, at N and 10N files.

    python bench/prepare.py [--n 20] [--scale 10] [--out /tmp/mdlda-bench-prepare]

Input: Mid-level clips from ``generate_demo(size="small")`` (224 MP3s of ~15 s at 44.1 kHz, generated once into
``<out>/demo`` and reused), copied into a folder of the first N and one of the first 10N clips (beyond 224 the
clips repeat under new song ids and new artists, so the artist-exclusive split still works). On each set:

- prepare: ``pipelines.prepare.prepare`` on a local Ray with 2 CPUs, in a fresh subprocess per set; a warm-up
  prepare of the N set first (Ray start, imports, worker start-up), then only one ``prepare()`` call into a
  fresh folder is timed;
- pure decode (the limit): ``mdlda.audio.load`` (libsndfile + soxr-HQ to 22.05 kHz mono) over a
  ``ProcessPoolExecutor(2)``, results discarded, after a warm-up;
- naive: ``librosa.load(path, sr=22050, mono=True)`` one file after another, after a warm-up file.

"cores" is the CPU time of the measured process tree over wall time (2.0 = both cores busy); on a shared
machine a low value with many idle-able tasks means other work took the CPUs.

Memory: during the timed ``prepare()`` a thread samples every 0.1 s the RSS of the driver and of its process tree:
Ray's gcs_server, raylet, dashboard and agents ("daemons") and all other, ``ray::*``, processes ("workers"); every
0.5 s also the plasma store's bytes in use. Only the driver's own tree counts, since other Ray sessions on a shared
machine have ``ray::`` processes too. RSS sums count pages shared between processes once per process.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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
MIB = 2**20


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=20, help="files in the small set (N)")
    p.add_argument("--scale", type=int, default=10, help="the large set has scale x N files")
    p.add_argument("--out", default="/tmp/mdlda-bench-prepare", help="work folder; results.json goes here")
    p.add_argument("--chunk-items", type=int, default=None, help="PrepareConfig.chunk_items (default: its own)")
    p.add_argument("--rows-per-file", type=int, default=None, help="PrepareConfig.rows_per_file (default: its own)")
    p.add_argument("--child", help=argparse.SUPPRESS)  # internal: prepare this set in this process
    p.add_argument("--warm", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    return p.parse_args()


def build_set(demo: Path, dst: Path, k: int) -> list[Path]:
    """A Mid-level folder with the first ``k`` clips of ``demo`` (repeated under new ids/artists past its end)."""
    import pandas as pd

    from mdlda.datasets.midlevel import ANNOTATIONS, AUDIO_DIR, METADATA

    ann = pd.read_csv(demo / ANNOTATIONS, dtype={"song_id": str})
    meta = pd.read_csv(demo / METADATA, sep=";", dtype={"song id": str}).set_index("song id")
    shutil.rmtree(dst, ignore_errors=True)
    (dst / AUDIO_DIR).mkdir(parents=True)
    (dst / ANNOTATIONS.parent).mkdir(parents=True)
    rows = [ann.iloc[j % len(ann)] for j in range(k)]
    new_ann = pd.DataFrame(rows).reset_index(drop=True)
    new_ann["song_id"] = [str(j + 1) for j in range(k)]
    new_meta = meta.loc[[r["song_id"] for r in rows]].reset_index(drop=True)
    reps = [j // len(ann) for j in range(k)]
    new_meta["Artist"] = [a if r == 0 else f"{a} (copy {r})" for a, r in zip(new_meta["Artist"], reps, strict=True)]
    new_meta.insert(0, "song id", new_ann["song_id"])
    new_meta["file name"] = [f"{int(s):05d}.mp3" for s in new_ann["song_id"]]
    paths = []
    for r, sid in zip(rows, new_ann["song_id"], strict=True):
        paths.append(dst / AUDIO_DIR / f"{sid}.mp3")
        shutil.copyfile(demo / AUDIO_DIR / f"{r['song_id']}.mp3", paths[-1])
    new_ann.to_csv(dst / ANNOTATIONS, index=False)
    new_meta.to_csv(dst / METADATA, sep=";", index=False)
    return paths


def tree_cpu(proc: psutil.Process) -> dict[int, float]:
    """CPU seconds (user + system) of ``proc`` and its live descendants, by pid."""
    out = {}
    for p in [proc, *proc.children(recursive=True)]:
        try:
            t = p.cpu_times()
            out[p.pid] = t.user + t.system
        except psutil.Error:
            pass
    return out


def cores_used(before: dict[int, float], after: dict[int, float], wall: float) -> float:
    return sum(t - before.get(pid, 0.0) for pid, t in after.items()) / wall


class Sampler(threading.Thread):
    """Peak RSS of the driver, its Ray workers and Ray daemons (sum over processes), and plasma bytes used."""

    def __init__(self, every: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.every, self.halt, self.kinds = every, threading.Event(), {}
        self.peak = dict.fromkeys(("total", "driver_workers", "driver", "workers", "daemons", "n_workers"), 0)
        self.daemons_min, self.object_store = float("inf"), {"peak": None, "error": None}

    def _kind(self, p: psutil.Process) -> str:
        if p.pid not in self.kinds:
            cmd = " ".join(p.cmdline()) or p.name()
            self.kinds[p.pid] = "daemons" if any(d in cmd for d in DAEMONS) else "workers"
        return self.kinds[p.pid]

    def sample(self) -> None:
        me = psutil.Process()
        mem = {"driver": me.memory_info().rss, "workers": 0, "daemons": 0, "n_workers": 0}
        for p in me.children(recursive=True):
            try:
                kind, rss = self._kind(p), p.memory_info().rss
            except psutil.Error:
                continue
            mem[kind] += rss
            mem["n_workers"] += kind == "workers"
        mem["driver_workers"] = mem["driver"] + mem["workers"]
        mem["total"] = mem["driver_workers"] + mem["daemons"]
        self.peak = {k: max(v, mem[k]) for k, v in self.peak.items()}
        self.daemons_min = min(self.daemons_min, mem["daemons"])

    def sample_store(self) -> None:
        try:
            from ray._private.internal_api import get_memory_info_reply
            from ray._private.state import state

            used = get_memory_info_reply(state, timeout_seconds=5).store_stats.object_store_bytes_used
            self.object_store["peak"] = max(self.object_store["peak"] or 0, int(used))
        except Exception as exc:  # a private API: report what went wrong instead of failing the benchmark
            self.object_store["error"] = f"{type(exc).__name__}: {exc}"

    def run(self) -> None:
        k = 0
        while True:
            self.sample()
            if k % 5 == 0:
                self.sample_store()
            k += 1
            if self.halt.wait(self.every):
                break

    def stop(self) -> dict:
        self.halt.set()
        self.join()
        self.sample()
        mib = {f"peak_{k}_mib": round(v / MIB, 1) for k, v in self.peak.items() if k != "n_workers"}
        peak_store = self.object_store["peak"]
        return {
            **mib,
            "daemons_min_mib": round(self.daemons_min / MIB, 1),
            "max_worker_processes": self.peak["n_workers"],
            "object_store_peak_mib": None if peak_store is None else round(peak_store / MIB, 2),
            "object_store_error": self.object_store["error"],
        }


def child(args: argparse.Namespace) -> None:
    """Warm up with one prepare of ``--warm``, then time and sample one prepare of ``--child``."""
    import ray

    from pipelines.prepare import PrepareConfig, prepare

    overrides = {k: v for k, v in (("chunk_items", args.chunk_items), ("rows_per_file", args.rows_per_file)) if v}
    ray.init(address="local", num_cpus=2, log_to_driver=False)  # "local": never join another session's Ray
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars, ctx.print_on_execution_start = False, False
    work = Path(args.out)

    def run(root: str, name: str):
        shutil.rmtree(work / name, ignore_errors=True)
        return prepare(PrepareConfig("midlevel", root, str(work / name), progress=False, **overrides))

    run(args.warm, "warm-up")
    me, sampler = psutil.Process(), Sampler()
    cpu0 = tree_cpu(me)
    sampler.start()
    t0 = time.perf_counter()
    res = run(args.child, "timed")
    wall = time.perf_counter() - t0
    memory = sampler.stop()
    result = {"wall_s": wall, "cores": cores_used(cpu0, tree_cpu(me), wall), "rows": res.manifest["rows"]}
    result.update(memory, skipped=len(res.manifest["skipped"]), config=res.manifest["options"]["config"])
    Path(args.result).write_text(json.dumps(result))
    ray.shutdown()


def run_prepare(args: argparse.Namespace, set_dir: Path, warm_dir: Path, name: str) -> dict:
    work, result = Path(args.out) / f"prepare-{name}", Path(args.out) / f"prepare-{name}.json"
    cmd = [sys.executable, __file__, "--child", str(set_dir), "--warm", str(warm_dir), "--out", str(work)]
    cmd += ["--result", str(result)]
    for flag, v in (("--chunk-items", args.chunk_items), ("--rows-per-file", args.rows_per_file)):
        cmd += [flag, str(v)] if v else []
    with open(Path(args.out) / f"prepare-{name}.log", "w") as log:
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)
    return json.loads(result.read_text())


def _decode(path: str) -> int:
    from mdlda.audio import load

    return len(load(path))  # the audio itself is discarded


def pure_decode(paths: list[Path]) -> dict:
    with ProcessPoolExecutor(2) as pool:
        list(pool.map(_decode, map(str, paths[:4])))  # warm-up: start both workers, import, first decode
        me = psutil.Process()
        cpu0, t0 = tree_cpu(me), time.perf_counter()
        list(pool.map(_decode, map(str, paths)))
        wall = time.perf_counter() - t0
        return {"wall_s": wall, "cores": cores_used(cpu0, tree_cpu(me), wall)}


def naive(paths: list[Path]) -> dict:
    import librosa

    librosa.load(paths[0], sr=22050, mono=True)  # warm-up
    c0, t0 = time.process_time(), time.perf_counter()
    for p in paths:
        librosa.load(p, sr=22050, mono=True)
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "cores": (time.process_time() - c0) / wall}


def machine() -> dict:
    import soundfile

    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "")
    libs = {p: version(p) for p in ("ray", "soundfile", "soxr", "librosa", "pyarrow")}
    return {"nproc": os.cpu_count(), "cpu": cpu or platform.processor(), **libs,
            "libsndfile": soundfile.__libsndfile_version__, "python": platform.python_version()}


def report(res: dict) -> str:
    m, lb, la = res["machine"], res["load_before"], res["load_after"]
    lines = [
        f"machine: nproc {m['nproc']}, {m['cpu']}; python {m['python']}, ray {m['ray']}, soundfile {m['soundfile']} "
        f"(libsndfile {m['libsndfile']}), soxr {m['soxr']}, librosa {m['librosa']}, pyarrow {m['pyarrow']}",
        "load average 1/5/15 min: before " + "/".join(f"{x:.2f}" for x in lb)
        + ", after " + "/".join(f"{x:.2f}" for x in la),
        f"prepare config: {res['prepare_config']}",
        "",
        f"{'throughput':<26}{'files':>6}{'audio s':>9}{'wall s':>8}{'files/s':>9}{'audio-s/s':>11}{'cores':>7}",
    ]
    for name, s in res["sets"].items():
        for how, label in (("prepare", "prepare (Ray, 2 CPUs)"), ("decode", "pure decode (2 procs)"),
                           ("naive", "naive librosa loop")):
            t = res["throughput"][name][how]
            lines.append(f"{label + ' ' + name:<26}{s['files']:>6}{s['audio_s']:>9.0f}{t['wall_s']:>8.2f}"
                         f"{t['files_per_s']:>9.2f}{t['audio_s_per_s']:>11.1f}{t['cores']:>7.2f}")
    lines.append("")
    for name, r in res["ratios"].items():
        lines.append(f"{name}: prepare / pure decode = {r['prepare_vs_decode']:.2f}x (target >= 0.8x), "
                     f"prepare / naive = {r['prepare_vs_naive']:.2f}x")
    (a, ma), (b, mb) = res["memory"].items()
    lines += ["", f"{'peak during prepare()':<34}{a:>10}{b:>10}{'ratio':>8}"]
    for key, label in (("peak_driver_workers_mib", "RSS driver + workers (MiB)"),
                       ("peak_driver_mib", "  driver alone (MiB)"), ("peak_workers_mib", "  workers alone (MiB)"),
                       ("peak_daemons_mib", "RSS Ray daemons (MiB)"), ("daemons_min_mib", "  daemons, minimum (MiB)"),
                       ("peak_total_mib", "RSS total (MiB)"), ("max_worker_processes", "worker processes (max)"),
                       ("object_store_peak_mib", "object store used (MiB)")):
        x, y = ma.get(key), mb.get(key)
        ratio = f"{y / x:>7.2f}x" if x and y is not None else f"{'-':>8}"
        lines.append(f"{label:<34}{x!s:>10}{y!s:>10}{ratio}")
    lines.append(f"peak RSS (driver + workers) {b} / {a} = {res['rss_ratio']:.2f}x (target <= 1.3x)")
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    if args.child:
        return child(args)
    import soundfile as sf

    from mdlda.datasets import generate_demo

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    args.out = str(out)
    res: dict = {"load_before": os.getloadavg(), "machine": machine(), "args": vars(args)}
    demo = out / "demo" / "midlevel"
    if not (demo / "metadata_annotations" / "metadata.csv").exists():
        generate_demo(out / "demo", seed=0, size="small")
    sizes = {"N": args.n, f"{args.scale}N": args.n * args.scale}
    paths = {name: build_set(demo, out / "sets" / f"n{k}", k) for name, k in sizes.items()}
    res["sets"] = {
        name: {"files": len(p), "audio_s": sum(sf.info(str(f)).duration for f in p), "root": str(p[0].parents[1])}
        for name, p in paths.items()
    }
    warm = res["sets"]["N"]["root"]
    thr = {name: {"prepare": run_prepare(args, Path(s["root"]), Path(warm), name)} for name, s in res["sets"].items()}
    for name in sizes:  # the limit right after prepare, then the naive loop
        thr[name]["decode"] = pure_decode(paths[name])
    for name in sizes:
        thr[name]["naive"] = naive(paths[name])
    for name, s in res["sets"].items():
        for t in thr[name].values():
            t.update(files_per_s=s["files"] / t["wall_s"], audio_s_per_s=s["audio_s"] / t["wall_s"])
    res["throughput"], res["load_after"] = thr, os.getloadavg()
    res["prepare_config"] = {k: v for k, v in thr["N"]["prepare"].pop("config").items()
                             if k in ("chunk_items", "rows_per_file", "num_cpus_per_task")}
    thr[f"{args.scale}N"]["prepare"].pop("config")
    res["ratios"] = {  # same files, so the throughput ratio is the inverse wall-time ratio
        name: {f"prepare_vs_{how}": t[how]["wall_s"] / t["prepare"]["wall_s"] for how in ("decode", "naive")}
        for name, t in thr.items()
    }
    timing = ("wall_s", "cores", "files_per_s", "audio_s_per_s")
    res["memory"] = {name: {k: v for k, v in t["prepare"].items() if k not in timing} for name, t in thr.items()}
    mem = list(res["memory"].values())
    res["rss_ratio"] = mem[1]["peak_driver_workers_mib"] / mem[0]["peak_driver_workers_mib"]
    (out / "results.json").write_text(json.dumps(res, indent=2))
    print(report(res))
    print(f"\nresults: {out / 'results.json'}")


if __name__ == "__main__":
    main()
