"""`mdlda compare` vs `mdlda predict` on the same files: wall and CPU time, side by side in one run.

    python bench/compare.py [--seconds 120] [--width 8] [--hop 5] [--rounds 3]

Three generated performances of one piece (``mdlda.datasets.performances``: 44.1 kHz stereo WAVs, the reference
``--seconds`` long) and a real MLflow registry (SQLite store in a temporary folder) holding an RF-ResNet of
``--width`` with random weights as ``mdlda-student@champion`` (speed does not depend on the weights).

- **command line**: ``python -m pipelines.cli predict A B C --hop H --out x.csv`` and ``... compare A B C --hop H
  --out DIR`` in fresh processes, interleaved (predict, compare, predict, ...) ``--rounds`` times: what a user
  waits for, start-up (imports, model loading) included. CPU is the child's user + system time.
- **library**, in this process after one warm-up of each: ``predict_recording`` of every file vs
  ``mdlda.compare.compare`` (decode + predict + chroma, alignment, statistics, figure and tables), and compare's
  stages apart.

The target (issue 17) is compare / predict < 2x, alignment included. Prints Markdown tables and the load average.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def register_model(work: Path, width: int) -> None:
    import mlflow
    import torch
    from mlflow.tracking import MlflowClient

    from mdlda.checkpoints import save_model
    from mdlda.models import create_model
    from mdlda.tracking import CHAMPION, STUDENT_MODEL, setup_tracking

    setup_tracking(work, "bench")
    torch.manual_seed(0)
    ckpt = save_model(create_model("rfresnet", width=width), work / "ckpt")
    with mlflow.start_run() as run:
        mlflow.log_artifacts(str(ckpt), artifact_path="model-checkpoint")
    client = MlflowClient()
    client.create_registered_model(STUDENT_MODEL)
    v = client.create_model_version(STUDENT_MODEL, f"{run.info.artifact_uri}/model-checkpoint", run.info.run_id)
    client.set_registered_model_alias(STUDENT_MODEL, CHAMPION, v.version)


def timed_child(cmd: list[str]) -> tuple[float, float]:
    """(wall s, CPU s) of one command in a fresh process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # the store of --workdir
    subprocess.run(cmd, check=True, capture_output=True, env=env)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def timed(fn) -> tuple[float, float, object]:
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - w, time.process_time() - c, out


def library(files: list[str], uri: str, hop: float, out: Path) -> dict[str, tuple[float, float]]:
    import mlflow

    from mdlda.align import align
    from mdlda.compare import aligned_curves, analyse_recording, compare, find_passages, mean_differences
    from mdlda.compare_report import write_outputs
    from mdlda.predict import predict_recording
    from mdlda.tracking import load_served

    mlflow.set_tracking_uri(uri)
    model = load_served("models:/mdlda-student@champion")
    predict_all = lambda: [predict_recording(model, f, hop_s=hop) for f in files]  # noqa: E731
    compare_all = lambda: compare(model, files, out, hop_s=hop)  # noqa: E731
    predict_all(), compare_all()  # warm-up: lazy imports, numba's cached DTW kernel, matplotlib
    res = {}
    res["predict"] = timed(predict_all)[:2]
    res["compare"] = timed(compare_all)[:2]
    w, c, recs = timed(lambda: [analyse_recording(model, f, Path(f).stem, hop) for f in files])
    res["  decode + predict + chroma"] = (w, c)
    ref, others = recs[0], recs[1:]
    w, c, maps = timed(lambda: {r.name: align(ref.chroma, r.chroma, (ref.duration, r.duration)) for r in others})
    res["  alignment (DTW)"] = (w, c)

    def stats():
        curves = aligned_curves(ref, others, maps)
        return curves, mean_differences(curves, ref.name, hop), find_passages(curves, ref.name, hop)

    w, c, _ = timed(stats)
    res["  aligned curves, bootstrap, passages"] = (w, c)
    result = compare_all()
    w, c, _ = timed(lambda: write_outputs(result, out, hop_s=hop))
    res["  figure (PNG + SVG), CSVs, summary"] = (w, c)
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=120.0, help="length of the reference performance")
    p.add_argument("--width", type=int, default=8, help="RF-ResNet width (the demo chain's student: 8)")
    p.add_argument("--hop", type=float, default=5.0, help="seconds between window starts (compare's default)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved predict/compare command pairs")
    args = p.parse_args()
    print(f"load average before: {os.getloadavg()[0]:.1f}")
    from mdlda.datasets.performances import generate_performances

    with tempfile.TemporaryDirectory(prefix="bench-compare-") as d:
        d = Path(d)
        made = generate_performances(d / "perf", seed=0, seconds=args.seconds)
        files = list(made["files"].values())
        work = d / "work"
        register_model(work, args.width)
        cli = [sys.executable, "-m", "pipelines.cli"]
        common = ["--workdir", str(work), "--hop", str(args.hop)]
        runs = {"predict": [], "compare": []}
        for _ in range(args.rounds):
            runs["predict"].append(timed_child([*cli, "predict", *files, *common, "--out", str(d / "p.csv")]))
            runs["compare"].append(timed_child([*cli, "compare", *files, *common, "--out", str(d / "cmp")]))
        lib = library(files, f"sqlite:///{work / 'mlflow.db'}", args.hop, d / "lib")
    total = sum(made["maps"][n][-1, 1] for n in made["maps"])
    print(f"\n3 files, {total:.0f} s of audio, hop {args.hop:g} s, RF-ResNet width {args.width}, {args.rounds} rounds")
    print("\n| command line (fresh process) | wall s (median) | wall s (each) | CPU s (median) |")
    print("|---|---:|---:|---:|")
    for k, v in runs.items():
        walls, cpus = [w for w, _ in v], [c for _, c in v]
        each = ", ".join(f"{w:.1f}" for w in walls)
        print(f"| `{k}` | {statistics.median(walls):.1f} | {each} | {statistics.median(cpus):.1f} |")
    pairs = [c[0] / p_[0] for p_, c in zip(runs["predict"], runs["compare"], strict=True)]
    med = {k: statistics.median([w for w, _ in v]) for k, v in runs.items()}
    cpu = {k: statistics.median([c for _, c in v]) for k, v in runs.items()}
    print(f"\ncommand line compare / predict: {med['compare'] / med['predict']:.2f}x by median wall "
          f"(per round {', '.join(f'{r:.2f}' for r in pairs)}), {cpu['compare'] / cpu['predict']:.2f}x by CPU "
          "(target < 2x)")  # fmt: skip
    print("\n| library, warm (this process) | wall s | CPU s |")
    print("|---|---:|---:|")
    for k, (w, c) in lib.items():
        print(f"| {k} | {w:.2f} | {c:.2f} |")
    print(
        f"\nlibrary compare / predict: {lib['compare'][0] / lib['predict'][0]:.2f}x by wall, "
        f"{lib['compare'][1] / lib['predict'][1]:.2f}x by CPU"
    )
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
