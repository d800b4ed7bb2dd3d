"""Static checks of docker-compose.yml and the Dockerfiles against the settings classes.

No Docker engine runs in CI, so these checks are what keeps the deployment files true:
every variable is a real setting, every port, volume and healthcheck lines up.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic_settings import BaseSettings

from edge_service.config import Settings as EdgeSettings
from fl_core.data import load_dataset_spec
from server_service.config import Settings as ServerSettings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
EDGES = sorted(name for name in SERVICES if name.startswith("edge-"))
KINDS = {
    "server": ("FEDINSPECT_SERVER_", ServerSettings),
    "edge": ("FEDINSPECT_EDGE_", EdgeSettings),
}


def _kind(service: str) -> str:
    return "server" if service == "server" else "edge"


def _env(service: str) -> dict[str, str]:
    return {k: str(v) for k, v in SERVICES[service]["environment"].items()}


def _setting_names(cls: type[BaseSettings]) -> set[str]:
    return set(cls.model_fields)


def _required(cls: type[BaseSettings]) -> set[str]:
    return {name for name, f in cls.model_fields.items() if f.is_required()}


def test_one_server_and_three_edges() -> None:
    assert set(SERVICES) == {"server", "edge-1", "edge-2", "edge-3"}


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_every_variable_is_a_setting_and_required_ones_are_set(service: str) -> None:
    prefix, cls = KINDS[_kind(service)]
    env = _env(service)
    fields = set()
    for key in env:
        assert key.startswith(prefix), f"{service}: {key} lacks the prefix {prefix}"
        field = key[len(prefix) :].split("__")[0].lower()
        assert field in _setting_names(cls), f"{service}: {key} is not a setting of {cls}"
        fields.add(field)
    assert _required(cls) <= fields, f"{service} misses required settings"


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_ports_bind_loopback_and_match_the_port_setting(service: str) -> None:
    prefix, _ = KINDS[_kind(service)]
    env = _env(service)
    assert env[prefix + "HOST"] == "0.0.0.0"  # inside the container; published on loopback
    (mapping,) = SERVICES[service]["ports"]
    host_ip, _host_port, container_port = mapping.split(":")
    assert host_ip == "127.0.0.1"
    assert container_port == env[prefix + "PORT"]


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_healthcheck_probes_health_on_the_service_port(service: str) -> None:
    prefix, _ = KINDS[_kind(service)]
    test = " ".join(SERVICES[service]["healthcheck"]["test"])
    assert f"127.0.0.1:{_env(service)[prefix + 'PORT']}/health" in test


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_state_lives_on_its_own_named_volume(service: str) -> None:
    prefix, _ = KINDS[_kind(service)]
    (volume,) = SERVICES[service]["volumes"]
    name, path = volume.split(":")
    assert name in COMPOSE["volumes"]
    assert path == _env(service)[prefix + "DATA_DIR"]


def test_volumes_are_not_shared() -> None:
    names = [SERVICES[s]["volumes"][0].split(":")[0] for s in SERVICES]
    assert len(set(names)) == len(names) == len(COMPOSE["volumes"])


@pytest.mark.parametrize("edge", EDGES)
def test_edges_wait_for_a_healthy_server_and_reach_it_by_name(edge: str) -> None:
    assert SERVICES[edge]["depends_on"] == {"server": {"condition": "service_healthy"}}
    assert _env(edge)["FEDINSPECT_EDGE_SERVER_URL"] == "http://server:8000"


def test_edge_partitions_are_disjoint_and_cover_elpv() -> None:
    parts = [load_dataset_spec(_env(e)["FEDINSPECT_EDGE_DATASET"]) for e in EDGES]
    paths = [{r.path for r in p.records} for p in parts]
    assert sum(map(len, paths)) == len(set().union(*paths)) == 2624


def test_secrets_come_from_env_file_and_example_lists_them() -> None:
    text = (ROOT / "docker-compose.yml").read_text()
    used = set(re.findall(r"\$\{([A-Z0-9_]+)", text))
    example = {
        line.split("=")[0]
        for line in (ROOT / ".env.example").read_text().splitlines()
        if line and not line.startswith("#")
    }
    assert used == example
    for service in SERVICES:
        for key, value in _env(service).items():
            if "TOKEN" in key:
                assert value.startswith("${"), f"{service}: {key} must come from .env"


# --------------------------------------------------------------------------- Dockerfiles


def _dockerfile(kind: str) -> str:
    return (ROOT / "docker" / f"{kind}.Dockerfile").read_text()


def _torch_pins() -> set[str]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return {d for d in deps if d.startswith(("torch==", "torchvision=="))}


@pytest.mark.parametrize("kind", ["server", "edge"])
def test_dockerfile(kind: str) -> None:
    text = _dockerfile(kind)
    prefix, cls = KINDS[kind]
    assert text.startswith("#") and "FROM python:3.11" in text
    assert "download.pytorch.org/whl/cpu" in text, "images use the CPU-only torch build"
    for pin in _torch_pins():
        assert pin in text
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1] not in ("root", "0")
    envs = dict(re.findall(rf"({prefix}[A-Z_]+)=(\S+)", text))
    for key in envs:
        assert key[len(prefix) :].lower() in _setting_names(cls)
    port = envs[prefix + "PORT"]
    assert re.search(rf"^EXPOSE {port}$", text, re.M)
    assert f"127.0.0.1:{port}/health" in text
    assert f'CMD ["fedinspect", "{kind}"]' in text
    assert envs[prefix + "DATA_DIR"] == "/data" and 'VOLUME ["/data"]' in text


def test_compose_builds_each_service_from_its_dockerfile() -> None:
    assert SERVICES["server"]["build"]["dockerfile"] == "docker/server.Dockerfile"
    for edge in EDGES:
        assert SERVICES[edge]["build"]["dockerfile"] == "docker/edge.Dockerfile"
        assert (ROOT / SERVICES[edge]["build"]["dockerfile"]).is_file()
