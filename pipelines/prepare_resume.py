"""The resume state of `mdlda prepare` in ``<out>/.prepare/``: which chunks are finished and their per-item
records, and the reopening of chunks whose shard files were damaged."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from mdlda.manifest import DATA_DIR, MANIFEST
from pipelines.prepare_folder import STATE_DIR, STATE_FILE, PrepareError, chunk_of, write_json_atomic

logger = logging.getLogger("pipelines.prepare")  # the stage's own lines, under one logger


def load_state(state_dir: Path) -> dict:
    path = state_dir / STATE_FILE
    if not path.exists():
        return {}
    try:
        state = json.loads(path.read_text())
        if not isinstance(state, dict) or not isinstance(state.get("done", []), list):
            raise ValueError("expected an object with a 'done' list")
    except ValueError as exc:
        raise PrepareError(
            f"{path} is unreadable ({exc}): the resume state of an interrupted run. Pass --overwrite to start "
            "this shard folder again (only the files prepare wrote are replaced)."
        ) from exc
    return state


def done_records(state_dir: Path, done: list[int]) -> dict[int, list[dict]]:
    """The per-item records of the finished chunks; a chunk whose record is missing or unreadable is dropped."""
    out = {}
    for i in done:
        try:
            out[int(i)] = json.loads((state_dir / f"chunk-{int(i):05d}.json").read_text())
        except (OSError, ValueError):
            logger.warning("prepare: the record of finished chunk %s in %s is missing: redoing it", i, state_dir)
    return out


def reopen_damaged(out: Path, state_dir: Path, digest: str, problems: list[tuple[str, str]]) -> list[str]:
    """The manifest's files do not match the data folder: mark the chunks of the damaged files unfinished (their
    items are redone) and drop the manifest; refuse when there is no resume state to redo them from."""
    lines = [f"{name}: {why}" for name, why in problems]
    state = load_state(state_dir)
    chunks = {chunk_of(name) for name, _ in problems}
    if state.get("index_digest") != digest or None in chunks:
        raise PrepareError(
            f"{out}: the shard files do not match {MANIFEST} ({'; '.join(lines[:5])}), and there is no resume state "
            f"in {STATE_DIR}/ to redo only them. Pass --overwrite to rebuild the folder."
        )
    for line in lines:
        logger.warning("prepare: %s/%s/%s: redoing its chunk", out, DATA_DIR, line)
    state["done"] = sorted(set(state["done"]) - chunks)
    write_json_atomic(state_dir / STATE_FILE, state)
    (out / MANIFEST).unlink()
    return lines
