"""Stage 1, `mdlda prepare`: audio files -> 15-s int16 segments in Parquet shards, with Ray Data.

index (pandas) -> one streaming Ray Data pipeline over groups of items, each ``map`` task decoding, resampling and
segmenting its group and writing it as one Parquet file -> ``<out>/data``, chunk by chunk; the later stages read the
shards with Ray Data (:mod:`pipelines.prepare_decode`). Only the per-item outcomes (digests, skips) flow back
through Ray Data, never the audio. A finished chunk is recorded in ``<out>/.prepare/``
(:mod:`pipelines.prepare_resume`); rerunning an interrupted run redoes only unfinished chunks, and rerunning a
finished one does nothing. Bad files are reported skips (in the manifest), a MAESTRO file with fewer segments than
its CSV duration implies is a counted warning there, and the run stops with an error when more than
``max_failure_share`` of the items fail. ``<out>`` must be new, empty or a shard folder of ours, and only files
prepare wrote are ever deleted there (``prepare_folder``).
"""

from __future__ import annotations

import json
import logging
from contextlib import closing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mdlda.audio import decoder_info
from mdlda.manifest import DATA_DIR, MANIFEST, build_manifest, index_digest, read_manifest, write_manifest
from mdlda.params import MAX_PAD_SECONDS, NUM_FEATURES, SEGMENT_SAMPLES, check_audio_params  # noqa: F401
from pipelines import prepare_resume as resume
from pipelines.prepare_decode import run_chunks
from pipelines.prepare_folder import (
    STATE_DIR,
    STATE_FILE,
    PrepareError,
    check_files,
    check_out_folder,
    data_files,
    remove_chunk_files,
    remove_ours,
    write_json_atomic,
)

logger = logging.getLogger(__name__)
CLIPS_PER_TASK = 64  # Mid-level clips decoded and written by one task (PrepareConfig.files_per_task)

__all__ = ["STATE_DIR", "PrepareConfig", "PrepareError", "PrepareResult", "prepare"]


@dataclass
class PrepareConfig:
    dataset: str  # "midlevel" or "maestro"
    root: str
    out: str
    piano_ids: str | None = None  # Mid-level: CSV with a `song id` column (the piano_test clips)
    seed: int = 0
    eval_fraction: float = 0.1  # Mid-level: share of the source drawn (from single-track artists) for valid+test
    valid_fraction: float = 0.2  # Mid-level: share of that evaluation set used for validation
    splits: list[str] | None = None  # MAESTRO: which of its splits to keep (default all)
    max_performances: int | None = None  # MAESTRO: a seeded subset of performances
    max_pad_s: float = MAX_PAD_SECONDS
    max_failure_share: float = 0.1
    chunk_items: int = 512  # items per resumable chunk
    # items decoded and written per task; None: CLIPS_PER_TASK clips (a task's fixed cost is then a few per cent
    # of its work; the groups are evened out over the CPUs, so no core idles at the end) or 1 performance
    files_per_task: int | None = None
    num_cpus_per_task: float = 1.0
    overwrite: bool = False
    progress: bool = True


@dataclass
class PrepareResult:
    out: str
    manifest: dict[str, Any]
    skipped_work: bool = False
    chunks_done: int = 0
    failures: list[dict] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)  # damaged or missing shard files found and redone


def _index(config: PrepareConfig):
    from mdlda.datasets import index_maestro, index_midlevel

    if config.dataset == "midlevel":
        return index_midlevel(
            config.root,
            piano_ids=config.piano_ids,
            seed=config.seed,
            eval_fraction=config.eval_fraction,
            valid_fraction=config.valid_fraction,
        )
    if config.dataset == "maestro":
        return index_maestro(
            config.root, splits=config.splits, max_performances=config.max_performances, seed=config.seed
        )
    raise PrepareError(f"unknown dataset {config.dataset!r}: expected 'midlevel' or 'maestro'")


def _progress(total: int, enabled: bool, dataset: str = ""):
    from mdlda.console import progress_bar  # count, rate, ETA

    return progress_bar(f"prepare {dataset}".strip(), "files", enabled=enabled)


