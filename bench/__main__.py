"""``python -m bench``: every benchmark into results.json and results.md (see
:mod:`bench.run`). Run from a checkout: the benchmarks are not installed with the
product."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def main(
    quick: Annotated[
        bool, typer.Option(help="the small version: under 10 minutes on 2 cores")
    ] = False,
    out: Annotated[Path, typer.Option(help="folder for results.json and results.md")] = Path(
        "bench/results/full"
    ),
    only: Annotated[
        list[str] | None,
        typer.Option(
            help="run only these sections (extraction, wire, ingest, demos, flower) into "
            "DIR's results.json, keeping the others; flower compares with the demos' results"
        ),
    ] = None,
    seeds: Annotated[
        int | None,
        typer.Option(min=1, help="demo seeds for accuracy and Flower (default 1 quick, 3 full)"),
    ] = None,
    dataset: Annotated[
        list[str] | None,
        typer.Option(help="demos and Flower on these datasets only (elpv, neu-det)"),
    ] = None,
    resume: Annotated[
        bool,
        typer.Option(
            help="with --only demos or --only flower: keep the runs in DIR's results.json and "
            "run only the missing seeds (a full seed takes an hour or more on 2 cores)"
        ),
    ] = False,
) -> None:
    """Benchmarks: extraction vs the CPU's limit, wire bytes, ingest, cycle, accuracy, Flower."""
    from bench.run import run_bench

    try:
        run_bench(quick, out, only, seeds, dataset, resume)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc


app = typer.Typer(add_completion=False)
app.command()(main)

if __name__ == "__main__":
    app(prog_name="python -m bench")
