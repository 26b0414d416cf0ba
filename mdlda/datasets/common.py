"""What every dataset index shares: the :class:`DatasetIndex` it returns, its errors, and careful CSV reading.

An index is a plain table of items to decode (one row per Mid-level clip or MAESTRO performance) plus the
items it could not use and why. Nothing is decoded here; the prepare stage does that.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

# The columns every index table has, in this order; dataset-specific columns follow.
TABLE_COLUMNS: tuple[str, ...] = ("clip_id", "dataset", "domain", "split", "group", "path", "labels")


class DatasetFormatError(ValueError):
    """An input file is missing or lacks a column. The message names the file and the column."""


class DatasetSplitError(ValueError):
    """The data cannot be split as asked (e.g. too few single-track artists for the evaluation set)."""


@dataclass
class DatasetIndex:
    """The items of one dataset, ready for the prepare stage.

    ``table`` has one row per item to decode with :data:`TABLE_COLUMNS` (``labels``: a list of 7 floats on the
    1..10 scale in :data:`mdlda.params.FEATURES` order, or ``None``) plus dataset-specific columns.
    ``skipped`` lists ``{"item": ..., "reason": ..., "counts_as_failure": bool}`` for everything left out
    (``False`` for notes such as an identical duplicate row or an unknown piano id, where no clip is lost);
    ``options`` are the arguments the index was built with (for the manifest).
    """

    table: pd.DataFrame
    skipped: list[dict[str, Any]] = field(default_factory=list)
    split_sizes: dict[str, int] = field(default_factory=dict)
    root: str = ""
    options: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.table)


def column_key(name: object) -> str:
    """A header for matching: case, stray spaces and space/underscore/hyphen differences ignored."""
    return re.sub(r"[\s_\-]+", "_", str(name).strip().lower())


def normalise_id(value: object) -> str:
    """An item id as text: stripped, and ``"12.0"`` (an int id read as a float) -> ``"12"``."""
    text = str(value).strip()
    return text[:-2] if re.fullmatch(r"\d+\.0", text) else text


def read_table(path: Path, sep: str, required: Sequence[str], what: str) -> pd.DataFrame:
    """Read a CSV as text with its required columns renamed to their canonical spelling.

    Headers match :func:`column_key`-insensitively (``" melody"``, ``"Song ID"`` and ``"song_id"`` all work);
    other columns keep their stripped names. Raises :class:`DatasetFormatError` naming ``path`` when the file
    is missing or unreadable, or when a required column is absent (with a "did you mean" suggestion).
    """
    if not path.is_file():
        raise DatasetFormatError(f"{path}: {what} not found (expected a {sep!r}-separated CSV file there)")
    df = None
    for encoding in ("utf-8-sig", "latin-1"):  # a byte-order mark is dropped; old exports may be Latin-1
        try:
            df = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, skipinitialspace=True, encoding=encoding)
            break
        except UnicodeDecodeError:
            continue
        except (pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
            raise DatasetFormatError(f"{path}: cannot read {what} as a {sep!r}-separated CSV ({exc})") from exc
    assert df is not None  # latin-1 decodes any bytes
    found = {column_key(c): c for c in df.columns}
    rename: dict[str, str] = {}
    for want in required:
        key = column_key(want)
        if key in found:
            rename[found[key]] = want
            continue
        close = difflib.get_close_matches(key, list(found), n=1, cutoff=0.6)
        hint = f"; did you mean {found[close[0]].strip()!r}?" if close else ""
        have = ", ".join(repr(str(c).strip()) for c in df.columns)
        raise DatasetFormatError(
            f"{path}: {what} has no column {want!r}{hint} (columns found: {have}; separator {sep!r})"
        )
    df = df.rename(columns=rename)
    df.columns = [str(c).strip() for c in df.columns]
    return df.apply(lambda s: s.str.strip())


def skip(item: object, reason: str, failure: bool = True) -> dict[str, Any]:
    """One entry of :attr:`DatasetIndex.skipped`; ``failure=False`` marks a note that is not a lost item."""
    return {"item": str(item), "reason": reason, "counts_as_failure": failure}


def suggest(name: str, choices: Sequence[str]) -> str:
    """A " (did you mean 'x'?)" suffix for an unknown ``name``, or ``""``."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def path_inside(root: Path, name: str) -> tuple[Path | None, str]:
    """``root / name`` when it stays inside ``root`` (already resolved), else ``(None, why)``.

    A dataset CSV names files relative to its root: an absolute path, ``..`` that climbs out, or a symlink whose
    target lies outside the root is refused (never read), so a CSV cannot make prepare read arbitrary files.
    """
    if Path(name).is_absolute():
        return None, f"path {name!r} is absolute; the CSV must name files relative to the dataset root {root}"
    path = root / name
    try:
        resolved = path.resolve()
    except (OSError, RuntimeError) as exc:  # a symlink loop
        return None, f"path {name!r} cannot be resolved ({exc})"
    if not resolved.is_relative_to(root):
        via = " through a symlink" if ".." not in Path(name).parts else ""
        return None, f"path {name!r} leads{via} to {resolved}, outside the dataset root {root}; not read"
    return path, ""
