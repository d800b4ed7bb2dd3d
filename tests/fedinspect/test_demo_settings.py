"""``fedinspect demo --set KEY=VALUE``: the settings the demo passes on, checked against
the settings classes before anything starts, and listed in the JSON it writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edge_service.services.cycle import finetune_config
from fedinspect.cli import app
from fedinspect.demo import DemoOptions, SettingError, parse_settings, plan_demo, run_demo
from fedinspect.launcher import child_env
from tests.fedinspect.test_demo import _demo_without_cycle


def test_set_names_a_nested_or_plain_setting_as_its_variable() -> None:
    parsed = parse_settings(
        [
            "server.privacy.noise_sigma=0",
            "edge.extract_backend=torch",
            'server.class_names=["ok", "bad"]',
            "edge.finetune_epochs=2",
        ]
    )
    assert parsed == {
        "server": {"PRIVACY__NOISE_SIGMA": "0", "CLASS_NAMES": '["ok", "bad"]'},
        "edge": {"EXTRACT_BACKEND": "torch", "FINETUNE_EPOCHS": "2"},
    }
    assert parse_settings([]) == {}


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("server.nope=1", "unknown setting 'server.nope': server has no setting 'nope'"),
        ("server.privacy.nope=1", "server.privacy has no setting 'nope'"),
        ("edge.batch_size.x=1", "'batch_size' has no settings inside"),
        ("factory.port=1", "unknown setting 'factory.port'"),
        ("edge=1", "unknown setting 'edge'"),
        ("edge.extract_backend", "not KEY=VALUE"),
        ("edge.port=9000", "edge.port is set by the demo itself"),
        ("server.admin_token=x", "server.admin_token is set by the demo itself"),
        # the references are scored on the plan's splits: the edges must use the same
        ("edge.val_fraction=0.2", "edge.val_fraction is set by the demo itself"),
        ("edge.extract_backend=bogus", "edge.extract_backend: Input should be 'onnxruntime'"),
        ("server.privacy.noise_sigma=loud", "server.privacy.noise_sigma: Input should be"),
        ("edge.finetune_epochs=0", "edge.finetune_epochs: Input should be greater than"),
        ('server.class_names=["one"]', "server.class_names: List should have at least 2"),
    ],
)
def test_bad_set_is_an_error_naming_the_key(item: str, message: str) -> None:
    with pytest.raises(SettingError) as err:
        parse_settings([item])
    assert message in str(err.value)


def test_cli_refuses_a_bad_set_with_exit_code_2_before_starting_anything() -> None:
    result = CliRunner().invoke(
        app, ["demo", "--edges", "2", "--quick", "--set", "edge.extract_backend=bogus"]
    )
    assert result.exit_code == 2
    assert "--set" in result.output and "edge.extract_backend" in result.output
    unknown = CliRunner().invoke(app, ["demo", "--set", "server.privacy.sigma=0"])
    assert unknown.exit_code == 2 and "server.privacy.sigma" in unknown.output


def test_overrides_reach_the_processes_settings_and_the_callers_do_not(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("FEDINSPECT_EDGE_EXTRACT_BACKEND", "bogus")
    monkeypatch.setenv("FEDINSPECT_SERVER_PRIVACY__MODE", "bogus")
    sets = ["server.privacy.noise_sigma=0", "edge.extract_backend=torch"]
    plan = plan_demo(DemoOptions(edges=2, quick=True, settings=parse_settings(sets)))
    plan.check_settings()
    server = plan.server_settings("server-admin-token-0123456789", tmp_path, 1)
    assert server.privacy.noise_sigma == 0 and server.privacy.mode == "stats"
    edge = plan.edge_settings(
        1, "edge-2", "e2", ("token-0123456789ab", "admin-0123456789ab"), "http://x", 2, tmp_path
    )
    assert edge.extract_backend == "torch"
    assert child_env(edge)["FEDINSPECT_EDGE_EXTRACT_BACKEND"] == "torch"
    plain = plan_demo(DemoOptions(edges=2, quick=True)).edge_settings(
        1, "edge-2", "e2", ("token-0123456789ab", "admin-0123456789ab"), "http://x", 2, tmp_path
    )
    assert plain.extract_backend == "onnxruntime"
    assert "FEDINSPECT_EDGE_EXTRACT_BACKEND" not in child_env(plain)


def test_the_json_says_which_settings_made_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    options = _demo_without_cycle(tmp_path, monkeypatch)
    options.references = "pooled"
    options.settings = parse_settings(["server.privacy.noise_sigma=0"])
    run_demo(options)
    assert options.json_path is not None
    saved = json.loads(options.json_path.read_text())
    assert saved["settings"]["set"] == {"server.privacy.noise_sigma": "0"}


@pytest.mark.parametrize("quick", [True, False])
def test_the_references_train_with_the_recipe_the_edges_get(quick: bool) -> None:
    plain = plan_demo(DemoOptions(edges=3, quick=quick))
    overrides = parse_settings(["edge.finetune_epochs=2", "edge.finetune_select=val_loss"])
    changed = plan_demo(DemoOptions(edges=3, quick=quick, settings=overrides))
    assert (changed.finetune.epochs, changed.finetune.select) == (2, "val_loss")
    for plan in (plain, changed):
        for i in range(3):
            assert finetune_config(plan.placeholder_edge_settings(i)) == plan.finetune
