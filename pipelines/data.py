"""The datasets a training stage reads, and the batch iterators the shared training loop consumes.

Source (labelled Mid-level) and target (MAESTRO) segments come from the Parquet shards. A set that fits in the
object store's free memory is materialized once through Ray Data, in one-row blocks (a sweep of many trials then
never re-reads Parquet, and a seeded random block order is a global shuffle). A set that does not fit stays a
lazy Ray Dataset (what Ray Train's ``datasets=`` and other Ray Data readers run) carrying the row index of its
split (:class:`ShardDataset`); the batch iterators here read it themselves every epoch, a seeded permutation of
all its rows, one ``preadv`` per segment into its batch, no Ray Data executor (pipelines/shard_reader.py).
Every batch iterator pairs each labelled source batch with an equal-sized target batch for DANN/distillation, the
target being a seeded subset of the source set's size per run (:func:`_run_subset`). ``audio`` arrives as
``(B, N)`` int16 PCM (mdlda/pcm.py).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import ray

from mdlda.params import SEGMENT_BYTES
from mdlda.pcm import numpy_batch
from pipelines.shard_reader import ShardIndex, background, build_index, epoch_batches
from pipelines.shards import read_shards, split_count

logger = logging.getLogger(__name__)

ROW_BYTES = SEGMENT_BYTES + 64  # a training row in the object store: its PCM plus clip id and labels
TRAIN_COLUMNS = ["clip_id", "audio", "labels"]
SPREAD = "teacher_spread"


@dataclass
class StageData:
    """Datasets of one training stage plus the manifests they came from (logged with every run).

    ``memory``: the materialisation decision and the sizes it was made from (:func:`plan_materialize`)."""

    source_train: ray.data.Dataset
    source_valid: ray.data.Dataset
    target: ray.data.Dataset | None
    counts: dict[str, int]
    manifests: dict[str, dict] = field(default_factory=dict)
    materialized: bool = False
    memory: dict = field(default_factory=dict)


def plan_materialize(sizes: dict[str, int], free_bytes: float, share: float) -> dict:
    """Which datasets to hold in the object store: in the order given (source train, valid, target), each one
    that still fits in ``share`` x the store's free memory after those before it. Bytes, not rows: the decision
    and every size are returned for the log."""
    budget = share * free_bytes
    plan = {"object_store_free_bytes": int(free_bytes), "share": share, "budget_bytes": int(budget), "sets": {}}
    used = 0
    for name, nbytes in sizes.items():
        keep = used + nbytes <= budget
        used += nbytes if keep else 0
        plan["sets"][name] = {"bytes": int(nbytes), "materialized": keep}
    plan["materialized_bytes"] = int(used)
    return plan


def object_store_free_bytes() -> tuple[float, float]:
    """(free, total) object-store bytes of the cluster now: the store's capacity (``ray.cluster_resources()``)
    less the bytes its objects use (the raylets' store statistics; a private Ray API, so when it is unavailable the
    used bytes count as 0 and the capacity is the free memory)."""
    total = float(ray.cluster_resources().get("object_store_memory", 0.0))
    try:
        from ray._private.internal_api import get_memory_info_reply
        from ray._private.state import state

        used = float(get_memory_info_reply(state).store_stats.object_store_bytes_used)
    except Exception as exc:  # noqa: BLE001 (a private API: never fail the stage on it)
        logger.warning("object store usage unavailable (%s): taking its capacity as free", exc)
        used = 0.0
    return max(total - used, 0.0), total


def _materialize(ds: ray.data.Dataset, rows_per_block: int) -> ray.data.Dataset:
    """Held in the object store in blocks of ``rows_per_block`` rows: with 1, a seeded random block order is a
    global shuffle of the rows that copies nothing (see :func:`_iter`)."""
    return ds.repartition(target_num_rows_per_block=rows_per_block).materialize()


def load_stage_data(
    source_shards: str | Path,
    target_shards: str | Path | None = None,
    target_splits: list[str] | None = None,
    target_labelled: bool = False,
    materialize_share: float = 0.5,
    rows_per_block: int = 1,
) -> StageData:
    """Source train/valid from the Mid-level shards; target segments (MAESTRO, or pseudo-labelled shards).

    Each set is materialised (held in the object store) when it fits in ``materialize_share`` of the store's free
    memory, source first (:func:`plan_materialize`); the decision and the sizes are logged and kept in
    ``StageData.memory``. A set left out streams from its shards every epoch."""
    src, src_manifest = read_shards(source_shards, splits=["train"], columns=TRAIN_COLUMNS)
    val, _ = read_shards(source_shards, splits=["valid"], columns=TRAIN_COLUMNS)
    counts = {
        "source_train": split_count(src_manifest, ["train"]),
        "source_valid": split_count(src_manifest, ["valid"]),
    }
    manifests = {"source": src_manifest}
    tgt = None
    if target_shards is not None:
        cols = TRAIN_COLUMNS if target_labelled else ["clip_id", "audio"]
        if target_labelled and _has_spread(target_shards):
            cols = [*cols, SPREAD]  # pseudo-labels: the teachers' disagreement per segment (StudentConfig.weighting)
        tgt, tgt_manifest = read_shards(target_shards, splits=target_splits, columns=cols)
        counts["target"] = split_count(tgt_manifest, target_splits)
        manifests["target"] = tgt_manifest
    for name, n in counts.items():
        if n == 0:
            raise ValueError(f"{name} is empty: nothing to train or validate on (check the shard manifests)")
    free, total = object_store_free_bytes()
    plan = plan_materialize({k: n * ROW_BYTES for k, n in counts.items()}, free, materialize_share)
    plan["object_store_total_bytes"] = int(total)
    sets = {"source_train": src, "source_valid": val, "target": tgt}
    where = {
        "source_train": (source_shards, ["train"], TRAIN_COLUMNS),
        "source_valid": (source_shards, ["valid"], TRAIN_COLUMNS),
        "target": (target_shards, target_splits, cols if target_shards is not None else None),
    }
    for name, decision in plan["sets"].items():
        if decision["materialized"]:
            sets[name] = _materialize(sets[name], rows_per_block)
        else:  # streamed: the training iterators read its rows themselves (pipelines/shard_reader.py)
            sets[name] = _attach_index(sets[name], build_index(*where[name]))
        logger.info(
            "%s: %d rows, %.2f GB: %s (object store: %.2f GB free, budget %.0f%% = %.2f GB)",
            name,
            counts[name],
            decision["bytes"] / 1e9,
            "materialized" if decision["materialized"] else "streamed from its shards every epoch",
            plan["object_store_free_bytes"] / 1e9,
            100 * materialize_share,
            plan["budget_bytes"] / 1e9,
        )
    materialized = all(d["materialized"] for d in plan["sets"].values())
    return StageData(sets["source_train"], sets["source_valid"], sets["target"], counts, manifests, materialized, plan)


INDEX_ATTR = "_mdlda_shard_index"


class ShardDataset(ray.data.Dataset):
    """A lazy Dataset over shard files that also carries the :class:`ShardIndex` of its rows, through pickling
    too (a Tune trial receives it by ``tune.with_parameters``; a plain Dataset pickles without extra attributes).
    Every Ray Data method still returns plain Datasets; :func:`_iter` reads a ShardDataset with
    :func:`pipelines.shard_reader.epoch_batches` instead of running it."""

    def __getstate__(self):
        return {**super().__getstate__(), INDEX_ATTR: getattr(self, INDEX_ATTR, None)}

    def __setstate__(self, state):
        state = dict(state)
        index = state.pop(INDEX_ATTR, None)
        super().__setstate__(state)
        setattr(self, INDEX_ATTR, index)


def _attach_index(ds: ray.data.Dataset, index: ShardIndex) -> ShardDataset:
    """The Dataset streamed from its shards, marked with the rows it holds: the training iterators read its rows
    themselves (pipelines/shard_reader.py: a seeded permutation, no Ray Data executor), while the Dataset stays
    what Ray Train's ``datasets=`` and other Ray Data readers run."""
    out = ray.data.Dataset.copy(ds, _as=ShardDataset)
    setattr(out, INDEX_ATTR, index)
    return out


