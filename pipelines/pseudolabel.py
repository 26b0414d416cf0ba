"""Stage 4, `mdlda pseudolabel`: label a seeded subset of MAESTRO segments with the teachers' mean prediction.

Ray Data batch inference: an actor pool whose actors each hold the k registered teachers (loaded from the
MLflow registry through their weights-only checkpoints, on the GPU when there is one). Output: shards in the
source shards' schema (README, "Data contract"; labels = the teacher mean on the 1..10 scale) plus
``teacher_spread`` (std across teachers, averaged over the 7 features), ``labels_raw`` (the teacher mean before
each teacher's output calibration: ``StudentConfig.labels`` chooses which the student learns) and a manifest
that names the teacher versions, so a rerun with the same teachers and seed does nothing.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from ray.data import ActorPoolStrategy
from ray.data.expressions import col

from mdlda.config import ChainConfig, PseudoLabelConfig, config_digest
from mdlda.manifest import DATA_DIR, MANIFEST, build_manifest, read_manifest, row_digest, write_manifest
from mdlda.params import NUM_FEATURES, PCM_SCALE, RATING_MAX, RATING_MIN, audio_params
from mdlda.pcm import from_column, with_metadata
from pipelines.data import RAW_LABELS
from pipelines.prepare_folder import clear_stage_output
from pipelines.shards import WRITE_OPTIONS, labels_array, local_index, read_shards

if TYPE_CHECKING:
    from pipelines.prepare_stage import ChainInputs
    from pipelines.runs import StageContext

PSEUDO_DATASET = "maestro-pseudo"  # the manifest's dataset name of a pseudo-label folder
FILE_ROWS = 1024  # segments per file at most (~0.7 GB): the default 500 in one file


@dataclass
class PseudoLabelResult:
    out: str
    manifest: dict
    skipped_work: bool


class TeacherEnsemble:
    """Ray Data actor: holds the teachers, returns the batch with mean labels and the teacher spread."""

    def __init__(self, uris: list[str], tracking_uri: str, progress=None, batch_size: int | None = None) -> None:
        import mlflow
        import torch

        from mdlda.tracking import load_served

        mlflow.set_tracking_uri(tracking_uri)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        # weights-only checkpoints and mdlda's model code: a registered version cannot run code on the workers
        self.teachers = [load_served(uri).to(self.device) for uri in uris]
        self.progress = progress  # a ray.util.queue.Queue of labelled segment counts (the driver's bar), or None
        # a shorter batch is padded with silence to this size: which rows Ray Data groups into a batch depends on
        # its blocks (the reader, the cluster), and a segment's float32 rating in a batch of 1 differs from the
        # same segment's in a batch of 4 by ~1e-7, enough to move a student's kept epoch. Padded, a segment's
        # labels do not depend on its neighbours (eval-mode BatchNorm: each output is its own input's).
        self.batch_size = batch_size

    def __call__(self, batch: pa.Table) -> pa.Table:
        import torch

        pcm = from_column(batch.column("audio"))  # (B, N) int16, a view of the shard bytes
        n = len(pcm)
        audio = torch.from_numpy(pcm.astype(np.float32) / PCM_SCALE)
        if self.batch_size and n < self.batch_size:
            audio = torch.cat([audio, audio.new_zeros(self.batch_size - n, audio.shape[1])])
        audio = audio.to(self.device)
        with torch.no_grad():
            rated = [t(audio).float()[:n] for t in self.teachers]
            # each teacher's output before its calibration (RatingModel.uncalibrated)
            raw = np.stack([t.uncalibrated(r).cpu().numpy() for t, r in zip(self.teachers, rated, strict=True)])
        preds = np.stack([r.cpu().numpy() for r in rated])  # (k, B, 7) on 1..10
        # the batch's own columns, audio bytes untouched, plus the mean prediction clipped to the rating scale
        table = batch.append_column("labels", labels_array(np.clip(preds.mean(axis=0), RATING_MIN, RATING_MAX)))
        table = table.append_column("teacher_spread", pa.array(preds.std(axis=0).mean(axis=1).astype(np.float32)))
        table = table.append_column(RAW_LABELS, labels_array(np.clip(raw.mean(axis=0), RATING_MIN, RATING_MAX)))
        if self.progress is not None:
            self.progress.put(n)
        return with_metadata(table)


def choose_segments(
    maestro_shards: str | Path, n: int, seed: int, splits: list[str] | None
) -> tuple[list[str], list[str]]:
    """A seeded random subset of ``n`` of the shards' segment ids (:func:`sample_ids`), and the shard files that
    hold them (from the footers and the ids: no audio read), so that only those files are read."""
    index = local_index(maestro_shards, splits, ["clip_id"])
    ids = sample_ids(index.small.get("clip_id", []), n, seed)
    held = np.unique(index.file[np.isin(index.small.get("clip_id", np.zeros(0, dtype=object)), ids)])
    return ids, [index.files[k] for k in held]


def sample_ids(ids, n: int, seed: int) -> list[str]:
    """A seeded random subset of ``n`` ids (sorted), or all when there are fewer. The ids are sorted before the
    draw, so the subset depends on the set of ids and the seed only, not on the order Ray Data read them in."""
    ids = sorted(ids)
    if n >= len(ids):
        return ids
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(ids, size=n, replace=False).tolist())


def pseudolabel(
    cfg: PseudoLabelConfig,
    teacher_uris: list[str],
    maestro_shards: str | Path,
    out: str | Path,
    source_train_count: int,
    tracking_uri: str,
) -> PseudoLabelResult:
    out = Path(out).resolve()
    src_manifest = read_manifest(maestro_shards)
    n = round(cfg.fraction * source_train_count) if cfg.fraction else cfg.num_segments
    if not n or n < 1:
        raise ValueError("pseudolabel: num_segments (or fraction x source train size) must be at least 1")
    key = config_digest(
        {
            "cfg": cfg.model_dump(mode="json"),
            "teachers": teacher_uris,
            "n": n,
            "maestro": src_manifest["content_digest"],
            "columns": ["labels", "teacher_spread", RAW_LABELS],  # a folder written without a column is rewritten
        }
    )
    if (out / MANIFEST).exists():
        manifest = read_manifest(out, check_params=False)
        if manifest.get("index_digest") == key and manifest.get("audio") == audio_params():  # else rewritten
            return PseudoLabelResult(str(out), manifest, skipped_work=True)
    from mdlda.served import resolve

    for uri in teacher_uris:  # a refused teacher stops here, in the driver, with its message (not in an actor)
        resolve(uri)
    clear_stage_output(out, PSEUDO_DATASET)  # an older output of this stage; nothing else is deleted
    ids, files = choose_segments(maestro_shards, n, cfg.seed, cfg.splits)
    if not ids:
        raise ValueError(f"pseudolabel: {maestro_shards} holds no segment in the splits {cfg.splits or 'all'}")
    cols = ["clip_id", "dataset", "domain", "split", "group", "offset_s", "audio"]
    # only the files holding a chosen segment (MAESTRO's hold one performance each); unlabelled: no labels column
    ds, _ = read_shards(maestro_shards, splits=cfg.splits, columns=cols, files=files)
    ds = ds.filter(expr=col("clip_id").is_in(ids))
    resources = {"num_gpus": cfg.gpus_per_actor} if cfg.gpus_per_actor else {}
    from mdlda.console import progress_bar
    from pipelines.progress import watched_queue  # here: the actors that unpickle this module never import Tune

    progress = ExitStack()  # a bar with rate and ETA, advanced by the actors through a queue
    bar = progress.enter_context(progress_bar("pseudolabel", "segments"))
    task = bar.add_task("label", total=len(ids))
    queue = progress.enter_context(watched_queue(lambda n: bar.advance(task, n)))
    ds = ds.map_batches(
        TeacherEnsemble,
        fn_constructor_kwargs={
            "uris": teacher_uris,
            "tracking_uri": tracking_uri,
            "progress": queue,
            "batch_size": cfg.batch_size,
        },
        batch_size=cfg.batch_size,
        batch_format="pyarrow",
        compute=ActorPoolStrategy(size=cfg.concurrency or 1),  # `concurrency=` is deprecated since Ray 2.51
        num_cpus=cfg.cpus_per_actor,
        **resources,
    )
    # stored in clip-id order: the actors' batches come back in an order that varies from run to run, and the
    # student draws its seeded batches over row positions, so the same pseudo-labels must be stored the same way
    # (a sort writes a file per sort block: its blocks are joined, in order, into files of up to FILE_ROWS rows)
    ds = ds.sort("clip_id").repartition(max(1, -(-len(ids) // FILE_ROWS)))
    with progress:
        ds.write_parquet(str(out / DATA_DIR), **WRITE_OPTIONS)
    meta = pq.read_table(out / DATA_DIR, columns=["clip_id", "split", "labels", "teacher_spread"]).to_pandas()
    _check_labels(meta)
    digests = {r.clip_id: row_digest(r.clip_id, r.split, r.labels, b"") for r in meta.itertuples()}
    counts = meta.split.value_counts().to_dict()
    manifest = build_manifest(
        dataset=PSEUDO_DATASET,
        source_root=str(Path(maestro_shards).resolve()),
        counts=counts,
        skipped=[],
        row_digests=digests,
        index_digest=key,
        options={
            "teachers": teacher_uris,
            "num_segments": n,
            "seed": cfg.seed,
            "splits": cfg.splits,
            "source_content_digest": src_manifest["content_digest"],
            "teacher_spread": _spread_summary(meta.teacher_spread.to_numpy()),
            RAW_LABELS: "the teachers' mean output before their output calibration, clipped to 1..10",
        },
        decoder=src_manifest.get("decoder", {}),
    )
    write_manifest(out, manifest)
    return PseudoLabelResult(str(out), manifest, skipped_work=False)


def _check_labels(meta) -> None:
    labels = np.stack(meta.labels.to_numpy())
    if labels.shape[1] != NUM_FEATURES or not np.isfinite(labels).all():
        raise RuntimeError("pseudolabel: the teachers produced non-finite or mis-shaped predictions")


def _spread_summary(spread: np.ndarray) -> dict:
    q = np.quantile(spread, [0.0, 0.25, 0.5, 0.75, 0.95, 1.0])
    return {
        "mean": float(spread.mean()),
        **{f"q{int(p * 100)}": float(v) for p, v in zip([0, 0.25, 0.5, 0.75, 0.95, 1.0], q, strict=True)},
    }


def log_spread(result: PseudoLabelResult, run_dir: Path) -> list[Path]:
    """A histogram PNG of the teacher spread and the summary JSON (logged as artifacts by the caller)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spread = pq.read_table(Path(result.out) / DATA_DIR, columns=["teacher_spread"]).column(0).to_numpy()
    run_dir.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.hist(spread, bins=30, color="#4c72b0")
    ax.set_xlabel("teacher spread (std across teachers, 1..10 scale, mean over features)")
    ax.set_ylabel("segments")
    fig.tight_layout()
    png = run_dir / "teacher_spread.png"
    fig.savefig(png, dpi=100)
    plt.close(fig)
    summary = run_dir / "teacher_spread.json"
    summary.write_text(json.dumps(_spread_summary(spread), indent=2))
    return [png, summary]


