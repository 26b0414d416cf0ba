"""What each method switch does to piano and non-piano r: the library's own training loop, in-process, several seeds.

    python bench/method_switches.py --shards demo_work/shards            # after `make demo` (its prepared shards)
    python bench/method_switches.py --shards W/shards --group bn_stats   # one group of the table in docs/method.md
    python bench/method_switches.py --shards W/shards --group student \
        --pseudo 'W/shards/pseudolabels-seed{seed}'                      # after `mdlda ablation --workdir W`

Every (variant, seed) trains one RF-ResNet with :func:`mdlda.training.fit` on the Mid-level train split (DANN
variants add the MAESTRO segments as target; student variants distil from a pseudo-label folder, the pooled mix),
early-stopped on the valid split, in its own process with one
thread, ``--jobs`` at a time. Printed per variant: mean ± 95% interval over seeds of non-piano and piano test r,
RMSE and share of outputs on the 1..10 scale, and the paired difference to the group's reference variant (same
seed). No Ray, no MLflow: this isolates the method from the system; ``mdlda ablation`` measures the whole chain.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from method_groups import GROUPS, MODEL_KEYS, NOISE_KEYS, NOT_TRAIN_KEYS  # noqa: E402


def run_one(shards: str, variant: dict, seed: int, pseudo: str | None = None) -> dict:
    """Train one model and score it (runs in a child process)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from mdlda.adapt import DomainHead
    from mdlda.checkpoints import seed_everything
    from mdlda.frontend import Frontend, FrontendConfig, floored_std, standardization_stats
    from mdlda.metrics import regression_metrics
    from mdlda.models import create_model
    from mdlda.training import TrainConfig, fit

    torch.set_num_threads(1)

    def load(name: str, splits: list[str] | None, root: str = shards):
        import pyarrow.compute as pc

        from mdlda.pcm import numpy_batch

        t = pq.read_table(f"{root}/{name}/data")
        t = t.filter(pc.is_in(t.column("split"), pa.array(splits))) if splits else t
        b = numpy_batch(t.select(["audio", "labels"]))  # audio (B, N) int16 from the shards' PCM bytes
        labels = b["labels"].astype(np.float32) if t.column("labels").null_count == 0 else None
        return b["audio"], labels

    src, y_src = load("midlevel", ["train"])
    val, y_val = load("midlevel", ["valid"])
    tests = {"test": load("midlevel", ["test"]), "piano_test": load("midlevel", ["piano_test"])}
    tgt, _ = load("maestro", ["train", "validation", "test"])
    peak = bool(variant.get("peak_normalize", False))
    frontend = Frontend(FrontendConfig(peak_normalize=peak))
    mean, std = standardization_stats(frontend, (torch.from_numpy(src[i : i + 16]) for i in range(0, len(src), 16)))
    # as pipelines/data.py frontend_stats (the student group: the chain's default floor, like its teachers)
    std = floored_std(std.numpy(), variant.get("band_floor", 0.1 if pseudo else 0.0))
    mode = variant.get("mode", "supervised")
    bs = 8
    if mode == "distill":  # the student's pooled mix (pipelines/data.py pooled_batches), in memory
        folder = Path(pseudo.format(seed=seed))
        pl, y_pl = load(folder.name, None, str(folder.parent))
        spread = pq.read_table(folder / "data", columns=["teacher_spread"]).column(0).to_numpy()
        w = np.exp(-np.square(spread)) if variant.get("weighting") == "spread" else None

    def pooled(epoch: int):
        rng = np.random.default_rng([seed, epoch])
        idx, tidx = rng.permutation(len(src)), rng.permutation(len(pl))
        parts = [("s", idx[i : i + bs]) for i in range(0, len(idx) - bs + 1, bs)]
        parts += [("t", tidx[i : i + bs]) for i in range(0, len(tidx), bs) if len(tidx[i : i + bs]) >= 2]
        for k in rng.permutation(len(parts)):
            d, rows = parts[k]
            if d == "s":
                yield {"audio": torch.from_numpy(src[rows]), "labels": y_src[rows]}
            else:
                b = {"target_audio": torch.from_numpy(pl[rows]), "target_labels": y_pl[rows]}
                yield b if w is None else {**b, "target_weights": w[rows]}

    def paired(epoch: int):  # every source batch with an equal pseudo-labelled batch (pipelines/data.py)
        rng = np.random.default_rng([seed, epoch])
        idx, tidx = rng.permutation(len(src)), rng.permutation(np.resize(np.arange(len(pl)), len(src)))
        for i in range(0, len(idx) - bs + 1, bs):
            rows, trows = idx[i : i + bs], tidx[i : i + bs]
            b = {"audio": torch.from_numpy(src[rows]), "labels": y_src[rows]}
            b |= {"target_audio": torch.from_numpy(pl[trows]), "target_labels": y_pl[trows]}
            yield b if w is None else {**b, "target_weights": w[trows]}

    def batches(epoch: int):
        if mode == "distill":
            yield from (paired if variant.get("mix") == "paired" else pooled)(epoch)
            return
        rng = np.random.default_rng([seed, epoch])
        idx, tidx = rng.permutation(len(src)), rng.permutation(np.resize(np.arange(len(tgt)), len(src)))
        for i in range(0, len(idx) - bs + 1, bs):
            b = {"audio": torch.from_numpy(src[idx[i : i + bs]]), "labels": y_src[idx[i : i + bs]]}
            if mode == "dann":
                b["target_audio"] = torch.from_numpy(tgt[tidx[i : i + bs]])
            yield b

    def valid():
        for i in range(0, len(val), 16):
            yield {"audio": torch.from_numpy(val[i : i + 16]), "labels": y_val[i : i + 16]}

    seed_everything(seed)
    overrides = {"width": 8, **{k: v for k, v in variant.items() if k in MODEL_KEYS}}
    noise = {k: v for k, v in variant.items() if k in NOISE_KEYS}
    model = create_model("rfresnet", **overrides, frontend={"peak_normalize": peak, **noise})
    model.frontend.set_standardization(mean.tolist(), std.tolist())
    teachers = []
    if mode == "distill":  # the teachers that made the pseudo-labels, from the ablation workdir's registry
        import mlflow

        from mdlda.served import load_checkpoint
        from mdlda.tracking import tracking_uri

        uris = json.loads((folder / "manifest.json").read_text())["options"]["teachers"]
        mlflow.set_tracking_uri(tracking_uri(Path(shards).parent))
        teachers = [load_checkpoint(u).eval() for u in uris]

    def predict(models, audio):  # mean rating of ``models`` over (B, N) audio, in batches of 8
        with torch.no_grad():
            return np.mean(
                [
                    torch.cat([m(torch.from_numpy(audio[i : i + 8])) * 10 for i in range(0, len(audio), 8)]).numpy()
                    for m in models
                ],
                axis=0,
            )

    y_ref = y_src  # the training labels' mean: the predict-the-mean reference
    if variant.get("source_soft"):  # source labels blended with the teacher ensemble's ratings of the same clips
        alpha = float(variant["source_soft"])
        y_src = ((1 - alpha) * y_src + alpha * predict(teachers, src)).astype(np.float32)
    if variant.get("shifts"):  # more pseudo-labelled windows: straddling two consecutive segments, teacher-labelled
        extra = shifted_windows(folder, int(variant["shifts"]))
        y_extra = np.clip(predict(teachers, extra), 1, 10).astype(np.float32)
        out_shift = {"pseudo_windows": len(pl) + len(extra)}
        pl, y_pl = np.concatenate([pl, extra]), np.concatenate([y_pl, y_extra])
        w = None if w is None else np.concatenate([w, np.ones(len(extra), w.dtype)])
    if variant.get("init") == "teacher":  # the chain's student.init = teacher: the pseudo-labels' first teacher
        model.load_state_dict(teachers[0].state_dict())
    out = out_shift if variant.get("shifts") else {}
    if variant.get("ensemble_only"):  # the teachers' mean itself, nothing trained: the bar the student must clear
        models = teachers
    else:
        train = {k: v for k, v in variant.items() if k not in NOT_TRAIN_KEYS}
        cfg = TrainConfig(
            **{"lr": 2e-3, "max_epochs": 8, "patience": 4, "lr_milestones": (4, 6), "seed": seed, "device": "cpu"}
            | {"adv_scale": 0.3, **train}
        )
        head = DomainHead(model.embed_dim) if mode == "dann" or variant.get("adversary") else None
        states = []  # the raw (uncalibrated) weights at the end of every epoch, for "average"

        def keep(_result) -> None:
            states.append({k: v.detach().clone() for k, v in model.state_dict().items()})

        result = fit(model, batches, valid, cfg, domain_head=head, on_epoch=keep if variant.get("average") else None)
        out = {"best_epoch": result.best_epoch, "valid_r": result.best_score}
        if variant.get("average"):  # the mean of the last k epochs' weights (and BN statistics), then calibrated
            out |= average_weights(model, states[-int(variant["average"]) :], valid, y_src, cfg.calibrate)
        models = [model.eval()]
    for split, (audio, labels) in tests.items():
        pred = predict(models, audio)
        m = regression_metrics(labels, pred)
        out[f"{split}.r"], out[f"{split}.rmse"] = m["r_mean"], m["rmse_mean"]
        out[f"{split}.in_scale"] = float(((pred >= 1) & (pred <= 10)).mean())
        ref = np.broadcast_to(y_ref.mean(0), labels.shape)
        out[f"{split}.rmse_ref"] = regression_metrics(labels, ref)["rmse_mean"]
    pred = predict(models, tgt)
    out["maestro.in_scale"] = float(((pred >= 1) & (pred <= 10)).mean())  # what `predict` gives on piano WAVs
    return out


