"""Training throughput under Ray vs a bare loop, and the sweep's CPU utilisation, side by side in one run.

    python bench/train.py [--width 32] [--epochs 3] [--clips 96] [--rounds 2] [--threads 1] [--trials 4]
                          [--demo-size small] [--out /tmp/bench_train]

Data: the generated demo (``generate_demo``, ``--demo-size``: small = 200 source clips, tiny = 40) prepared into
real shards (``pipelines.prepare``, Mid-level with eval_fraction 0.15 (tiny: 0.25) / valid_fraction 0.4, and
MAESTRO), cached in ``--out``. Width 32 makes an epoch of 96 segments take several seconds on 2 CPUs, so that the
comparison is about the training path, not about timer noise (the old default, width 8 with 48 segments,
had ~1-s epochs).

1. Student, interleaved: bare-1, ray-1, bare-2, ray-2, ..., bare-(rounds+1), so a drifting machine speed (shared
   hosts) hits both sides alike; the headline ratio pools the steady epochs of all Ray runs against those of all
   bare runs, and each Ray run is also compared with the two bare runs either side of it.
   - Ray: ``pipelines.student.train_student`` as the product runs it (TorchTrainer, one worker of ``--threads``
     CPUs, so Ray sets OMP_NUM_THREADS to that; the data is materialized, so Ray Data needs no CPU of its own).
     Distillation needs a labelled target: the Mid-level train split stands in for the pseudo-labelled set
     (labels' meaning is irrelevant to throughput). The source is cut to ``--clips``/2 rows: an epoch puts
     ``--clips`` segments (source + target) through the model.
   - bare: the same model, config, seed and batch size through the same ``mdlda.training.fit`` in the driver,
     ``torch.set_num_threads(--threads)``, batches from Python lists of in-memory numpy arrays.
   Per epoch: ``samples_per_s`` and ``data_wait_fraction`` as the loop reports them (Ray: from
   the history in the last checkpoint, since ``result.metrics_dataframe`` keeps only kept checkpoints), and the
   wall per epoch from outside the loop's timers (bare: between
   ``on_epoch`` calls; Ray: between ``ray.train.report`` calls, timestamped by Ray in the checkpoint folder
   names). Ray's epoch 0 includes the Train start-up: "steady" ratios use epochs >= 1 (epoch 0 if only one).
2. A Tune sweep (``pipelines.teachers.run_sweep``: DANN teachers, FIFO, ``--trials`` x ``--epochs``, MLflow in
   sqlite under ``--out``): utilisation = busy trial-seconds / (wall of the call x CPUs), busy = sum of the
   trials' ``time_total_s`` (also shown: sum of their per-epoch ``seconds``).
Results go to ``<out>/results.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
import uuid
from dataclasses import replace
from datetime import datetime
from pathlib import Path

os.environ["RAY_AUTH_MODE"] = "disabled"  # before any ray import
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"

import numpy as np  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402

from mdlda.checkpoints import load_training_state, seed_everything  # noqa: E402
from mdlda.config import StudentConfig, SweepConfig  # noqa: E402
from mdlda.training import fit  # noqa: E402
from pipelines.data import frontend_stats, load_stage_data  # noqa: E402
from pipelines.student import student_trial_config, train_student  # noqa: E402
from pipelines.trial import build_model  # noqa: E402

KEYS = ("samples_per_s", "data_wait_fraction", "train_seconds", "seconds")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", type=int, default=32, help="RF-ResNet width")
    p.add_argument("--epochs", type=int, default=3, help="epochs of the student runs and of each sweep trial")
    p.add_argument("--clips", type=int, default=96, help="segments (source + target) per student epoch")
    p.add_argument("--rounds", type=int, default=2, help="Ray runs, interleaved with rounds + 1 bare runs")
    p.add_argument("--batch", type=int, default=8, help="clips per domain per step")
    p.add_argument("--threads", type=int, default=1, help="torch threads = CPUs of the Ray Train worker")
    p.add_argument("--trials", type=int, default=4, help="trials in the sweep")
    p.add_argument("--demo-size", default="small", choices=("tiny", "small"), help="demo size (train: 30 / ~150 rows)")
    p.add_argument("--out", default="/tmp/bench_train", help="work folder (data cache, Ray results, JSON)")
    return p.parse_args()


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def build_shards(out: Path, size: str) -> tuple[str, str]:
    from mdlda.datasets import generate_demo
    from pipelines.prepare import PrepareConfig, prepare

    out = out / size
    demo = out / "demo"
    if not (demo / "DONE").exists():
        generate_demo(demo, size=size)
        (demo / "DONE").write_text("ok")
    mid = demo / "midlevel"
    ml = prepare(
        PrepareConfig(
            dataset="midlevel",
            root=str(mid),
            out=str(out / "shards" / "midlevel"),
            piano_ids=str(mid / "piano_ids.csv"),
            eval_fraction=0.25 if size == "tiny" else 0.15,
            valid_fraction=0.4,
            progress=False,
        )
    )
    ma = prepare(
        PrepareConfig(
            dataset="maestro", root=str(demo / "maestro"), out=str(out / "shards" / "maestro"), progress=False
        )
    )
    return ml.out, ma.out


def to_numpy(ds) -> dict[str, np.ndarray]:
    from mdlda.pcm import numpy_batch

    b = numpy_batch(ds.take_batch(ds.count(), batch_format="pyarrow"))  # audio (B, N) int16 from the PCM bytes
    return {"audio": np.asarray(b["audio"]), "labels": np.asarray(b["labels"], dtype=np.float32)}


def bare_run(cfg: StudentConfig, stats, src, tgt, valid, epochs: int, threads: int) -> dict:
    """The student's model/config/seed through ``fit`` in this process, batches from in-memory lists."""
    torch.set_num_threads(threads)
    trial = student_trial_config(cfg)
    train_cfg = trial.train
    bs, rng = train_cfg.batch_size, np.random.default_rng(train_cfg.seed)
    steps = len(src["audio"]) // bs
    per_epoch = []
    for _ in range(epochs):
        s = rng.permutation(len(src["audio"]))
        t = np.concatenate([rng.permutation(len(tgt["audio"])) for _ in range(steps * bs // len(tgt["audio"]) + 1)])
        per_epoch.append(
            [
                {
                    "audio": src["audio"][s[i : i + bs]],
                    "labels": src["labels"][s[i : i + bs]],
                    "target_audio": tgt["audio"][t[i : i + bs]],
                    "target_labels": tgt["labels"][t[i : i + bs]],
                }
                for i in range(0, steps * bs, bs)
            ]
        )
    vbs = train_cfg.valid_batch_size
    vlist = [{k: v[i : i + vbs] for k, v in valid.items()} for i in range(0, len(valid["audio"]), vbs)]
    seed_everything(train_cfg.seed)
    model = build_model(trial.model, trial.model_overrides, stats)
    marks: list[float] = []
    t0 = time.perf_counter()
    res = fit(
        model, per_epoch.__getitem__, lambda: vlist, train_cfg, on_epoch=lambda r: marks.append(time.perf_counter())
    )
    wall = time.perf_counter() - t0
    walls = list(np.diff([t0, *marks]))
    return {"wall_s": wall, "epoch_wall_s": walls, "epochs": [{k: h[k] for k in KEYS} for h in res.history]}


def ray_run(cfg: StudentConfig, data, stats, storage: Path) -> dict:
    """``train_student`` as the product calls it; a driver thread collects the checkpoint folder names (they
    hold the time of each ``ray.train.report``; only the last two folders are kept)."""
    name = f"bench-student-{uuid.uuid4().hex[:8]}"
    seen: set[str] = set()
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            seen.update(p.name for p in (storage / name).glob("checkpoint_[0-9]*"))
            time.sleep(0.1)

    watcher = threading.Thread(target=watch, daemon=True)
    t0, wall0 = time.perf_counter(), time.time()
    watcher.start()
    res = train_student(cfg, data, stats, storage, name)
    wall = time.perf_counter() - t0
    done.set()
    watcher.join()
    seen.update(p.name for p in (storage / name).glob("checkpoint_[0-9]*"))
    reports = sorted(datetime.strptime(n[11:], "%Y-%m-%d_%H-%M-%S.%f").timestamp() for n in seen)
    df = res.result.metrics_dataframe
    history = df.to_dict("records") if df is not None else []
    source = "result.metrics_dataframe"
    if len(history) < cfg.train.max_epochs:  # V2 keeps metrics of kept checkpoints only (num_to_keep=2)
        history = load_training_state(res.checkpoint_dir)["history"]
        source = "history in the last checkpoint (metrics_dataframe holds only kept checkpoints)"
    return {
        "wall_s": wall,
        "epoch_wall_s": list(np.diff([wall0, *reports])),
        "metrics_from": source,
        "epochs": [{k: float(h[k]) for k in KEYS} for h in history],
    }


def steady(runs: list[dict], key: str, samples: int) -> float:
    """Mean over the runs' epochs >= 1 (epoch 0 if only one): loop samples/s, excluding data waits, or outside."""
    vals = []
    for run in runs:
        v = (
            [samples / w for w in run["epoch_wall_s"]]
            if key == "outside"
            else [
                e["samples_per_s"] / (1 - e["data_wait_fraction"]) if key == "compute" else e[key]
                for e in run["epochs"]
            ]
        )
        vals += v[1:] or v
    return float(np.mean(vals))


def sweep_run(args, data, stats, out: Path) -> dict:
    from mdlda.tracking import setup_tracking, tracking_uri
    from pipelines.teachers import SweepPlace, run_sweep

    setup_tracking(out / "mlflow", "bench")
    sweep = SweepConfig(
        name=f"bench-sweep-{uuid.uuid4().hex[:8]}",
        model="rfresnet",
        mode="dann",
        num_samples=args.trials,
        cpus_per_trial=1,
        scheduler="fifo",
        register_models=False,
        model_overrides={"width": args.width},
        train={"max_epochs": args.epochs, "device": "cpu"},
        search={"lr": {"loguniform": [1e-3, 4e-3]}, "seed": {"randint": [0, 10000]}, "batch_size": args.batch},
    )
    cpus = ray.cluster_resources()["CPU"]
    t0 = time.perf_counter()
    res = run_sweep(sweep, data, stats, SweepPlace(out / "ray_results", "bench", None, tracking_uri(out / "mlflow")))
    wall = time.perf_counter() - t0
    ok = [r for r in res.results if r.error is None and r.metrics]
    busy = sum(r.metrics["time_total_s"] for r in ok)
    busy_epochs = sum(float(r.metrics_dataframe["seconds"].sum()) for r in ok)
    return {
        "trials": len(res.results),
        "failed": len(res.results) - len(ok),
        "wall_s": wall,
        "cpus": cpus,
        "busy_trial_s": busy,
        "busy_epoch_s": busy_epochs,
        "utilisation": busy / (wall * cpus),
        "utilisation_epochs": busy_epochs / (wall * cpus),
    }


def main() -> None:
    args = parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    info = {
        "args": vars(args),
        "nproc": os.cpu_count(),
        "torch": torch.__version__,
        "ray": ray.__version__,
        "load_before": load(),
    }
    t_start = time.perf_counter()
    ray.init(address="local", num_cpus=os.cpu_count(), log_to_driver=False, include_dashboard=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars, ctx.print_on_execution_start = False, False
    ml, ma = build_shards(out, args.demo_size)
    sweep_data = load_stage_data(ml, ma)  # as the chain: labelled Mid-level source, unlabelled MAESTRO target
    n_src = args.clips // 2
    if sweep_data.counts["source_train"] < n_src or n_src % args.batch:
        raise SystemExit(
            f"--clips/2 = {n_src} must be a multiple of --batch and <= the train split's "
            f"{sweep_data.counts['source_train']} rows"
        )
    stats = frontend_stats(ml, sweep_data.source_train, out / "cache")  # over the whole train split
    # student: the source cut to n_src rows; the whole labelled Mid-level train split stands in for the target
    data = replace(
        sweep_data, source_train=sweep_data.source_train.limit(n_src).materialize(), target=sweep_data.source_train
    )
    cfg = StudentConfig(
        model="rfresnet",
        model_overrides={"width": args.width},
        num_workers=1,
        cpus_per_worker=args.threads,
        max_failures=0,
        train={"max_epochs": args.epochs, "seed": 0, "lr": 2e-3, "device": "cpu", "batch_size": args.batch},
    )
    src, tgt, valid = to_numpy(data.source_train), to_numpy(data.target), to_numpy(data.source_valid)
    samples = 2 * n_src
    runs, loads = {}, {}
    phases = [f"bare-{k + 1}" for k in range(args.rounds + 1)]
    phases = [x for k in range(args.rounds) for x in (phases[k], f"ray-{k + 1}")] + [phases[-1]]
    for phase in phases:
        loads[phase] = load()
        if phase.startswith("ray"):
            runs[phase] = ray_run(cfg, data, stats, out / "ray_results")
        else:
            runs[phase] = bare_run(cfg, stats, src, tgt, valid, args.epochs, args.threads)
    loads["sweep"] = load()
    sweep = sweep_run(args, sweep_data, stats, out)
    info.update(
        load_after=load(),
        loads=loads,
        runs=runs,
        sweep=sweep,
        samples_per_epoch=samples,
        total_s=time.perf_counter() - t_start,
    )

    print(
        f"\nnproc {info['nproc']}, torch {info['torch']}, ray {info['ray']}, torch threads {args.threads} in both "
        f"(Ray Train worker: cpus_per_worker={args.threads}), width {args.width}, batch {args.batch}+{args.batch}, "
        f"{samples} segments/epoch, {args.epochs} epochs; target = Mid-level train split (labelled stand-in)"
    )
    print(f"load average before {info['load_before']}, after {info['load_after']}; per phase {loads}")
    print(f"Ray per-epoch metrics from: {runs['ray-1']['metrics_from']}")
    print(
        f"\n{'run':8} {'epoch':>5} {'samples/s':>10} {'data_wait':>9} {'excl_wait':>9} {'train_s':>8} "
        f"{'epoch_s':>8} {'outside_s':>9} {'outside/s':>9}"
    )
    for phase, r in runs.items():
        for e, (m, w) in enumerate(zip(r["epochs"], r["epoch_wall_s"], strict=False)):
            sps, wait = m["samples_per_s"], m["data_wait_fraction"]
            print(
                f"{phase:8} {e:>5} {sps:>10.2f} {wait:>9.3f} {sps / (1 - wait):>9.2f} {m['train_seconds']:>8.2f} "
                f"{m['seconds']:>8.2f} {w:>9.2f} {samples / w:>9.2f}"
            )
        start = " (includes Train start-up)" * phase.startswith("ray")
        print(f"{phase:8} {'fit()':>5} wall {r['wall_s']:.1f} s" + start)
    names = {
        "samples_per_s": "samples/s (loop)",
        "compute": "samples/s excl. data wait (loop)",
        "outside": "samples/s (outside: epoch wall)",
    }
    rays = [r for p, r in runs.items() if p.startswith("ray")]
    bares = [r for p, r in runs.items() if p.startswith("bare")]
    ratios = {f"{lab} ray/bare, all": steady(rays, k, samples) / steady(bares, k, samples) for k, lab in names.items()}
    for k in range(args.rounds):  # each Ray run against the bare runs either side of it
        ratios[f"samples/s (loop) ray-{k + 1}/(bare-{k + 1}, bare-{k + 2})"] = steady(
            [runs[f"ray-{k + 1}"]], "samples_per_s", samples
        ) / steady([runs[f"bare-{k + 1}"], runs[f"bare-{k + 2}"]], "samples_per_s", samples)
    ratios["end-to-end fit() wall bare/ray (Ray: with Train start-up)"] = float(
        np.mean([r["wall_s"] for r in bares]) / np.mean([r["wall_s"] for r in rays])
    )
    info["ratios"] = ratios
    print(f"\n{'ratio, steady = mean of epochs >= 1 (target >= 0.9)':60} value")
    for k, v in ratios.items():
        print(f"{k:60} {v:.3f}")
    s = sweep
    print(
        f"\nsweep: {s['trials']} trials ({s['failed']} failed) x {args.epochs} epochs, wall {s['wall_s']:.1f} s, "
        f"{s['cpus']:g} CPUs: busy {s['busy_trial_s']:.1f} trial-s -> utilisation {s['utilisation']:.3f} "
        f"(per-epoch seconds: {s['busy_epoch_s']:.1f} s -> {s['utilisation_epochs']:.3f})"
    )
    print(f"total {info['total_s']:.0f} s; results: {out / 'results.json'}")
    (out / "results.json").write_text(json.dumps(info, indent=2, default=float))
    ray.shutdown()


if __name__ == "__main__":
    main()
