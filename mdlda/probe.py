"""A label-free probe of the target domain: neighbour rank (Gururani et al., ICML 2019 workshop, "rank@100").

Piano recordings carry no mid-level labels, but consecutive 15-s segments of one performance share most of what
a mid-level model should hear (the piece, the player, the instrument, the room). A model whose representation of
piano music is informative puts a segment's successor closer to it than segments of other performances. For each
segment that has a successor in its performance, the successor is ranked among ``n_distractors`` random segments
of *other* performances by cosine distance to the segment; rank 1 is best, ``n_distractors + 1`` worst, and a
representation that knows nothing gives about ``(n_distractors + 2) / 2`` on average.

When fewer other-performance segments exist than ``n_distractors`` (small datasets), every one of them is a
distractor and ``pool`` (distractors + 1) says what the rank is out of: compare models only at the same pool.
Ties count half, so a constant representation scores the chance level rather than 1.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike


def _unit(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(n > 0, n, 1.0)


def successor_pairs(groups: ArrayLike, offsets: ArrayLike) -> list[tuple[int, int]]:
    """(segment, next segment of the same performance) index pairs, in order of ``offsets`` within each group."""
    g = np.asarray(groups)
    o = np.asarray(offsets, dtype=np.float64)
    if g.shape != o.shape or g.ndim != 1:
        raise ValueError(f"groups {g.shape} and offsets {o.shape} must be 1-d and of one length")
    pairs = []
    for name in dict.fromkeys(g.tolist()):
        idx = np.flatnonzero(g == name)
        idx = idx[np.argsort(o[idx], kind="stable")]
        pairs += list(zip(idx[:-1].tolist(), idx[1:].tolist(), strict=True))
    return pairs


def neighbour_rank(
    vectors: ArrayLike, groups: ArrayLike, offsets: ArrayLike, n_distractors: int = 99, seed: int = 0
) -> dict[str, float]:
    """Mean and geometric-mean rank of each segment's successor among distractors from other performances.

    ``vectors``: ``(N, D)`` per-segment embeddings or outputs; ``groups``: ``(N,)`` performance ids; ``offsets``:
    ``(N,)`` segment start times. Returns ``rank_mean``, ``rank_geo`` (lower is better), ``chance`` (the mean rank
    a representation without information gets at this pool), ``pool`` and ``n_anchors``; NaN ranks when no
    segment has both a successor and a segment of another performance.
    """
    x = np.asarray(vectors, dtype=np.float64)
    if x.ndim != 2 or len(x) != len(np.asarray(groups)):
        raise ValueError(f"vectors must be (N, D) with N = {len(np.asarray(groups))} groups, got {x.shape}")
    if n_distractors < 1:
        raise ValueError(f"n_distractors must be at least 1, got {n_distractors}")
    g = np.asarray(groups)
    u = _unit(x)
    rng = np.random.default_rng(seed)
    ranks, pools = [], []
    for i, j in successor_pairs(g, offsets):
        others = np.flatnonzero(g != g[i])
        if not len(others):
            continue
        if len(others) > n_distractors:
            others = rng.choice(others, n_distractors, replace=False)
        d_pos = 1.0 - u[i] @ u[j]
        d_neg = 1.0 - u[others] @ u[i]
        tie = np.isclose(d_neg, d_pos, rtol=0.0, atol=1e-12)
        ranks.append(1.0 + float((~tie & (d_neg < d_pos)).sum()) + 0.5 * float(tie.sum()))
        pools.append(len(others) + 1)
    if not ranks:
        return {"rank_mean": math.nan, "rank_geo": math.nan, "chance": math.nan, "pool": 0, "n_anchors": 0}
    r = np.asarray(ranks)
    pool = int(np.median(pools))
    return {
        "rank_mean": float(r.mean()),
        "rank_geo": float(np.exp(np.log(r).mean())),
        "chance": float(np.mean([(p + 1) / 2 for p in pools])),
        "pool": pool,
        "n_anchors": len(r),
    }