def _shard_index(ds) -> ShardIndex | None:
    if isinstance(ds, ShardIndex):
        return ds
    return getattr(ds, INDEX_ATTR, None) if isinstance(ds, ShardDataset) else None


def _rows(ds) -> int | None:
    """Rows of a set when known without reading it (an index, or a materialised Dataset's metadata)."""
    index = _shard_index(ds)
    if index is not None:
        return len(index)
    if isinstance(ds, _Blocks):
        return len(ds.refs)
    if isinstance(ds, ray.data.dataset.MaterializedDataset):
        return ds.count()
    return None


def _run_subset(target, n: int | None, seed: int):
    """The target rows one run pairs with its source: a seeded random subset of ``n`` rows (the source set's size),
    the same every epoch of the run and different per run seed, drawn without reading a row not taken (from the
    shard index, or from a materialised set's one-row blocks). A set of at most ``n`` rows, a Ray Train
    ``DataIterator`` or a lazy Dataset without an index: the whole set (its order is new every epoch)."""
    total = _rows(target)
    if n is None or total is None or total <= n:
        return target
    seed = (seed * 2_654_435_761 + 12_345) % 2**63
    index = _shard_index(target)
    if index is not None:
        return index.sample(n, seed)
    if target.num_blocks() < total:  # blocks of several rows: no per-row draw without reading them
        return target
    blocks = _block_refs(target)  # one row each
    pick = np.sort(np.random.default_rng(seed).choice(len(blocks), size=n, replace=False))
    return _Blocks(tuple(blocks[i] for i in pick))


