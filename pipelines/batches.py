"""The batch iterators the shared training loop consumes, over the source and target sets of
:mod:`pipelines.data`.

Every batch iterator pairs each labelled source batch with an equal-sized target batch for DANN/distillation
(:func:`train_batches`; the target a seeded subset of the source set's size per run, :func:`_run_subset`) or
interleaves domain-pure batches (:func:`pooled_batches`); a :class:`Sampling` says how one reader draws its
batches. A set held in the object store in one-row blocks is read by its block references in a seeded order
(:func:`_held_batches`); a set streamed from its shards carries its row index
(:class:`pipelines.shard_dataset.ShardDataset`) and is read by :func:`pipelines.shard_reader.epoch_batches`, a
seeded permutation of all its rows, one ``preadv`` per segment into its batch; neither starts Ray Data's executor
every epoch. ``audio`` arrives as ``(B, N)`` int16 PCM (mdlda/pcm.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import ray

from mdlda.pcm import numpy_batch
from pipelines.shard_dataset import _shard_index
from pipelines.shard_reader import background, epoch_batches

SPREAD = "teacher_spread"
RAW_LABELS = "labels_raw"  # pseudo-labels: the teachers' mean before their output calibration (StudentConfig.labels)


@dataclass(frozen=True)
class Sampling:
    """How one reader draws its batches: ``batch_size`` rows, in an order seeded by ``seed`` (and the epoch),
    through a local shuffle buffer of ``shuffle_buffer`` rows; ``global_shuffle``: see :func:`_order`."""

    batch_size: int
    seed: int
    shuffle_buffer: int = 64
    global_shuffle: bool = True


def _target_part(t: dict) -> dict:
    """The pseudo-labelled part of a batch: ``target_audio``, ``target_labels`` (+ ``target_spread``,
    ``target_labels_raw``)."""
    out = {"target_audio": t["audio"], "target_labels": t["labels"]}
    if SPREAD in t:
        out["target_spread"] = np.asarray(t[SPREAD], dtype=np.float32)
    if RAW_LABELS in t:
        out["target_labels_raw"] = t[RAW_LABELS]
    return out


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
    A set streamed from its shards with a row index (:func:`pipelines.shard_dataset._attach_index`; or a bare
    :class:`~pipelines.shard_index.ShardIndex`) is read by :func:`pipelines.shard_reader.epoch_batches`: a seeded
    uniform permutation of its rows (shards of the one-row-per-row-group layout; older ones: a seeded row-group
    order mixed across ``shuffle_buffer`` rows). A set held in one-row blocks is read by :func:`_held_batches` (a
    seeded block order)."""
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
    sampling: Sampling,
    epoch: int,
    target: ray.data.Dataset | None = None,
    target_labelled: bool = False,
) -> Iterator[dict]:
    """One epoch of training batches: ``{"audio", "labels"}`` plus, with a target set, an equal number of
    ``"target_audio"`` (and ``"target_labels"``, ``"target_spread"`` when the target is pseudo-labelled). The
    source decides the epoch length (last partial batch dropped, so BatchNorm never sees a batch of 1); the
    target cycles over a seeded subset of the source set's size drawn per run (``sampling.seed``;
    :func:`_run_subset`). The source is shuffled globally each epoch, seeded by ``sampling.seed`` and ``epoch``: from
    its shards by a seeded permutation of all its rows (:func:`_iter`), from memory by a seeded block order
    (:func:`_order`); ``sampling.global_shuffle=False`` only matters for a lazy Dataset without a shard index: a
    random block order and the local buffer instead of Ray Data's ``random_shuffle``."""
    batch_size, seed, shuffle_buffer = sampling.batch_size, sampling.seed, sampling.shuffle_buffer
    tgt = None
    if target is not None:  # a seeded subset of the target per run (:func:`_run_subset`), in a new order each epoch
        tgt = _cycle(_run_subset(target, _rows(source), seed), batch_size, seed + 7919 * (epoch + 1), shuffle_buffer)
    order = seed + 104_729 * (epoch + 1)
    for b in _iter(source, batch_size, order, shuffle_buffer, drop_last=True, global_shuffle=sampling.global_shuffle):
        out = {"audio": b["audio"], "labels": b["labels"]}
        if tgt is not None:
            t = next(tgt)
            out.update(_target_part(t) if target_labelled else {"target_audio": t["audio"]})
        yield out


def valid_batches(ds: ray.data.Dataset, batch_size: int = 16) -> Iterator[dict]:
    for b in _iter(ds, batch_size, None, 0, drop_last=False):
        yield {"audio": b["audio"], "labels": b["labels"]}


def pooled_batches(
    source,
    target,
    sampling: Sampling,
    epoch: int,
    sizes: tuple[int, int],
    order_seed: int | None = None,
) -> Iterator[dict]:
    """One epoch of the student's pooled mix: every labelled source and every pseudo-labelled target segment once,
    in domain-pure batches (``{"audio", "labels"}`` or :func:`_target_part`'s keys) interleaved in a
    seeded random order, so each domain weighs by its size (the paper's union of the two sets) and BatchNorm
    still normalises one domain at a time. ``sizes``: the expected (source, target) rows of this reader, for the
    order; rows beyond it are still read. Batches of fewer than 2 rows are dropped (BatchNorm needs 2).
    ``order_seed`` (default ``sampling.seed``) seeds the interleaving: data-parallel workers must share it, so that
    every rank reads the same domain at the same step (Ray's streaming split serves the ranks in lockstep, and the
    gradient all-reduce needs the same number of steps everywhere); ``sampling.seed`` shuffles the rows."""
    batch_size, seed, shuffle_buffer = sampling.batch_size, sampling.seed, sampling.shuffle_buffer
    rng = np.random.default_rng([seed if order_seed is None else order_seed, epoch])
    streams = [
        (
            _iter(source, batch_size, seed + 104_729 * (epoch + 1), shuffle_buffer, True, sampling.global_shuffle),
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
