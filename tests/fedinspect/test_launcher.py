"""``fedinspect.launcher``: a started service sees the settings it was given and the
basics of the caller's environment, never the caller's ``FEDINSPECT_*`` variables."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr

from edge_service.config import Settings as EdgeSettings
from fedinspect.launcher import (
    Processes,
    child_env,
    free_port,
    settings_env,
    settings_from_env,
)
from fl_core.schemas import PrivacyConfig
from server_service.config import Settings as ServerSettings

TOKEN = "launcher-test-admin-token-0123"
PARENT = {
    "PATH": "/usr/bin:/bin",
    "HOME": "/home/someone",
    "LANG": "C.UTF-8",
    "LC_ALL": "C.UTF-8",
    "FEDINSPECT_EDGE_EXTRACT_BACKEND": "bogus",
    "FEDINSPECT_SERVER_PRIVACY__NOISE_SIGMA": "5",
    "AWS_SECRET_ACCESS_KEY": "not-for-children",
    "SOME_TOOL_SETTING": "x",
}


def test_child_env_keeps_basics_and_drops_the_callers_settings() -> None:
    settings = settings_from_env(EdgeSettings, {"FEDINSPECT_EDGE_ADMIN_TOKEN": TOKEN})
    env = child_env(settings, {"OMP_NUM_THREADS": "1"}, parent=PARENT)
    assert env == {
        "PATH": "/usr/bin:/bin",
        "HOME": "/home/someone",
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "FEDINSPECT_EDGE_ADMIN_TOKEN": TOKEN,
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
    }


def test_settings_and_extra_stay_apart() -> None:
    with pytest.raises(ValueError, match="not a FedInspect setting: AWS_REGION"):
        child_env({"AWS_REGION": "x"}, parent={})
    with pytest.raises(ValueError, match="FEDINSPECT_EDGE_PORT is a setting"):
        child_env({}, {"FEDINSPECT_EDGE_PORT": "1"}, parent={})


def test_settings_from_env_reads_only_the_given_variables(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FEDINSPECT_EDGE_EXTRACT_BACKEND", "bogus")
    monkeypatch.setenv("FEDINSPECT_EDGE_BATCH_SIZE", "3")
    edge = settings_from_env(EdgeSettings, {"FEDINSPECT_EDGE_ADMIN_TOKEN": TOKEN})
    assert edge.extract_backend == "onnxruntime" and edge.batch_size == 32
    assert edge.model_fields_set == {"admin_token"}
    assert "FEDINSPECT_EDGE_EXTRACT_BACKEND" not in child_env(edge)


def test_settings_env_round_trips_what_was_set() -> None:
    server = settings_from_env(
        ServerSettings,
        {
            "FEDINSPECT_SERVER_ADMIN_TOKEN": TOKEN,
            "FEDINSPECT_SERVER_DATA_DIR": "/tmp/x",
            "FEDINSPECT_SERVER_CLASS_NAMES": '["a", "b", "c"]',
            "FEDINSPECT_SERVER_PRETRAINED": "false",
            "FEDINSPECT_SERVER_PRIVACY__MODE": "pooled",
            "FEDINSPECT_SERVER_PRIVACY__NOISE_SIGMA": "0",
        },
    )
    # the pooled mode's clipping is filled in; noise stays off as asked
    assert server.privacy == PrivacyConfig(mode="pooled", clip_norm=24.0, noise_sigma=0.0)
    env = settings_env(server)
    assert env["FEDINSPECT_SERVER_ADMIN_TOKEN"] == TOKEN  # in clear, for the child
    assert env["FEDINSPECT_SERVER_PRETRAINED"] == "false"
    assert set(env) == {
        f"FEDINSPECT_SERVER_{k}"
        for k in ("ADMIN_TOKEN", "DATA_DIR", "CLASS_NAMES", "PRETRAINED", "PRIVACY")
    }
    again = settings_from_env(ServerSettings, env)
    assert again == server and again.admin_token == SecretStr(TOKEN)


@pytest.mark.slow
def test_a_started_server_never_sees_the_callers_fedinspect_variables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # each would stop or change the server if it reached it
    monkeypatch.setenv("FEDINSPECT_EDGE_EXTRACT_BACKEND", "bogus")
    monkeypatch.setenv("FEDINSPECT_SERVER_CLASS_NAMES", '["only-one"]')
    monkeypatch.setenv("FEDINSPECT_SERVER_ADMIN_TOKEN", "short")
    port = free_port()
    settings = settings_from_env(
        ServerSettings,
        {
            "FEDINSPECT_SERVER_ADMIN_TOKEN": TOKEN,
            "FEDINSPECT_SERVER_DATA_DIR": str(tmp_path / "server"),
            "FEDINSPECT_SERVER_PORT": str(port),
            "FEDINSPECT_SERVER_BACKBONE": "tiny_cnn",
            "FEDINSPECT_SERVER_PRETRAINED": "false",
            "FEDINSPECT_SERVER_INPUT_SIZE": "32",
        },
    )
    procs = Processes(tmp_path)
    try:
        server = procs.start("server", "server", settings, extra_env={"OMP_NUM_THREADS": "1"})
        server.wait_healthy()
        environ = Path(f"/proc/{server.pid}/environ").read_bytes().split(b"\0")
        names = {v.split(b"=", 1)[0].decode() for v in environ if v}
        assert {n for n in names if n.startswith("FEDINSPECT_")} == set(settings_env(settings))
        assert b"FEDINSPECT_EDGE_EXTRACT_BACKEND=bogus" not in environ
        model = httpx.get(
            f"{server.url}/v1/models/1", headers={"Authorization": f"Bearer {TOKEN}"}
        ).json()
        assert model["class_names"] == ["functional", "defective"]
    finally:
        procs.stop_all()