def _has_spread(shards: str | Path) -> bool:
    from mdlda.manifest import read_manifest

    return SPREAD in read_manifest(shards).get("options", {})


def _target_part(t: dict) -> dict:
    """The pseudo-labelled part of a batch: ``target_audio``, ``target_labels`` (+ ``target_spread``)."""
    out = {"target_audio": t["audio"], "target_labels": t["labels"]}
    if SPREAD in t:
        out["target_spread"] = np.asarray(t[SPREAD], dtype=np.float32)
    return out


def _order(ds, seed: int, shuffle_buffer: int, global_shuffle: bool) -> tuple[object, int]:
    """The epoch's row order: (dataset to iterate, local shuffle buffer to use).

    - A materialised Dataset of one-row blocks (:func:`_materialize`): a seeded random block order, which is a
      global shuffle of the rows and moves no data (always: it costs nothing; :func:`_iter` reads such a Dataset
      with :func:`_held_batches`, the same order without Ray Data's executor).
    - A lazy Dataset without a shard index (a set streamed from its shards has one and never gets here:
      :func:`_iter`), with ``global_shuffle``: Ray Data's seeded ``random_shuffle`` (an all-to-all pass over the
      set every epoch; the source set's, never MAESTRO's as a cycling target).
    - Otherwise (blocks of several rows, ``global_shuffle`` off, or a Ray Train ``DataIterator``, whose order is
      its trainer's dataset's): a seeded random block order where possible, and the local shuffle buffer."""
    if not isinstance(ds, ray.data.Dataset):
        return ds, shuffle_buffer
    seed = seed % 2**32
    if isinstance(ds, ray.data.dataset.MaterializedDataset) and ds.num_blocks() >= ds.count():
        return ds.randomize_block_order(seed=seed), 0
    if global_shuffle and not isinstance(ds, ray.data.dataset.MaterializedDataset):
        return ds.random_shuffle(seed=seed), 0
    return ds.randomize_block_order(seed=seed), shuffle_buffer


def _iter(
    ds, batch_size: int, seed: int | None, shuffle_buffer: int, drop_last: bool, global_shuffle: bool = True
) -> Iterator[dict]:
    """Numpy batches of a Dataset or a Ray Train DataIterator (same API): ``audio`` as ``(B, N)`` int16 read
    straight from the shards' PCM bytes (:func:`mdlda.pcm.numpy_batch`), labels as (B, 7) float32.

    With a seed, every pass reads the rows in a new seeded order (:func:`_order`); without one, in storage order.
    A set streamed from its shards with a row index (:func:`_attach_index`; or a bare :class:`ShardIndex`) is read
    by :func:`pipelines.shard_reader.epoch_batches`: a seeded uniform permutation of its rows (shards of the
    one-row-per-row-group layout; older ones: a seeded row-group order mixed across ``shuffle_buffer`` rows). A set
    held in one-row blocks is read by :func:`_held_batches` (a seeded block order)."""
    index = _shard_index(ds)
    if index is not None:
        yield from epoch_batches(index, batch_size, seed, shuffle_buffer, drop_last)
        return
    if isinstance(ds, _Blocks) or _one_row_blocks(ds):
        refs = ds.refs if isinstance(ds, _Blocks) else _block_refs(ds)
        yield from background(_held_batches(refs, batch_size, seed, drop_last))
        return
    buffer = 0
    if seed is not None:
        ds, buffer = _order(ds, seed, shuffle_buffer, global_shuffle)
    kwargs = {"local_shuffle_buffer_size": buffer, "local_shuffle_seed": seed} if buffer > 0 else {}
    for table in ds.iter_batches(
        batch_size=batch_size, batch_format="pyarrow", drop_last=drop_last, prefetch_batches=4, **kwargs
    ):
        yield numpy_batch(table)