def prepare(config: PrepareConfig) -> PrepareResult:
    """Run the prepare stage; returns the manifest of the finished shard folder."""
    out = Path(config.out).resolve()
    check_out_folder(out)  # before any work: a folder holding other files is refused, never cleared
    index = _index(config)
    table = index.table.reset_index(drop=True)
    options = {"dataset": config.dataset, "max_pad_s": config.max_pad_s, **index.options}
    digest = index_digest(table, options)
    state_dir = out / STATE_DIR

    repaired: list[str] = []
    if (out / MANIFEST).exists():
        manifest = read_manifest(out, check_params=False)  # other parameters or layout: rebuilt or refused below
        if manifest.get("index_digest") != digest and not config.overwrite:
            check_audio_params(manifest.get("audio", {}), str(out))  # an old layout says so, and how to rewrite
        if manifest.get("index_digest") == digest:
            problems = check_files(out, manifest)  # "up to date" only when the files are what the manifest lists
            if not problems:
                return PrepareResult(str(out), manifest, skipped_work=True)
            if config.overwrite:  # rebuilt below
                repaired = [f"{name}: {why}" for name, why in problems]
            else:
                repaired = resume.reopen_damaged(out, state_dir, digest, problems)
        elif not config.overwrite:
            raise PrepareError(
                f"{out} already holds shards made from other input (or other options). "
                "Write to a new folder, or pass --overwrite to replace them."
            )
    state = {} if config.overwrite else resume.load_state(state_dir)
    if state.get("index_digest") != digest:
        remove_ours(out)  # only the files prepare wrote (check_out_folder refused anything else)
        state = {"index_digest": digest, "done": []}
    done_records = resume.done_records(state_dir, state["done"])
    done = set(done_records)  # a finished chunk without its record is redone
    state["done"] = sorted(done)
    write_json_atomic(state_dir / STATE_FILE, state)  # first: the folder is marked as ours before data lands
    (out / DATA_DIR).mkdir(parents=True, exist_ok=True)
    remove_chunk_files(out, done)

    n_items = len(table)
    index_failures = [s for s in index.skipped if s.get("counts_as_failure", True)]
    n_total = n_items + len(index_failures)
    allowed = config.max_failure_share * max(n_total, 1)
    if len(index_failures) > allowed:
        raise PrepareError(_too_many(index_failures, n_total, config))

    # What is left to do is decided by item, not by chunk number: a resume with another --chunk-items (or after
    # a damaged chunk was reopened) decodes exactly the items no finished chunk holds, in new chunk numbers.
    finished = {rec["item"] for records in done_records.values() for rec in records}
    rest = table[~table.clip_id.astype(str).isin(finished)]
    size, first = max(1, config.chunk_items), max(done, default=-1) + 1
    todo = [(first + k, rest.iloc[s : s + size]) for k, s in enumerate(range(0, len(rest), size))]
    per_task = config.files_per_task or (1 if config.dataset == "maestro" else CLIPS_PER_TASK)
    failed = index_failures.copy()  # and those of the chunks done before an interruption:
    for records in done_records.values():
        failed += _failures(records)
    with _progress(n_items, config.progress, config.dataset) as bar:
        task = bar.add_task("decode", total=n_items)
        bar.advance(task, n_items - len(rest))
        runs = run_chunks(out, todo, per_task, config, advance=lambda n: bar.advance(task, n))
        with closing(runs):  # leaving early (an error) cancels the tasks still running
            for i, records in runs:
                write_json_atomic(state_dir / f"chunk-{i:05d}.json", records)
                done.add(i)
                state["done"] = sorted(done)
                write_json_atomic(state_dir / STATE_FILE, state)
                failed += _failures(records)
                if len(failed) > allowed:
                    raise PrepareError(_too_many(failed, n_total, config))
    result = _finish(out, state_dir, index, digest, options, config)
    result.repaired = repaired
    return result


def _failures(records: list[dict]) -> list[dict]:
    return [{"item": r["item"], "reason": r["error"]} for r in records if r["error"]]


def _too_many(failed: list[dict], total: int, config: PrepareConfig) -> str:
    examples = "\n".join(f"  {f.get('item')}: {f.get('reason')}" for f in failed[:5])
    return (
        f"{len(failed)} of {total} items failed (more than max_failure_share={config.max_failure_share:.0%}); "
        f"no dataset was written. First failures:\n{examples}\n"
        "Fix the input, or raise --max-failure-share if these losses are acceptable."
    )


def _finish(out: Path, state_dir: Path, index, digest: str, options: dict, config: PrepareConfig) -> PrepareResult:
    counts: dict[str, int] = {}
    digests: dict[str, str] = {}
    fitting: dict[str, int] = {}
    skipped = list(index.skipped)
    warnings: list[dict] = []
    for f in sorted(state_dir.glob("chunk-*.json")):
        for rec in json.loads(f.read_text()):
            if rec["error"]:
                skipped.append({"item": rec["item"], "reason": rec["error"]})
                continue
            if rec.get("warning"):
                warnings.append({"item": rec["item"], "reason": rec["warning"]})
            if rec["fitting"]:
                fitting[rec["fitting"]] = fitting.get(rec["fitting"], 0) + 1
            for clip_id, split, row_digest in rec["rows"]:
                if clip_id in digests:
                    raise PrepareError(f"duplicate clip id {clip_id!r} in the decoded rows of {config.root}")
                digests[clip_id] = row_digest
                counts[split] = counts.get(split, 0) + 1
    manifest = build_manifest(
        dataset=config.dataset,
        source_root=str(Path(config.root).resolve()),
        counts=counts,
        skipped=skipped,
        row_digests=digests,
        index_digest=digest,
        options={**options, "config": asdict(config)},
        decoder=decoder_info(),
        clip_fitting=fitting,
        files=data_files(out),
        warnings=warnings,
    )
    write_manifest(out, manifest)
    return PrepareResult(str(out), manifest, failures=[s for s in skipped if s.get("reason")])