def pseudolabel_stage(
    cfg: ChainConfig, teacher_uris: list[str], out: Path, inputs: ChainInputs, ctx: StageContext
) -> PseudoLabelResult:
    """The chain's pseudo-label stage: :func:`pseudolabel` of the chain's MAESTRO shards into ``out`` under its
    stage run, with the teachers, the subset's manifest and the teacher spread logged there."""
    import tempfile

    import mlflow

    from pipelines import runs  # here: the actors that unpickle this module need no MLflow bookkeeping

    with runs.stage(ctx, "pseudolabel"):
        source_train = inputs.data.counts["source_train"]
        res = pseudolabel(cfg.pseudolabel, teacher_uris, str(ctx.shards("maestro")), out, source_train, ctx.uri)
        mlflow.log_params(
            {
                "teachers": ",".join(teacher_uris),
                "num_segments": res.manifest["rows"],
                "seed": cfg.pseudolabel.seed,
            }
        )
        runs.log_json(res.manifest, "manifest-pseudolabels.json")
        with tempfile.TemporaryDirectory() as d:
            for p in log_spread(res, Path(d)):
                mlflow.log_artifact(str(p))
        spread = res.manifest["options"]["teacher_spread"]
        mlflow.log_metrics({f"teacher_spread_{k}": v for k, v in spread.items()})
    return res
