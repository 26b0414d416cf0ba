"""What `mdlda prepare` keeps in its ``--out`` folder, and the rules that keep users' files safe there.

The folder holds only what prepare writes: ``manifest.json``, ``data/chunk-NNNNN-part-NNNNN.parquet`` and the
resume state in ``.prepare/`` (``state.json``, ``chunk-NNNNN.json``, ``staging-NNNNN/part-NNNNN.parquet``), plus
the command's lock file. :func:`check_out_folder` refuses a non-empty folder that is not such a shard folder (no
manifest or state of ours: e.g. a dataset's own ``data/``), and one whose ``data/`` holds files prepare did not
write (they would be read as shards); other strangers in a shard folder of ours are left where they are.
:func:`remove_ours` and :func:`remove_chunk_files` delete files matching those names only, so nothing prepare did
not write is ever deleted.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from mdlda.manifest import DATA_DIR, MANIFEST

STATE_DIR = ".prepare"
STATE_FILE = "state.json"
LOCK_NAME = ".mdlda.lock"  # mdlda.lock.LOCK_FILE (not imported: pipelines stay free of the CLI layer)

_DATA_FILE = re.compile(r"chunk-(\d{5,})-part-\d{5,}\.parquet")
_STAGING_DIR = re.compile(r"staging-\d{5,}")
_STAGING_FILE = re.compile(r"part-\d{5,}\.parquet")


class PrepareError(RuntimeError):
    """The prepare stage refused to write a dataset (too many failures, a folder holding other shards, ...)."""


class FolderError(PrepareError):
    """``--out`` holds files prepare did not write; the message names the folder, the files and the fix."""


def is_ours_marked(out: Path) -> bool:
    """True when ``out`` holds a manifest or resume state written by prepare."""
    if (out / STATE_DIR / STATE_FILE).is_file():
        return True
    try:
        manifest = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and {"index_digest", "content_digest", "dataset"} <= manifest.keys()


def _strangers(out: Path, limit: int = 5) -> list[str]:
    """Up to ``limit`` entries of ``out/data`` prepare would not have written (everything there is read as shards;
    elsewhere in the folder a stranger is harmless: it is neither read nor deleted)."""
    folder = out / DATA_DIR
    if not folder.is_dir():
        return []
    return [
        f"{DATA_DIR}/{e.name}" for e in sorted(folder.iterdir()) if not (_DATA_FILE.fullmatch(e.name) and e.is_file())
    ][:limit]


def _has_files(out: Path) -> bool:
    """Anything in ``out`` besides the lock file and empty folders of ours."""
    for entry in out.iterdir():
        if entry.name == LOCK_NAME:
            continue
        if entry.name in (DATA_DIR, STATE_DIR) and entry.is_dir():
            if any(p.is_file() or p.is_symlink() for p in entry.rglob("*")):
                return True
            continue
        return True
    return False


def check_out_folder(out: Path) -> None:
    """Refuse an ``--out`` prepare must not write into (see the module docstring); a new or empty folder is fine."""
    if not out.exists():
        return
    if not out.is_dir():
        raise FolderError(f"--out {out} is a file, not a folder: pass a new or empty folder for the shards")
    if not is_ours_marked(out):
        if _has_files(out):
            raise FolderError(
                f"--out {out} is not empty and is not an mdlda shard folder (it has no {MANIFEST} or "
                f"{STATE_DIR}/{STATE_FILE} written by `mdlda prepare`). prepare replaces the files it writes in "
                "its --out, so it will not write into a folder that holds other files (a dataset's own data/, for "
                "one). Pass a new or empty folder as --out, e.g. <workdir>/shards/<dataset>."
            )
        return
    strangers = _strangers(out)
    if strangers:
        raise FolderError(
            f"--out {out} is an mdlda shard folder, but holds files `mdlda prepare` did not write: "
            f"{', '.join(strangers)}. They would be read as shards, and prepare deletes only its own files: move "
            "them out of the folder, or pass a new or empty folder as --out."
        )


def _unlink_matching(folder: Path, pattern: re.Pattern, keep=lambda m: False) -> None:
    if not folder.is_dir():
        return
    for f in folder.iterdir():
        m = pattern.fullmatch(f.name)
        if m and f.is_file() and not keep(m):
            f.unlink()


def rmdir_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:  # missing, or holding something not ours: left alone
        pass


def remove_staging(out: Path) -> None:
    """Delete the staging part files of unfinished chunks (and their then-empty folders)."""
    state = out / STATE_DIR
    if state.is_dir():
        for staging in state.glob("staging-*"):
            if staging.is_dir() and _STAGING_DIR.fullmatch(staging.name):
                _unlink_matching(staging, _STAGING_FILE)
                rmdir_if_empty(staging)


def remove_chunk_files(out: Path, done: set[int]) -> None:
    """Delete the data files and records of chunks not in ``done`` (unfinished: redone, never duplicated)."""
    remove_staging(out)
    _unlink_matching(out / DATA_DIR, _DATA_FILE, keep=lambda m: int(m.group(1)) in done)
    record = re.compile(r"chunk-(\d{5,})\.json")
    _unlink_matching(out / STATE_DIR, record, keep=lambda m: int(m.group(1)) in done)


def remove_ours(out: Path) -> None:
    """Delete every file prepare wrote in ``out`` (manifest, data files, resume state) and nothing else."""
    (out / MANIFEST).unlink(missing_ok=True)
    (out / f"{MANIFEST}.tmp").unlink(missing_ok=True)
    remove_chunk_files(out, done=set())
    _unlink_matching(out / STATE_DIR, re.compile(r"state\.json|\.(state|chunk-\d{5,})\.json\..+\.tmp"))


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write ``obj`` as JSON via a temporary file in the same folder and ``os.replace``: a kill at any moment
    leaves the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def chunk_of(name: str) -> int | None:
    """The chunk number in a data file's name (``chunk-00003-part-00001.parquet`` -> 3), None if not ours."""
    m = _DATA_FILE.fullmatch(name)
    return int(m.group(1)) if m else None


