"""Checks of a command's raw inputs before any compute: the dataset folders exist and hold their CSVs with the
columns the indexes need. ``mdlda run`` and ``mdlda prepare`` call these before they start Ray or MLflow, so a
wrong ``--data`` / ``--root`` costs one clear line instead of a cluster start-up and a traceback.

Only what an index would refuse anyway is checked (the same :func:`read_table` rules, the same messages); bad rows
and bad audio stay reported skips of the prepare stage.
"""

from __future__ import annotations

from pathlib import Path

from mdlda.datasets.common import DatasetFormatError, DatasetSplitError, normalise_id, read_table


def check_midlevel_root(root: str | Path, piano_ids: str | Path | None = None) -> None:
    """Raise :class:`DatasetFormatError` naming the folder, file or column that a Mid-level index would miss, or
    :class:`DatasetSplitError` for a piano id list none of whose ids is in the annotations."""
    from mdlda.datasets.midlevel import (
        ANNOTATIONS,
        ARTIST,
        AUDIO_DIR,
        ID_ANNOTATIONS,
        ID_METADATA,
        METADATA,
        RATING_COLUMNS,
        _no_piano_clips,
        read_piano_ids,
    )

    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetFormatError(
            f"{root}: Mid-level dataset folder not found (expected {ANNOTATIONS}, {METADATA} and {AUDIO_DIR}/ in it)"
        )
    ann = read_table(root / ANNOTATIONS, ",", [ID_ANNOTATIONS, *RATING_COLUMNS], "annotations")
    read_table(root / METADATA, ";", [ID_METADATA, ARTIST], "metadata")
    if not (root / AUDIO_DIR).is_dir():
        raise DatasetFormatError(f"{root / AUDIO_DIR}: the Mid-level audio folder is missing")
    if piano_ids is not None:
        path = Path(piano_ids).expanduser()
        if not path.is_file():
            raise DatasetFormatError(f"{path}: piano id list not found (a CSV with a 'song id' column)")
        piano = read_piano_ids(path)
        known = set(ann[ID_ANNOTATIONS].map(normalise_id))
        if not any(sid in known for sid in piano):  # the index says more (which ids; unusable clips)
            raise DatasetSplitError(_no_piano_clips(path, piano, known, []))


def check_maestro_root(root: str | Path) -> None:
    """Raise :class:`DatasetFormatError` naming the folder, file or column that a MAESTRO index would miss."""
    from mdlda.datasets.maestro import COLUMNS, CSV_NAME

    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetFormatError(f"{root}: MAESTRO folder not found (expected {CSV_NAME} and the year folders in it)")
    read_table(root / CSV_NAME, ",", COLUMNS, "MAESTRO metadata")


def check_dataset_root(dataset: str, root: str | Path, piano_ids: str | Path | None = None) -> None:
    """:func:`check_midlevel_root` or :func:`check_maestro_root` by name (``mdlda prepare``)."""
    if dataset == "midlevel":
        check_midlevel_root(root, piano_ids)
    elif dataset == "maestro":
        check_maestro_root(root)
    else:
        raise DatasetFormatError(f"unknown dataset {dataset!r}: expected 'midlevel' or 'maestro'")


def check_chain_inputs(data_root: str | Path, data) -> None:
    """The data root of ``mdlda run`` and the dataset folders its config (a ``DataConfig``) names under it."""
    data_root = Path(data_root).expanduser()
    if not data_root.is_dir():
        raise DatasetFormatError(
            f"{data_root}: data root not found (--data must hold the folders {data.midlevel_root!r} and "
            f"{data.maestro_root!r} of the config's data section)"
        )
    piano = data_root / data.piano_ids if data.piano_ids else None
    check_midlevel_root(data_root / data.midlevel_root, piano)
    check_maestro_root(data_root / data.maestro_root)
