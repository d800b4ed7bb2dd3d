"""The ``fedinspect`` command (typer).

Each subcommand imports its service lazily, so ``fedinspect --help`` stays fast and a
subcommand pulls in only what it runs.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer


class Reference(StrEnum):
    full = "full"
    pooled = "pooled"


app = typer.Typer(
    help="FedInspect: federated training of visual defect-inspection models.",
    no_args_is_help=True,
    add_completion=False,
)


def _version(value: bool) -> None:
    if value:
        from fedinspect import __version__

        typer.echo(f"fedinspect {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="print the version and exit"
        ),
    ] = False,
) -> None:
    """FedInspect: federated training of visual defect-inspection models."""


class Service(StrEnum):
    server = "server"
    edge = "edge"


_SERVER_EPILOG = (
    "Settings come from FEDINSPECT_SERVER_* environment variables; "
    "FEDINSPECT_SERVER_ADMIN_TOKEN is required. 'fedinspect settings server' lists them "
    "all with their defaults. Pages: /ui (dashboard), /docs (Swagger UI), /redoc."
)
_EDGE_EPILOG = (
    "Settings come from FEDINSPECT_EDGE_* environment variables; "
    "FEDINSPECT_EDGE_ADMIN_TOKEN is required, FEDINSPECT_EDGE_SERVER_URL, "
    "FEDINSPECT_EDGE_TOKEN and FEDINSPECT_EDGE_DATASET say which server and which images. "
    "'fedinspect settings edge' lists them all with their defaults. Pages: /ui (the "
    "edge's page), /docs (Swagger UI), /redoc."
)


@app.command(epilog=_SERVER_EPILOG)
def server() -> None:
    """Run the training-cycle server (settings from FEDINSPECT_SERVER_* variables)."""
    from server_service.main import run

    run()


@app.command(epilog=_EDGE_EPILOG)
def edge() -> None:
    """Run an edge agent (settings from FEDINSPECT_EDGE_* variables)."""
    from edge_service.main import run

    run()


@app.command()
def settings(
    service: Annotated[Service | None, typer.Argument(help="server or edge; default: both")] = None,
) -> None:
    """List the settings of the server and the edge: variable, default, meaning."""
    from fedinspect.settings_doc import text

    typer.echo(text(None if service is None else service.value))


@app.command()
def demo(
    edges: Annotated[int, typer.Option(min=1, max=8, help="number of edge processes")] = 3,
    quick: Annotated[
        bool, typer.Option(help="small partitions and a smaller input size (minutes)")
    ] = False,
    dataset: Annotated[str, typer.Option(help="'elpv' or an ImageFolder path")] = "elpv",
    json_path: Annotated[
        Path | None, typer.Option("--json", help="write the results as JSON here")
    ] = None,
    report: Annotated[
        Path | None, typer.Option(help="write report.md and PNG plots into this folder")
    ] = None,
    seed: Annotated[int, typer.Option(help="seed for partitions, splits and training")] = 0,
    input_size: Annotated[
        int | None,
        typer.Option(
            min=32, help="input size in pixels; default: 96 quick, 300 elpv, else the backbone's"
        ),
    ] = None,
    references: Annotated[
        Reference,
        typer.Option(
            help="local-only and centralized references: 'full' trains them as the federated "
            "models (stages 2 and 3), 'pooled' stage 2 only (minutes, not an hour, on elpv)"
        ),
    ] = Reference.full,
) -> None:
    """Start a server and N edges on loopback, run one whole cycle over HTTP, compare."""
    from fedinspect.demo import DemoOptions, run_demo

    run_demo(
        DemoOptions(edges, quick, dataset, json_path, report, seed, input_size, references.value)
    )


@app.command("privacy-eval")
def privacy_eval(
    out: Annotated[Path, typer.Option(help="folder for results.json, results.md, grid.png")],
    quick: Annotated[
        bool, typer.Option(help="a subset of elpv and fewer epochs (a few minutes)")
    ] = False,
    limit: Annotated[
        int | None, typer.Option(min=40, help="elpv images to use (default: all; quick: 640)")
    ] = None,
    input_size: Annotated[
        int | None, typer.Option(min=32, help="backbone input size (default 160; quick 128)")
    ] = None,
    neu_limit: Annotated[
        int | None, typer.Option(min=10, help="NEU-DET images of the cross-domain attacker")
    ] = None,
    seed: Annotated[int, typer.Option(help="seed of splits, noise and training")] = 0,
) -> None:
    """Attack the uploads of each privacy mode with a trained decoder; measure
    reconstruction (SSIM, PSNR), re-identification and federated accuracy."""
    from fedinspect.privacy_eval import EvalOptions, run_privacy_eval

    run_privacy_eval(
        EvalOptions(
            out=out,
            quick=quick,
            limit=limit,
            input_size=input_size,
            neu_limit=neu_limit,
            seed=seed,
        )
    )


@app.command()
def bench(
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


def main() -> None:
    app()
