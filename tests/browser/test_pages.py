"""The operator pages in a real browser (headless Chromium), against real server and
edge processes on 127.0.0.1 with tiny data: sign in, register an edge, watch a cycle go
from collecting to done on the dashboard, try an image on the edge's page and see its
heat map, run a call from Swagger UI; and no page asks another host for anything."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import BrowserContext, Dialog, Page, expect

from tests.browser.conftest import CYCLE_TIMEOUT_MS, Recorder, not_blank, screenshot
from tests.hardening.procs import (
    EDGE_ADMIN_TOKEN,
    SERVER_ADMIN_TOKEN,
    Service,
    Services,
    edge_env,
    free_port,
    services,
)

pytestmark = pytest.mark.slow


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Services]:
    with services(tmp_path) as started:
        yield started


@pytest.fixture
def server(procs: Services, tmp_path: Path, recorder: Recorder) -> Service:
    # two uploads make the quorum: one edge's upload leaves the cycle collecting until
    # the operator's "Train now"
    svc = procs.server(
        tmp_path / "server",
        free_port(),
        min_edges="2",
        cycle_deadline_s="900",
        # enough epochs on these tiny images for the screenshots to show a trained model;
        # no noise: the pooled mode's noise is sized for EfficientNet's features and
        # would drown tiny_cnn's
        train_epochs="30",
        privacy__noise_sigma="0",
    )
    recorder.allowed.add(f"127.0.0.1:{svc.port}")
    return svc


def sign_in(page: Page, url: str, token: str) -> None:
    page.goto(f"{url}/ui")
    page.fill("#token", token)
    page.click("#sign-in-form button[type=submit]")
    expect(page.locator("#app")).to_be_visible()


def accept(dialog: Dialog) -> None:
    dialog.accept()


def test_dashboard_follows_a_cycle_and_the_edge_page_shows_a_heat_map(
    context: BrowserContext,
    recorder: Recorder,
    server: Service,
    procs: Services,
    images: Path,
    tmp_path: Path,
    shots: Path,
) -> None:
    dash = context.new_page()
    sign_in(dash, server.url, SERVER_ADMIN_TOKEN)
    # the token stays in the tab's session storage, never in the address
    assert dash.evaluate("sessionStorage.getItem('fedinspect.server.token')") == SERVER_ADMIN_TOKEN
    expect(dash.locator("#models tr[data-version='1']")).to_be_visible()

    # register an edge: its token is shown once
    dash.fill("#edge-name", "line-1")
    dash.click("#register-form button[type=submit]")
    expect(dash.locator("#new-token")).to_be_visible()
    token = dash.text_content("#new-token-value") or ""
    edge_id = dash.text_content("#new-token-id") or ""
    assert len(token) > 20 and edge_id.startswith("edge-")
    expect(dash.locator(f"#edges tr[data-edge-id='{edge_id}'] td.name")).to_have_text("line-1")
    dash.click("#hide-token")
    expect(dash.locator("#new-token-value")).to_have_text("")

    edge_port = free_port()
    edge = procs.edge(
        "edge",
        edge_port,
        edge_env(
            tmp_path / "edge",
            edge_port,
            server.url,
            token,
            edge_id,
            images,
            name="line-1",
            finetune_epochs="6",
        ),
    )
    recorder.allowed.add(f"127.0.0.1:{edge.port}")

    # the edge's page: nothing wrong, then "Start a cycle"
    page = context.new_page()
    sign_in(page, edge.url, EDGE_ADMIN_TOKEN)
    expect(page.locator("#server")).to_contain_text("connected")
    expect(page.locator("#problems")).to_be_hidden()
    expect(page.locator("#dataset-counts")).to_contain_text("bright")
    page.click("#start-cycle")

    # the dashboard: collecting with 1 of 2 uploads; the waiting job says what it waits for
    collecting = dash.locator("#cycles tr[data-state='collecting']")
    expect(collecting.locator("td.uploads")).to_contain_text("1 / 2", timeout=CYCLE_TIMEOUT_MS)
    expect(collecting.locator("td.deadline")).to_contain_text(re.compile(r"in \d+m"))
    expect(page.locator("#job-message")).to_contain_text(
        "an operator can train now", timeout=CYCLE_TIMEOUT_MS
    )
    collecting.locator("button.train").click()
    done = dash.locator("#cycles tr[data-state='done']")
    expect(done).to_be_visible(timeout=CYCLE_TIMEOUT_MS)
    expect(done.locator("td.metrics")).to_contain_text("accuracy")
    expect(dash.locator("#models tr[data-version='2']")).to_be_visible()

    # the edge finishes stage 3 and reports its test accuracy to the server
    expect(page.locator("#job-state")).to_have_text("done", timeout=CYCLE_TIMEOUT_MS)
    accuracy = dash.locator(f"#edges tr[data-edge-id='{edge_id}'] td.accuracy")
    expect(accuracy).to_have_text(re.compile(r"\d+\.\d%"), timeout=CYCLE_TIMEOUT_MS)
    expect(dash.locator("#chart circle.point")).to_have_count(1)
    assert not_blank(screenshot(dash, shots / "dashboard.png"))

    # the gate may keep nothing on 40 tiny images; then the operator deploys the
    # fine-tuned model from the page (a roll forward, as a rollback would be)
    with httpx.Client(
        base_url=edge.url, headers={"Authorization": f"Bearer {EDGE_ADMIN_TOKEN}"}
    ) as api:
        job: dict[str, Any] = api.get("/v1/status").json()["last_job"]
    if job["result"]["deployed_model_id"] is None:
        page.once("dialog", accept)
        local = job["result"]["local_model_id"]
        page.click(f"#models tr[data-model-id='{local}'] button")
        expect(page.locator(f"#models tr[data-model-id='{local}']")).to_contain_text("serving")
    expect(page.locator("#evaluation")).to_contain_text("serving now")

    # try an image: prediction, scores and the heat map
    page.set_input_files("#image", str(next((images / "bright").iterdir())))
    expect(page.locator("#predicted b")).to_have_text(re.compile(r"^(bright|dark)$"))
    heatmap = page.locator("#heatmap")
    expect(heatmap).to_be_visible()
    assert heatmap.evaluate("img => img.complete && img.naturalWidth > 0")
    assert not_blank(screenshot(page, shots / "edge-page.png"))

    # the edge's own docs render offline too
    page.goto(f"{edge.url}/docs")
    expect(page.locator(".swagger-ui .info .title")).to_contain_text("FedInspect edge")
    page.goto(f"{edge.url}/redoc")
    expect(page.get_by_role("heading", name=re.compile("FedInspect edge"))).to_be_visible()

    assert recorder.refused == [] and recorder.other_hosts() == []
    assert not [u for u in recorder.urls if token in u or SERVER_ADMIN_TOKEN in u]


def test_swagger_ui_runs_a_call_with_the_admin_token(
    context: BrowserContext, recorder: Recorder, server: Service, tmp_path: Path
) -> None:
    page = context.new_page()
    page.goto(f"{server.url}/docs")
    expect(page.locator(".swagger-ui .info .title")).to_contain_text("FedInspect server")
    page.click(".swagger-ui .auth-wrapper button.authorize")
    page.fill(".swagger-ui .modal-ux input", SERVER_ADMIN_TOKEN)
    page.click(".swagger-ui .modal-ux .auth-btn-wrapper button[type=submit]")
    page.click(".swagger-ui .modal-ux button.btn-done")

    operation = page.locator("#operations-edges-list_edges_v1_edges_get")
    operation.locator(".opblock-summary").click()
    operation.locator("button.execute").click()
    status = operation.locator(".live-responses-table tbody .response-col_status")
    expect(status).to_have_text("200")
    assert not_blank(screenshot(page, tmp_path / "swagger-ui.png"))

    page.goto(f"{server.url}/redoc")
    expect(page.get_by_role("heading", name=re.compile("FedInspect server"))).to_be_visible()

    assert recorder.refused == [] and recorder.other_hosts() == []
    assert not [u for u in recorder.urls if SERVER_ADMIN_TOKEN in u]
