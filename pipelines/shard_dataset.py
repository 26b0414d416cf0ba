"""A streamed set as both the stage data (:mod:`pipelines.data`) and the batch iterators (:mod:`pipelines.batches`)
see it: a lazy Ray Dataset that also carries the row index of its shards (:mod:`pipelines.shard_index`). Its own
module because both of them use it and ``data`` imports ``batches``."""

from __future__ import annotations

import ray

from pipelines.shard_index import ShardIndex

INDEX_ATTR = "_mdlda_shard_index"


class ShardDataset(ray.data.Dataset):
    """A lazy Dataset over shard files that also carries the :class:`ShardIndex` of its rows, through pickling
    too (a Tune trial receives it by ``tune.with_parameters``; a plain Dataset pickles without extra attributes).
    Every Ray Data method still returns plain Datasets; :func:`pipelines.batches._iter` reads a ShardDataset with
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
    """The row index a set is read by: a bare :class:`ShardIndex`, or a :class:`ShardDataset`'s; None otherwise."""
    if isinstance(ds, ShardIndex):
        return ds
    return getattr(ds, INDEX_ATTR, None) if isinstance(ds, ShardDataset) else None
