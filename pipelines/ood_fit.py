"""The OOD statistics a registered model carries (:mod:`mdlda.ood`): one pass of each model's embedding over the
source training split of the chain's shards, computed where the stages register models (teachers and baselines
in :mod:`pipelines.select`, the student in :mod:`pipelines.student_stage`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mdlda import ood
from mdlda.params import PCM_SCALE
from pipelines.shards import local_batches

OOD_SPLIT = "train"


def training_ood(
    models: Sequence[nn.Module], shards: str | Path, split: str = OOD_SPLIT, batch_size: int = 8
) -> list[ood.OodStats]:
    """The :class:`~mdlda.ood.OodStats` of every model on ``split`` of ``shards``, reading the shards once."""
    embeddings: list[list[np.ndarray]] = [[] for _ in models]
    for batch in local_batches(shards, [split], ["audio"], batch_size=64):
        audio = batch["audio"]  # (b, 330750) int16
        for i in range(0, len(audio), batch_size):
            x = torch.from_numpy(audio[i : i + batch_size].astype(np.float32) / PCM_SCALE)
            for k, model in enumerate(models):
                embeddings[k].append(ood.embed(model, [x]))  # (b, D)
    source = f"{Path(shards).name} {split} split"
    return [ood.fit(np.concatenate(e), source=source) for e in embeddings]
