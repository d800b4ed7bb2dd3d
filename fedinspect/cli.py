"""The ``fedinspect`` command (typer).

Each subcommand imports its service lazily, so ``fedinspect --help`` stays fast and a
subcommand pulls in only what it runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    help="FedInspect: federated training of visual defect-inspection models.",
    no_args_is_help=True,
    add_completion=False,
)


@app.command()
def server() -> None:
    """Run the training-cycle server (settings from FEDINSPECT_SERVER_* variables)."""
    from server_service.main import run

    run()


@app.command()
def edge() -> None:
    """Run an edge agent (settings from FEDINSPECT_EDGE_* variables)."""
    from edge_service.main import run

    run()


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
) -> None:
    """Start a server and N edges on loopback, run one whole cycle over HTTP, compare."""
    from fedinspect.demo import DemoOptions, run_demo

    run_demo(DemoOptions(edges, quick, dataset, json_path, report, seed))


def main() -> None:
    app()
