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
    rounds: Annotated[
        int | None,
        typer.Option(
            min=0,
            max=50,
            help="federated fine-tuning rounds after the head (server.rounds); default: the "
            "server's",
        ),
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            metavar="KEY=VALUE",
            help="a setting of the started server or edges, e.g. server.privacy.noise_sigma=0 "
            "or edge.extract_backend=torch (repeatable; 'fedinspect settings' lists them). "
            "Nothing else changes them: FEDINSPECT_* variables of this shell are not passed on",
        ),
    ] = None,
) -> None:
    """Start a server and N edges on loopback, run one whole cycle over HTTP, compare.

    With --rounds R the cycle runs R federated fine-tuning rounds after the head, and the
    table shows each round's model on every edge."""
    from fedinspect.demo import DemoOptions, SettingError, parse_settings, plan_demo, run_demo

    try:
        settings = parse_settings(
            [*(set_ or []), *([f"server.rounds={rounds}"] if rounds is not None else [])]
        )
        options = DemoOptions(
            edges, quick, dataset, json_path, report, seed, input_size, references.value, settings
        )
        plan_demo(options).check_settings()
    except SettingError as exc:
        raise typer.BadParameter(str(exc), param_hint="--set") from None
    run_demo(options)


def main() -> None:
    app()