@dataclass(frozen=True)
class _Blocks:
    """Some one-row blocks of a held set, by reference: a run's subset of the target (:func:`_run_subset`)."""

    refs: tuple


def _one_row_blocks(ds) -> bool:
    return isinstance(ds, ray.data.dataset.MaterializedDataset) and ds.num_blocks() >= ds.count()


def _block_refs(ds: ray.data.Dataset) -> list:
    return [ref for bundle in ds.iter_internal_ref_bundles() for ref in bundle.block_refs]


def _held_batches(refs: list | tuple, batch_size: int, seed: int | None, drop_last: bool) -> Iterator[dict]:
    """One-row blocks held in the object store (:func:`_materialize`): in a seeded random order (storage order
    without a seed), fetched a batch at a time (``ray.get``: views of the object store) and joined into the batch
    (the one copy), without starting Ray Data's executor every epoch."""
    import pyarrow as pa
    from ray.data.block import BlockAccessor

    order = np.arange(len(refs)) if seed is None else np.random.default_rng(seed % 2**32).permutation(len(refs))
    for s in range(0, len(order), batch_size):
        chunk = order[s : s + batch_size]
        if len(chunk) < batch_size and drop_last:
            return
        tables = [BlockAccessor.for_block(b).to_arrow() for b in ray.get([refs[i] for i in chunk])]
        tables = [t for t in tables if t.num_rows]
        if tables:
            yield numpy_batch(pa.concat_tables(tables))


def _cycle(ds, batch_size: int, seed: int, shuffle_buffer: int) -> Iterator[dict]:
    """Endless batches of exactly ``batch_size`` rows, reshuffled every pass; a set smaller than one batch is
    repeated to fill it."""
    round_, pending = 0, []
    while True:
        got = 0
        for b in _iter(ds, batch_size, seed * 1000 + round_, shuffle_buffer, drop_last=False, global_shuffle=False):
            got += len(b["audio"])
            pending.append(b)
            n = sum(len(p["audio"]) for p in pending)
            if n >= batch_size:
                merged = {k: np.concatenate([p[k] for p in pending]) for k in pending[0]}
                yield {k: v[:batch_size] for k, v in merged.items()}
                rest = {k: v[batch_size:] for k, v in merged.items()}
                pending = [rest] if len(rest["audio"]) else []
        if got == 0:
            raise ValueError("the target set is empty: nothing to pair with the source batches")
        round_ += 1


def train_batches(
    source: ray.data.Dataset,
    batch_size: int,
    seed: int,
    epoch: int,
    target: ray.data.Dataset | None = None,
    target_labelled: bool = False,
    shuffle_buffer: int = 64,
    global_shuffle: bool = True,
) -> Iterator[dict]:
    """One epoch of training batches: ``{"audio", "labels"}`` plus, with a target set, an equal number of
    ``"target_audio"`` (and ``"target_labels"``, ``"target_spread"`` when the target is pseudo-labelled). The
    source decides the epoch length (last partial batch dropped, so BatchNorm never sees a batch of 1); the
    target cycles over a seeded subset of the source set's size drawn per run (``seed``; :func:`_run_subset`).
    The source is shuffled globally each epoch, seeded by ``seed`` and ``epoch``: from its shards by a seeded
    permutation of its one-row row groups (:func:`_iter`), from memory by a seeded block order (:func:`_order`);
    ``global_shuffle=False`` only matters for a lazy Dataset without a shard index: a random block order and the
    local buffer instead of Ray Data's ``random_shuffle``)."""
    tgt = None
    if target is not None:  # a seeded subset of the target per run (:func:`_run_subset`), in a new order each epoch
        tgt = _cycle(_run_subset(target, _rows(source), seed), batch_size, seed + 7919 * (epoch + 1), shuffle_buffer)
    order = seed + 104_729 * (epoch + 1)
    for b in _iter(source, batch_size, order, shuffle_buffer, drop_last=True, global_shuffle=global_shuffle):
        out = {"audio": b["audio"], "labels": b["labels"]}
        if tgt is not None:
            t = next(tgt)
            out.update(_target_part(t) if target_labelled else {"target_audio": t["audio"]})
        yield out


