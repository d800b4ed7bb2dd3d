"""Static checks of the scaled-out deployment (docker-compose.scale.yml and
docker/haproxy.cfg) against the server's settings: replicas share one database and
one bucket, only the load balancer is published, every replica is balanced and
probed, secrets come from .env.scale, and CI installs what the replica tests need."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from server_service.config import Settings as ServerSettings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_PATH = ROOT / "docker-compose.scale.yml"
COMPOSE = yaml.safe_load(COMPOSE_PATH.read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
REPLICAS = sorted(name for name in SERVICES if name.startswith("server-"))
HAPROXY = ROOT / "docker" / "haproxy.cfg"
PREFIX = "FEDINSPECT_SERVER_"


def _env(service: str) -> dict[str, str]:
    return {k: str(v) for k, v in SERVICES[service]["environment"].items()}


def test_services() -> None:
    assert set(SERVICES) == {"postgres", "minio", "lb", "server-1", "server-2", "server-3"}


@pytest.mark.parametrize("replica", REPLICAS)
def test_replica_variables_are_settings(replica: str) -> None:
    env = _env(replica)
    fields = set()
    for key in env:
        if key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            continue  # read by boto3, the S3 client
        assert key.startswith(PREFIX), f"{replica}: {key}"
        field = key[len(PREFIX) :].split("__")[0].lower()
        assert field in ServerSettings.model_fields, f"{replica}: {key} is not a setting"
        fields.add(field)
    required = {n for n, f in ServerSettings.model_fields.items() if f.is_required()}
    assert required <= fields


def test_replicas_share_one_database_and_one_bucket_under_their_own_names() -> None:
    envs = [_env(r) for r in REPLICAS]
    for key in ("DATABASE_URL", "BLOB_URL", "S3_ENDPOINT_URL", "ADMIN_TOKEN"):
        assert len({e[PREFIX + key] for e in envs}) == 1, key
    env = envs[0]
    assert env[PREFIX + "DATABASE_URL"].startswith("postgresql+psycopg://fedinspect:")
    assert env[PREFIX + "DATABASE_URL"].endswith("@postgres:5432/fedinspect")
    assert env[PREFIX + "BLOB_URL"].startswith("s3://")
    assert env[PREFIX + "S3_ENDPOINT_URL"] == "http://minio:9000"
    assert env["AWS_ACCESS_KEY_ID"].startswith("${MINIO_ROOT_USER")
    assert env["AWS_SECRET_ACCESS_KEY"].startswith("${MINIO_ROOT_PASSWORD")
    assert sorted(e[PREFIX + "REPLICA_ID"] for e in envs) == REPLICAS
    # The database's own settings agree with the URL the replicas use.
    pg = _env("postgres")
    assert (pg["POSTGRES_USER"], pg["POSTGRES_DB"]) == ("fedinspect", "fedinspect")
    assert pg["POSTGRES_PASSWORD"].startswith("${POSTGRES_PASSWORD")


@pytest.mark.parametrize("replica", REPLICAS)
def test_replicas_wait_for_healthy_storage_and_are_probed(replica: str) -> None:
    service = SERVICES[replica]
    assert service["build"]["dockerfile"] == "docker/server.Dockerfile"
    assert service["depends_on"] == {
        "postgres": {"condition": "service_healthy"},
        "minio": {"condition": "service_healthy"},
    }
    assert "127.0.0.1:8000/health" in " ".join(service["healthcheck"]["test"])
    assert _env(replica)[PREFIX + "PORT"] == "8000"
    assert "ports" not in service, "replicas are reached through the load balancer only"


def test_only_the_load_balancer_is_published_on_loopback() -> None:
    published = {name for name, s in SERVICES.items() if "ports" in s}
    assert published == {"lb"}
    (mapping,) = SERVICES["lb"]["ports"]
    host_ip, _port, container_port = mapping.split(":")
    assert host_ip == "127.0.0.1"
    assert re.search(rf"^\s*bind :{container_port}$", HAPROXY.read_text(), re.M)


def test_every_service_has_a_healthcheck_and_state_has_named_volumes() -> None:
    for name, service in SERVICES.items():
        assert service.get("healthcheck", {}).get("test"), name
    for name, path in (("postgres", "/var/lib/postgresql/data"), ("minio", "/data")):
        (volume,) = SERVICES[name]["volumes"]
        assert volume == f"{name}-data:{path}"
    assert set(COMPOSE["volumes"]) == {"postgres-data", "minio-data"}


def test_haproxy_balances_and_probes_every_replica() -> None:
    text = HAPROXY.read_text()
    assert "option httpchk GET /health" in text
    servers = re.findall(r"^\s*server (\S+) (\S+):(\d+) check", text, re.M)
    assert [(n, h, p) for n, h, p in servers] == [(r, r, "8000") for r in REPLICAS]
    assert SERVICES["lb"]["volumes"] == [
        "./docker/haproxy.cfg:/usr/local/etc/haproxy/haproxy.cfg:ro"
    ]


def test_haproxy_accepts_the_config() -> None:
    haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
    assert Path(haproxy).is_file(), "haproxy is not installed (see .ci/run)"
    done = subprocess.run(
        [haproxy, "-c", "-f", str(HAPROXY)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_secrets_come_from_the_env_file_and_its_example_lists_them() -> None:
    used = set(re.findall(r"\$\{([A-Z0-9_]+)", COMPOSE_PATH.read_text()))
    example = {
        line.split("=")[0]
        for line in (ROOT / ".env.scale.example").read_text().splitlines()
        if line and not line.startswith("#")
    }
    assert used == example
    for name, service in SERVICES.items():
        for key, value in service.get("environment", {}).items():
            if any(word in key for word in ("TOKEN", "PASSWORD", "SECRET")):
                assert str(value).startswith("${"), f"{name}: {key} must come from .env.scale"
    assert ".env.scale" in (ROOT / ".gitignore").read_text().split()


def test_the_server_image_brings_the_scale_out_extras() -> None:
    text = (ROOT / "docker" / "server.Dockerfile").read_text()
    assert "pip install '.[postgres,s3]'" in text


def test_ci_installs_postgresql_and_haproxy_before_the_tests() -> None:
    text = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"for pkg in postgresql haproxy", text)
    assert "apt-get install -y --no-install-recommends" in text
    assert text.index("apt-get install") < text.rindex("\nmake test")
