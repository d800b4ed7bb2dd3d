"""The README's pictures of the operator pages (docs/dashboard.png, docs/edge-page.png),
taken on a realistic small system: a server and two edges as real processes on
127.0.0.1, EfficientNet-Lite0 at 96 px, 300 elpv mono cells split between the edges,
two cycles, then headless Chromium signs in to the dashboard and to an edge's page and
tries a defective cell. About five minutes on two cores.

    python scripts/screenshots.py --out docs

The browser tests (tests/browser) take the same pictures on tiny data, to check them.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import httpx
from playwright.sync_api import sync_playwright

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fl_core.data import load_dataset_spec, split  # noqa: E402
from tests.browser.conftest import CHROMIUM, CHROMIUM_ARGS, screenshot  # noqa: E402
from tests.hardening.procs import HOST, Service, free_port  # noqa: E402

SERVER_TOKEN = "screenshots-server-admin-token"
EDGE_TOKEN = "screenshots-edge-admin-token"
DATA = "elpv:type=mono:limit=300"


def wait_jobs(edges: list[Service], job_ids: list[str], timeout_s: float = 900) -> None:
    deadline = time.monotonic() + timeout_s
    pending = dict(zip(job_ids, edges, strict=True))
    while pending and time.monotonic() < deadline:
        for job_id, edge in list(pending.items()):
            edge.check_alive()
            job = httpx.get(
                f"{edge.url}/v1/jobs/{job_id}",
                headers={"Authorization": f"Bearer {EDGE_TOKEN}"},
                timeout=30,
            ).json()
            if job["state"] in ("done", "failed"):
                assert job["state"] == "done", job
                del pending[job_id]
        time.sleep(1)
    assert not pending, f"jobs still running after {timeout_s}s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="fedinspect-screens-"))
    port = free_port()
    server = Service(
        "server",
        "server",
        {
            "FEDINSPECT_SERVER_ADMIN_TOKEN": SERVER_TOKEN,
            "FEDINSPECT_SERVER_DATA_DIR": str(work / "server"),
            "FEDINSPECT_SERVER_HOST": HOST,
            "FEDINSPECT_SERVER_PORT": str(port),
            "FEDINSPECT_SERVER_INPUT_SIZE": "96",
            "FEDINSPECT_SERVER_MIN_EDGES": "2",
            "FEDINSPECT_SERVER_TRAIN_EPOCHS": "40",
        },
        port,
        work,
    )
    started = [server]
    try:
        server.wait_healthy()
        admin = {"Authorization": f"Bearer {SERVER_TOKEN}"}
        edges = []
        for i, name in enumerate(("line-1", "line-2"), start=1):
            reg = httpx.post(f"{server.url}/v1/edges", json={"name": name}, headers=admin).json()
            edge_port = free_port()
            edge = Service(
                name,
                "edge",
                {
                    "FEDINSPECT_EDGE_ADMIN_TOKEN": EDGE_TOKEN,
                    "FEDINSPECT_EDGE_SERVER_URL": server.url,
                    "FEDINSPECT_EDGE_TOKEN": reg["token"],
                    "FEDINSPECT_EDGE_EDGE_ID": reg["edge_id"],
                    "FEDINSPECT_EDGE_NAME": name,
                    "FEDINSPECT_EDGE_HOST": HOST,
                    "FEDINSPECT_EDGE_PORT": str(edge_port),
                    "FEDINSPECT_EDGE_DATA_DIR": str(work / name),
                    "FEDINSPECT_EDGE_DATASET": f"{DATA}:part={i}/2",
                    "FEDINSPECT_EDGE_FINETUNE_EPOCHS": "5",
                    "FEDINSPECT_EDGE_FINETUNE_VIEWS": "2",
                    "FEDINSPECT_EDGE_THREADS": "1",
                },
                edge_port,
                work,
            )
            started.append(edge)
            edge.wait_healthy()
            edges.append(edge)
        for cycle in (1, 2):
            print(f"cycle {cycle}...", file=sys.stderr)
            ids = [
                httpx.post(
                    f"{e.url}/v1/jobs/cycle", headers={"Authorization": f"Bearer {EDGE_TOKEN}"}
                ).json()["id"]
                for e in edges
            ]
            wait_jobs(edges, ids)

        splits = split(load_dataset_spec(f"{DATA}:part=1/2"), 0.1, 0.25, 0)
        test = splits.test
        defective = test.class_names.index("defective")
        cell = next(r.path for r in test.records if r.label == defective)

        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(f"{server.url}/ui")
            page.fill("#token", SERVER_TOKEN)
            page.click("#sign-in-form button[type=submit]")
            page.wait_for_selector("#chart circle.point")
            screenshot(page, args.out / "dashboard.png")
            page.goto(f"{edges[0].url}/ui")
            page.fill("#token", EDGE_TOKEN)
            page.click("#sign-in-form button[type=submit]")
            page.wait_for_selector("#gate")
            page.set_input_files("#image", str(cell))
            page.wait_for_selector("#heatmap")
            screenshot(page, args.out / "edge-page.png")
            browser.close()
        print(f"wrote {args.out / 'dashboard.png'} and {args.out / 'edge-page.png'}")
    finally:
        for svc in reversed(started):
            svc.stop()


if __name__ == "__main__":
    main()