def shifted_windows(folder: Path, shifts: int):
    """15-s windows that start ``k / (shifts + 1)`` of the way into one pseudo-labelled segment and end in the next
    one of the same performance (offsets 15 s apart), for k = 1..shifts: (W, N) int16."""
    import numpy as np
    import pyarrow.parquet as pq

    from mdlda.pcm import numpy_batch

    t = pq.read_table(folder / "data", columns=["group", "offset_s", "audio"])
    audio = numpy_batch(t.select(["audio"]))["audio"]
    meta = t.select(["group", "offset_s"]).to_pandas()
    at = {(g, round(o, 3)): i for i, (g, o) in enumerate(zip(meta.group, meta.offset_s, strict=True))}
    n = audio.shape[1]
    windows = []
    for (g, o), i in sorted(at.items()):
        j = at.get((g, round(o + 15.0, 3)))
        if j is None:
            continue
        both = np.concatenate([audio[i], audio[j]])
        windows += [both[k * n // (shifts + 1) :][:n] for k in range(1, shifts + 1)]
    return np.stack(windows)


def average_weights(model, states: list[dict], valid, y_src, calibrate: str) -> dict:
    """Load the element-wise mean of ``states`` into ``model`` and fit its output calibration on the validation
    split, as :func:`mdlda.training.fit` does for its kept epoch."""
    import torch

    from mdlda.epoch import validation_outputs
    from mdlda.fit_calibration import calibrate_kept
    from mdlda.params import LABEL_SCALE
    from mdlda.precision import Precision

    mean = {k: (sum(s[k].double() for s in states) / len(states)).to(v.dtype) for k, v in states[-1].items()}
    model.load_state_dict(mean)
    if hasattr(model, "reset_output_calibration"):
        model.reset_output_calibration()
    model.eval()
    pred, labels = validation_outputs(model, valid(), torch.device("cpu"), Precision(False, torch.device("cpu")))
    kept = {k: v.clone() for k, v in model.state_dict().items()}
    out = {"averaged_epochs": len(states)}
    if calibrate == "affine":
        out |= calibrate_kept(kept, pred, labels, y_src.mean(0) / LABEL_SCALE)
    model.load_state_dict(kept)
    return out


def table(results: list[dict], reference: str) -> str:
    import pandas as pd

    from mdlda import ablation as stats

    rows = []
    for r in results:
        for split in ("test", "piano_test"):
            rows.append(
                {
                    "seed": r["seed"],
                    "model": r["variant"],
                    "split": split,
                    "r_mean": r[f"{split}.r"],
                    "rmse_mean": r[f"{split}.rmse"],
                    "in_scale": r[f"{split}.in_scale"],
                    **(
                        {"in_scale_maestro": r["maestro.in_scale"]}
                        if split == "piano_test" and "maestro.in_scale" in r
                        else {}
                    ),
                }
            )
    summary = stats.summarize(pd.DataFrame(rows), reference)
    return stats.markdown(stats.headline(summary))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shards", required=True, help="Folder holding midlevel/ and maestro/ shards (a chain's shards)")
    ap.add_argument("--group", choices=sorted(GROUPS), action="append", help="Groups to run (default: all)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--jobs", type=int, default=2, help="Trainings at a time (one thread each)")
    ap.add_argument(
        "--pseudo",
        help="Pseudo-label shard folder for the student group; '{seed}' is replaced by the seed "
        "(an ablation's per-seed folders: W/shards/pseudolabels-seed{seed})",
    )
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help="Also write every run's numbers as JSON lines here")
    args = ap.parse_args()
    if args.one:  # child process: one (variant, seed)
        job = json.loads(args.one)
        print(json.dumps(run_one(args.shards, job["variant"], job["seed"], args.pseudo)))
        return

    def child(job: dict) -> dict:
        cmd = [sys.executable, __file__, "--shards", args.shards, "--one", json.dumps(job)]
        cmd += ["--pseudo", args.pseudo] if args.pseudo else []
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        return {**job, **json.loads(out)}

    needs_pseudo = {g for g, (_, vs) in GROUPS.items() if any(v.get("mode") == "distill" for v in vs.values())}
    groups = args.group or [g for g in GROUPS if g not in needs_pseudo or args.pseudo]
    if needs_pseudo & set(groups) and not args.pseudo:
        ap.error("the student group needs --pseudo (pseudo-label shards, e.g. an ablation's)")
    for group in groups:
        reference, variants = GROUPS[group]
        jobs = [{"name": n, "variant": v, "seed": s} for n, v in variants.items() for s in args.seeds]
        with ThreadPoolExecutor(args.jobs) as pool:
            results = [{**r, "variant": r["name"]} for r in pool.map(child, jobs)]
        if args.out:
            with args.out.open("a") as f:
                for r in results:
                    f.write(json.dumps({"group": group, **r}) + "\n")
        print(f"\n## {group} (reference: {reference}; seeds {args.seeds})\n")
        print(table(results, reference), flush=True)


if __name__ == "__main__":
    main()
