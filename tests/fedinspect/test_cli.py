"""The command line tells a new user what it is and what it reads: ``--version``, the
settings of each service, and ``--help`` of ``server``/``edge`` pointing to them."""

from __future__ import annotations

from typer.testing import CliRunner

from fedinspect import __version__
from fedinspect.cli import app


def test_version() -> None:
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output == f"fedinspect {__version__}\n"


def test_service_help_points_to_the_settings() -> None:
    for service, required in (
        ("server", "FEDINSPECT_SERVER_ADMIN_TOKEN"),
        ("edge", "FEDINSPECT_EDGE_ADMIN_TOKEN"),
    ):
        result = CliRunner().invoke(app, [service, "--help"], terminal_width=200)
        assert result.exit_code == 0
        text = " ".join(result.output.split())
        assert required in text and f"fedinspect settings {service}" in text


def test_settings_lists_every_variable_with_its_default() -> None:
    result = CliRunner().invoke(app, ["settings", "edge"])
    assert result.exit_code == 0
    assert "FEDINSPECT_EDGE_ADMIN_TOKEN  (default: required)" in result.output
    assert "FEDINSPECT_EDGE_SERVER_URL  (default: http://127.0.0.1:8000)" in result.output
    assert "FEDINSPECT_SERVER_" not in result.output
    both = CliRunner().invoke(app, ["settings"]).output
    assert "FEDINSPECT_SERVER_ADMIN_TOKEN" in both and "FEDINSPECT_EDGE_DATASET" in both


def test_the_product_command_runs_the_product_only() -> None:
    """Benchmarks and experiments run from a checkout (python -m bench, python -m
    experiments.privacy_eval), not as subcommands of the installed command."""
    import typer.main

    group = typer.main.get_command(app)
    assert isinstance(group, typer.main.TyperGroup)
    assert set(group.commands) == {"server", "edge", "settings", "demo"}
