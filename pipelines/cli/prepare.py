"""`mdlda demo-data` and `mdlda prepare`: the data commands. :func:`register` adds them to a Typer app
(:mod:`pipelines.cli` calls it); the work is in :mod:`mdlda.datasets` and :mod:`pipelines.prepare`.

``prepare`` checks its ``--out`` (a folder holding other files is refused before anything is written there) and
then holds that folder's one-writer lock (:mod:`mdlda.lock`) for the rest of the command.
"""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path

import typer
from rich.table import Table


class Corpus(StrEnum):
    midlevel = "midlevel"
    maestro = "maestro"


def demo_data(
    out: Path = typer.Option(..., help="Folder to write the generated Mid-level- and MAESTRO-format datasets into."),
    seed: int = typer.Option(0, help="Random seed: the same seed writes identical files."),
    size: str = typer.Option("small", help="'tiny' (tests) or 'small' (the demo)."),
) -> None:
    """Generate a small dataset in the real on-disk formats (audio files + CSVs), with a real timbre shift."""
    from mdlda.datasets import generate_demo
    from pipelines.cli.common import console

    summary = generate_demo(out, seed=seed, size=size)
    console.print_json(json.dumps(summary, default=str))


def prepare(
    dataset: Corpus = typer.Argument(..., help="Which corpus format the root folder holds."),
    root: Path = typer.Option(
        ...,
        help="Dataset root (Mid-level: holds metadata_annotations/ and audio/; "
        "MAESTRO: holds maestro-v3.0.0.csv and the year folders).",
    ),
    out: Path = typer.Option(..., help="Output shard folder (Parquet files + manifest.json)."),
    piano_ids: Path | None = typer.Option(
        None, help="Mid-level: CSV with a `song id` column listing the piano clips (the piano_test split)."
    ),
    seed: int = typer.Option(0, help="Seed of the artist-exclusive split / the MAESTRO subset."),
    max_performances: int | None = typer.Option(None, help="MAESTRO: keep a seeded subset of this many performances."),
    max_failure_share: float = typer.Option(
        0.1, help="Stop with an error, writing nothing, when more than this share of the files fail."
    ),
    chunk_items: int = typer.Option(512, help="Files per resumable chunk (a rerun redoes only unfinished chunks)."),
    overwrite: bool = typer.Option(False, help="Replace shards in OUT that were made from other input."),
    address: str | None = typer.Option(None, help="Ray address ('auto' for a running cluster); local Ray if unset."),
    verbose: bool = typer.Option(
        False, "--verbose", help="Show what Ray prints here (otherwise in the logs/ folder beside OUT's parent)."
    ),
) -> None:
    """Decode, resample and segment audio into Parquet shards with Ray Data (resumable, idempotent)."""
    from mdlda.datasets.inputs import check_dataset_root
    from pipelines.cli.common import check_inputs, command_console, fail, locked
    from pipelines.prepare_folder import PrepareError, check_out_folder

    try:
        check_out_folder(out.resolve())  # before the lock file is written into it: a user's folder stays untouched
    except PrepareError as exc:
        fail(str(exc))
    options = dict(
        dataset=dataset.value,
        root=str(root),
        out=str(out),
        piano_ids=str(piano_ids) if piano_ids else None,
        seed=seed,
        max_performances=max_performances,
        max_failure_share=max_failure_share,
        chunk_items=chunk_items,
        overwrite=overwrite,
    )
    with locked(out):  # before Ray (or even its import): a second writer on OUT is refused at once
        check_inputs(lambda: check_dataset_root(dataset.value, root, piano_ids))  # before Ray: one clear line
        with command_console(logs_home(out), verbose):
            _prepare(options, address, verbose)


def logs_home(out: Path) -> Path:
    """Where `prepare --out OUT` keeps its logs/: the workdir of ``<workdir>/shards/<name>``, else OUT's parent
    (never OUT itself: a shard folder holds only what prepare wrote)."""
    out = out.resolve()
    return out.parent.parent if out.parent.name == "shards" else out.parent


def _prepare(options: dict, address: str | None, verbose: bool = False) -> None:
    from mdlda.datasets import DatasetFormatError, DatasetSplitError
    from mdlda.manifest import ShardError
    from pipelines.cli.common import console, fail
    from pipelines.prepare import PrepareConfig, PrepareError, prepare
    from pipelines.raysetup import init_ray

    cfg = PrepareConfig(**options)
    init_ray(address, quiet=not verbose)
    try:
        result = prepare(cfg)
    except (PrepareError, DatasetFormatError, DatasetSplitError, ShardError) as exc:
        fail(str(exc))
    m = result.manifest
    # the title on its own line: a table title wraps to the (narrow) table's width
    console.print(
        f"{cfg.dataset} shards -> {result.out}" + (" (already up to date)" if result.skipped_work else ""),
        soft_wrap=True,
        highlight=False,
    )
    table = Table()
    table.add_column("split")
    table.add_column("rows", justify="right")
    for split, n in m["counts"].items():
        table.add_row(split, str(n))
    console.print(table)
    if result.repaired:
        console.print(f"[yellow]{len(result.repaired)} shard file(s) did not match the manifest and were redone:[/]")
        for line in result.repaired[:10]:
            console.print(f"  {line}")
    for w in m.get("warnings", []):
        console.print(f"[yellow]warning:[/] {w.get('item')}: {w.get('reason')}", soft_wrap=True)
    if m["skipped"]:
        console.print(f"[yellow]{len(m['skipped'])} item(s) skipped[/] (listed in {result.out}/manifest.json):")
        for s in m["skipped"][:10]:
            console.print(f"  {s.get('item')}: {s.get('reason')}")


def register(app: typer.Typer) -> None:
    """Add `demo-data` and `prepare` to ``app``."""
    app.command("demo-data")(demo_data)
    app.command("prepare")(prepare)
