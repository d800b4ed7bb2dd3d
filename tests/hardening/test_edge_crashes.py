"""SIGKILL a real edge process during extraction and during fine-tuning, restart it on
the same DATA_DIR: the killed job reports failed ("interrupted: ...", with its stage),
and a new cycle job then succeeds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.factories import make_image_folder
from tests.hardening.procs import (
    EDGE_ADMIN_TOKEN,
    client,
    edge_env,
    free_port,
    register_edge,
    services,
    wait_until,
)


@pytest.mark.slow
def test_edge_killed_during_extraction_and_finetuning(tmp_path: Path) -> None:
    # Enough images, one per batch, for extraction to take a noticeable moment.
    images = make_image_folder(
        tmp_path / "images", per_class=150, size=32, classes=("dark", "bright")
    )
    server_port, edge_port = free_port(), free_port()
    with services(tmp_path) as procs:
        server = procs.server(tmp_path / "server", server_port, min_edges="1")
        reg = register_edge(server.url, "line-a")

        def start_edge(name: str, **o: str) -> Any:
            env = edge_env(
                tmp_path / "edge", edge_port, server.url, reg["token"], reg["edge_id"], images, **o
            )
            return procs.edge(name, edge_port, env)

        killed: dict[str, dict[str, Any]] = {}
        for stage in ("extract", "finetune"):
            edge = start_edge(f"edge-{stage}", batch_size="1", finetune_epochs="500")
            with client(edge.url, EDGE_ADMIN_TOKEN) as c:
                job = c.post("/v1/jobs/cycle").json()
                wait_until(
                    lambda c=c, job=job, stage=stage: (
                        c.get(f"/v1/jobs/{job['id']}").json()["stage"] == stage
                    ),
                    180,
                    f"stage {stage}",
                    interval=0.05,
                )
            edge.kill()
            edge = start_edge(f"edge-after-{stage}", batch_size="16")
            with client(edge.url, EDGE_ADMIN_TOKEN) as c:
                killed[stage] = c.get(f"/v1/jobs/{job['id']}").json()
            edge.stop()

        edge = start_edge("edge-final", batch_size="16")
        with client(edge.url, EDGE_ADMIN_TOKEN) as c:
            job = c.post("/v1/jobs/cycle").json()
            wait_until(
                # one read per check: two could see "queued" then "running" and stop early
                lambda: c.get(f"/v1/jobs/{job['id']}").json()["state"] not in ("queued", "running"),
                240,
                "the new job",
            )
            final = c.get(f"/v1/jobs/{job['id']}").json()
            assert final["state"] == "done", f"{final}\n{procs.logs()}"
    for stage, job in killed.items():
        assert job["state"] == "failed", job
        assert job["error"].startswith("interrupted: the edge restarted during"), job
        assert stage in job["error"], job
