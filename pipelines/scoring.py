"""Scoring a model on the evaluation splits from its checkpoint: predictions and embeddings on the non-piano test
split, the piano test subset and MAESTRO test segments, optionally with per-domain BatchNorm statistics (AdaBN),
and the metric rows the results tables are made of (r, RMSE, share on the 1..10 scale, domain discrepancy).
Shared by `mdlda evaluate` and `mdlda ablation`.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mdlda.adapt import recalibrate_batchnorm
from mdlda.config import ChainConfig
from mdlda.metrics import domain_discrepancy, in_scale, level_offsets, rating_metrics, regression_metrics
from mdlda.params import LABEL_SCALE, PCM_SCALE, SEGMENT_SAMPLES
from pipelines.evaluate import load_split
from pipelines.shards import local_index, local_rows

ADAPT_CAP = 512  # segments per domain used to recompute BatchNorm statistics


def _audio(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x.astype(np.float32) / PCM_SCALE)


@torch.no_grad()
def _outputs(model, audio: np.ndarray, batch_size: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """(ratings (N, 7) on 1..10, embeddings (N, D)) of ``model`` in eval mode."""
    model.eval()
    preds, embs = [], []
    for i in range(0, len(audio), batch_size):
        feats = model.forward_features(_audio(audio[i : i + batch_size]))
        embs.append(feats.float().numpy())
        preds.append((model.forward_head(feats) * LABEL_SCALE).float().numpy())
    return np.concatenate(preds), np.concatenate(embs)


def _batches(audio: np.ndarray, batch_size: int = 8):
    for i in range(0, len(audio) - 1, batch_size):
        yield _audio(audio[i : i + batch_size])


def adabn(model, domain_audio: np.ndarray):
    adapted = copy.deepcopy(model)
    recalibrate_batchnorm(adapted, _batches(domain_audio))
    return adapted


def _sample(shards: Path, splits: list[str] | None, cap: int, seed: int) -> np.ndarray:
    """A seeded random subset of up to ``cap`` segments of ``splits``, in storage order; only those are read."""
    index = local_index(shards, splits, ["audio"]).sample(cap, seed)
    audio = local_rows(shards, index=index).get("audio")
    return np.zeros((0, SEGMENT_SAMPLES), dtype=np.int16) if audio is None else audio


@dataclass
class EvalData:
    test: dict
    piano: dict
    source_train: np.ndarray  # for the source-domain BN statistics
    maestro_train: np.ndarray  # for the target-domain BN statistics
    maestro_test: np.ndarray  # unlabelled piano recordings: the on-scale check
    label_mean: np.ndarray
    probe: dict | None = None  # MAESTRO segments of whole performances (audio, group, offset_s): the neighbour rank


def eval_data(workdir: Path, cfg: ChainConfig) -> EvalData:
    midlevel, maestro = workdir / "shards" / "midlevel", workdir / "shards" / "maestro"
    train = load_split(midlevel, "train")
    maestro_splits = cfg.data.maestro_splits or ["train"]
    test_split = [s for s in ("test",) if s not in maestro_splits] or None
    return EvalData(
        test=load_split(midlevel, "test"),
        piano=load_split(midlevel, "piano_test"),
        source_train=train["audio"][:ADAPT_CAP],
        maestro_train=_sample(maestro, maestro_splits, ADAPT_CAP, 0),
        maestro_test=_sample(maestro, test_split, ADAPT_CAP, 1),
        label_mean=train["labels"].mean(axis=0),
        probe=probe_segments(maestro, ADAPT_CAP, 2),
    )


def probe_segments(shards: Path, cap: int, seed: int) -> dict | None:
    """Whole MAESTRO performances (every split: the probe needs no labels), drawn at random until ``cap``
    segments: a segment's successor is always in the set. None when the shards hold no segments."""
    index = local_index(shards, None, ["audio", "group", "offset_s"])  # no audio read yet
    if not len(index):
        return None
    keep, total = [], 0
    groups, sizes = np.unique(index.small["group"], return_counts=True)
    for k in np.random.default_rng(seed).permutation(len(groups)):
        if total and total + sizes[k] > cap:
            continue
        keep.append(groups[k])
        total += sizes[k]
    rows = np.flatnonzero(np.isin(index.small["group"], keep))
    return local_rows(shards, index=index.take(rows))  # only the chosen performances' audio is read


def probe_rows(pred: dict, emb: dict | None, data: EvalData) -> dict:
    """Neighbour rank (mdlda.probe) of the model's embedding and of its 7 outputs on the probe segments."""
    from mdlda.probe import neighbour_rank

    out = {}
    if data.probe is None or pred.get("probe") is None:
        return out
    spaces = {"out": pred["probe"]} | ({"emb": emb["probe"]} if emb and emb.get("probe") is not None else {})
    for space, vectors in spaces.items():
        r = neighbour_rank(vectors, data.probe["group"], data.probe["offset_s"])
        out[f"rank_{space}"], out[f"rank_{space}_geo"] = r["rank_mean"], r["rank_geo"]
        out["rank_pool"], out["rank_chance"] = r["pool"], r["chance"]
    return out


def metric_rows(name: str, seed: int, data: EvalData, pred: dict, emb: dict | None) -> list[dict]:
    """Metric rows (test, piano_test) of one model from its predictions (and embeddings, if it has one)."""
    rows = []
    for split, d in (("test", data.test), ("piano_test", data.piano)):
        p = pred[split]
        ref = np.broadcast_to(data.label_mean, d["labels"].shape)
        row = {"seed": seed, "model": name, "split": split, **rating_metrics(d["labels"], p)}
        row["rmse_ref"] = regression_metrics(d["labels"], ref)["rmse_mean"]
        row["offset_ref"] = level_offsets(d["labels"], ref)["offset_mean"]  # how far the split's level is from it
        if split == "piano_test":
            row["disc_out"] = domain_discrepancy(pred["test"], p)
            row["disc_emb"] = domain_discrepancy(emb["test"], emb["piano_test"]) if emb else math.nan
            m = pred.get("maestro")
            row["in_scale_maestro"] = in_scale(m) if m is not None else math.nan
            row |= probe_rows(pred, emb, data)
        rows.append(row)
    return rows


def predict_all(model, data: EvalData, per_domain_bn: bool) -> tuple[dict, dict]:
    """Predictions and embeddings on test / piano_test / MAESTRO test, with per-domain BN statistics if asked."""
    src = adabn(model, data.source_train) if per_domain_bn else model
    tgt = adabn(model, data.maestro_train) if per_domain_bn else model
    pred, emb = {}, {}
    pred["test"], emb["test"] = _outputs(src, data.test["audio"])
    pred["piano_test"], emb["piano_test"] = _outputs(tgt, data.piano["audio"])
    pred["maestro"], _ = _outputs(tgt, data.maestro_test) if len(data.maestro_test) else (None, None)
    if data.probe is not None:
        pred["probe"], emb["probe"] = _outputs(tgt, data.probe["audio"])
    return pred, emb