def _rows_of(path: Path) -> int | None:
    """Row count from a Parquet file's footer (cheap: no data is read); None when the file is unreadable."""
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path).metadata.num_rows
    except Exception:  # truncated or not Parquet at all: ArrowInvalid, OSError
        return None


def data_files(out: Path) -> list[dict]:
    """Name, size in bytes and row count of every data file prepare wrote in ``out`` (listed in the manifest)."""
    folder = out / DATA_DIR
    files = sorted(f for f in folder.iterdir() if _DATA_FILE.fullmatch(f.name)) if folder.is_dir() else []
    return [{"name": f.name, "bytes": f.stat().st_size, "rows": _rows_of(f)} for f in files]


def check_files(out: Path, manifest: dict) -> list[tuple[str, str]]:
    """``(file name, what is wrong)`` for every data file that is missing, truncated, resized, unreadable or not
    listed in the manifest; [] when the folder holds exactly the files the manifest lists. A manifest from before
    the file list only gets its total row count checked against the files' footers."""
    present = {f["name"]: f for f in data_files(out)}
    listed = manifest.get("files")
    problems: list[tuple[str, str]] = []
    if listed is None:
        unreadable = [(n, "unreadable (truncated or not Parquet)") for n, f in present.items() if f["rows"] is None]
        total = sum(f["rows"] or 0 for f in present.values())
        if unreadable or total != manifest.get("rows"):
            problems = unreadable or [("*", f"the files hold {total} rows, the manifest {manifest.get('rows')}")]
        return problems
    for want in listed:
        got = present.pop(want["name"], None)
        if got is None:
            problems.append((want["name"], "missing"))
        elif got["rows"] is None:
            problems.append((want["name"], f"unreadable (truncated or not Parquet; {got['bytes']} bytes)"))
        elif got["bytes"] != want["bytes"] or got["rows"] != want["rows"]:
            problems.append(
                (
                    want["name"],
                    f"{got['bytes']} bytes / {got['rows']} rows, the manifest lists {want['bytes']} / {want['rows']}",
                )
            )
    problems += [(name, "not listed in the manifest") for name in sorted(present)]
    return problems


OUTPUT_MARK = ".mdlda-output"  # written first into a folder a stage then fills (a crash before its manifest)


def clear_stage_output(out: Path, dataset: str) -> None:
    """Make ``out`` ready for a stage's new output: delete what an earlier run of the stage wrote there (its
    manifest of ``dataset``, the Parquet files in ``data/``, the mark) and nothing else, then mark the folder.

    A folder holding anything else, or not marked as the stage's, is refused with the names of the files that are
    in the way: the stage never deletes a file it did not write.
    """
    if out.exists():
        marked = (out / OUTPUT_MARK).is_file()
        try:
            marked = marked or json.loads((out / MANIFEST).read_text()).get("dataset") == dataset
        except (OSError, ValueError, AttributeError):
            pass
        data = out / DATA_DIR
        files = [f for f in out.rglob("*") if (f.is_file() or f.is_symlink()) and f.name != LOCK_NAME]
        ours = {out / MANIFEST, out / OUTPUT_MARK}
        strangers = [f for f in files if not (marked and (f in ours or (f.parent == data and f.suffix == ".parquet")))]
        if strangers:
            listed = ", ".join(sorted(str(f.relative_to(out)) for f in strangers)[:5])
            raise FolderError(
                f"{out} holds files this stage did not write ({listed}); it replaces only its own output there. "
                "Move them out of the folder, or use another workdir."
            )
        _unlink_matching(data, re.compile(r".+\.parquet"))
        rmdir_if_empty(data)
        (out / MANIFEST).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / OUTPUT_MARK).write_text(dataset)
