"""Shard manifests: what a shard folder holds, how it was made, and a digest of its content.

A manifest (``manifest.json`` beside the Parquet files) records row counts per split, the source root, the
audio parameters, the decoder/resampler, the code version, the items skipped and why, and a content digest
(SHA-256 over the sorted per-row digests, so rebuilding from the same inputs gives the same digest).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from mdlda import __version__
from mdlda.params import audio_params, check_audio_params

MANIFEST = "manifest.json"
DATA_DIR = "data"


class ShardError(ValueError):
    """A shard folder is missing, incomplete or unusable. The message names the folder."""


def row_digest(clip_id: str, split: str, labels: Any, audio_bytes: bytes) -> str:
    """SHA-1 of one row's identity, labels and PCM bytes (labels rounded to 1e-4 so float noise is ignored)."""
    h = hashlib.sha1()
    lab = "null" if labels is None else ",".join(f"{float(v):.4f}" for v in labels)
    h.update(f"{clip_id}|{split}|{lab}|".encode())
    h.update(audio_bytes)
    return h.hexdigest()


def content_digest(row_digests: dict[str, str]) -> str:
    """SHA-256 over ``clip_id:row_digest`` lines sorted by clip id (independent of write order)."""
    h = hashlib.sha256()
    for clip_id in sorted(row_digests):
        h.update(f"{clip_id}:{row_digests[clip_id]}\n".encode())
    return h.hexdigest()


def build_manifest(
    *,
    dataset: str,
    source_root: str,
    counts: dict[str, int],
    skipped: list[dict],
    row_digests: dict[str, str],
    index_digest: str,
    options: dict,
    decoder: dict,
    clip_fitting: dict[str, int] | None = None,
    files: list[dict] | None = None,
    warnings: list[dict] | None = None,
) -> dict[str, Any]:
    """The manifest dict; ``files`` (name, bytes, rows of each data file) lets a rerun check the folder is intact.

    ``warnings`` lists items whose rows were written but are fewer than expected (``{"item", "reason"}``, e.g. a
    truncated MAESTRO WAV); ``n_warnings`` counts them.
    """
    extra = {} if files is None else {"files": files}
    return {
        "dataset": dataset,
        "source_root": source_root,
        "rows": int(sum(counts.values())),
        "counts": {k: int(v) for k, v in sorted(counts.items())},
        "audio": audio_params(),
        "decoder": decoder,
        "clip_fitting": clip_fitting or {},
        "skipped": skipped,
        "warnings": list(warnings or []),
        "n_warnings": len(warnings or []),
        "content_digest": content_digest(row_digests),
        "index_digest": index_digest,
        "options": options,
        "code_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **extra,
    }


def write_manifest(folder: str | Path, manifest: dict) -> Path:
    path = Path(folder) / MANIFEST
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False))
    tmp.replace(path)  # atomic: a manifest exists only for a complete shard folder
    return path


def read_manifest(folder: str | Path, check_params: bool = True) -> dict[str, Any]:
    """Read and validate a shard folder's manifest; refuses other audio parameters."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not folder.exists():
        raise ShardError(f"{folder}: no such shard folder (run `mdlda prepare` first)")
    if not path.exists():
        raise ShardError(
            f"{folder}: no {MANIFEST} — the folder is not a finished shard set "
            "(an interrupted `mdlda prepare` is completed by rerunning the same command)"
        )
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ShardError(f"{path}: not valid JSON ({exc})") from exc
    if check_params:
        check_audio_params(manifest.get("audio", {}), str(folder))
    return manifest


def index_digest(table, options: dict) -> str:
    """Digest of what a prepare run will read: items, their files' sizes and mtimes, labels, options."""
    h = hashlib.sha256()
    h.update(json.dumps(options, sort_keys=True, default=str).encode())
    h.update(json.dumps(audio_params(), sort_keys=True).encode())
    for row in table.sort_values("clip_id").itertuples(index=False):
        p = Path(row.path)
        st = p.stat() if p.exists() else None
        lab = None if row.labels is None else [round(float(v), 4) for v in row.labels]
        sig = (
            row.clip_id,
            row.split,
            row.group,
            row.domain,
            lab,
            st.st_size if st else -1,
            int(st.st_mtime) if st else -1,
        )
        h.update(json.dumps(sig, default=str).encode())
    return h.hexdigest()