def valid_batches(ds: ray.data.Dataset, batch_size: int = 16) -> Iterator[dict]:
    for b in _iter(ds, batch_size, None, 0, drop_last=False):
        yield {"audio": b["audio"], "labels": b["labels"]}


def frontend_stats(
    source_shards: str | Path,
    ds: ray.data.Dataset,
    cache_dir: str | Path,
    batch_size: int = 16,
    band_floor: float = 0.1,
) -> tuple[list[float], list[float]]:
    """Per-band mean/std of the training set's spectrograms, cached by the shards' content digest.

    A band whose std is below ``band_floor`` x the median band std (almost no energy over the whole training set,
    e.g. above the cut-off of the MP3 codec the labelled clips were stored with) gets std 1: centred, but not blown
    up. Without that, an uncompressed target recording (a MAESTRO WAV) has energy there that the std of ~0.001
    turns into values of 10-300 standard deviations, and the model's outputs leave the rating scale.
    """
    from mdlda.frontend import Frontend, floored_std, standardization_stats
    from mdlda.manifest import read_manifest

    digest = read_manifest(source_shards)["content_digest"]
    cache = Path(cache_dir) / f"frontend-stats-{digest[:16]}-floor{band_floor:g}.json"
    if cache.exists():
        d = json.loads(cache.read_text())
        return d["mean"], d["std"]
    frontend = Frontend()
    mean, std = standardization_stats(frontend, (b["audio"] for b in valid_batches(ds, batch_size)))
    std = floored_std(std.numpy(), band_floor)
    cache.parent.mkdir(parents=True, exist_ok=True)
    out = {"mean": mean.numpy().astype(float).tolist(), "std": std.astype(float).tolist(), "digest": digest}
    cache.write_text(json.dumps(out))
    return out["mean"], out["std"]


def pooled_batches(
    source,
    target,
    batch_size: int,
    seed: int,
    epoch: int,
    sizes: tuple[int, int],
    shuffle_buffer: int = 64,
    order_seed: int | None = None,
) -> Iterator[dict]:
    """One epoch of the student's pooled mix: every labelled source and every pseudo-labelled target segment once,
    in domain-pure batches (``{"audio", "labels"}`` or :func:`_target_part`'s keys) interleaved in a
    seeded random order, so each domain weighs by its size (the paper's union of the two sets) and BatchNorm
    still normalises one domain at a time. ``sizes``: the expected (source, target) rows of this reader, for the
    order; rows beyond it are still read. Batches of fewer than 2 rows are dropped (BatchNorm needs 2).
    ``order_seed`` (default ``seed``) seeds the interleaving: data-parallel workers must share it, so that every
    rank reads the same domain at the same step (Ray's streaming split serves the ranks in lockstep, and the
    gradient all-reduce needs the same number of steps everywhere); ``seed`` shuffles the rows."""
    rng = np.random.default_rng([seed if order_seed is None else order_seed, epoch])
    streams = [
        (
            _iter(source, batch_size, seed + 104_729 * (epoch + 1), shuffle_buffer, drop_last=True),
            lambda b: {"audio": b["audio"], "labels": b["labels"]},
        ),
        (
            _iter(target, batch_size, seed + 7919 * (epoch + 1), shuffle_buffer, drop_last=False, global_shuffle=False),
            _target_part,
        ),
    ]
    order = rng.permutation(np.repeat([0, 1], [sizes[0] // batch_size, max(1, -(-sizes[1] // batch_size))]))
    live = [True, True]

    def pull(d: int) -> dict | None:
        it, part = streams[d]
        while live[d]:
            b = next(it, None)
            if b is None:
                live[d] = False
            elif len(b["audio"]) >= 2:
                return part(b)
        return None

    for d in order:
        b = pull(int(d))
        if b is not None:
            yield b
    for d in (0, 1):  # whatever the expected sizes missed
        while (b := pull(d)) is not None:
            yield b
