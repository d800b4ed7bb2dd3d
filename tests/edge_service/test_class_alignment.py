"""An edge's classes are matched to the server's by name: an ImageFolder lists its class
folders alphabetically, whatever the server's order, and may hold only some of the
server's classes (label skew); a folder the server does not know fails the job, by name."""

from __future__ import annotations

from pathlib import Path

import pytest

from fl_core.model import SplitModel, build_split_model
from fl_core.serialization import loads
from tests.edge_service.conftest import AUTH, EdgeFactory, wait_job
from tests.edge_service.fakes import FakeServer
from tests.factories import make_image_folder


def _server_model(classes: list[str], seed: int) -> SplitModel:
    return build_split_model(
        classes, backbone="tiny_cnn", input_size=32, pretrained=False, seed=seed
    )


def _server(classes: list[str]) -> FakeServer:
    return FakeServer(base_model=_server_model(classes, 0), new_model=_server_model(classes, 1))


def _folder(root: Path, *classes: str) -> Path:
    return make_image_folder(root, per_class=12, size=32, classes=classes)


@pytest.mark.parametrize(
    "server_classes",
    [
        pytest.param(["functional", "defective"], id="another-order"),
        pytest.param(["functional", "scratch", "defective"], id="subset"),
    ],
)
def test_an_image_folder_takes_part_with_the_servers_labels(
    make_edge: EdgeFactory, tmp_path: Path, server_classes: list[str]
) -> None:
    folder = _folder(tmp_path / "images", "functional", "defective")  # listed d, f
    server = _server(server_classes)
    edge = make_edge(server.client(), dataset=folder)

    done = wait_job(edge, edge.post("/v1/jobs/cycle", headers=AUTH).json()["id"])

    assert done["state"] == "done", done["error"]
    # the uploaded labels are the server's indices, one per local image of the class
    (body,) = server.uploads
    labels = loads(body)[0]["labels"].tolist()
    n_train = done["result"]["n_train"]
    assert len(labels) == n_train
    assert set(labels) == {server_classes.index("functional"), server_classes.index("defective")}
    # the models scored on this edge speak the server's classes, absent ones included
    candidate = done["result"]["metrics"]["candidate"]
    assert [c["name"] for c in candidate["per_class"]] == server_classes
    support = {c["name"]: c["support"] for c in candidate["per_class"]}
    assert support["functional"] > 0 and support["defective"] > 0
    assert support.get("scratch", 0) == 0
    status = edge.get("/v1/status", headers=AUTH).json()
    assert status["dataset"]["class_names"] == ["defective", "functional"]


def test_a_folder_the_server_does_not_know_fails_the_job_by_name(
    make_edge: EdgeFactory, tmp_path: Path
) -> None:
    folder = _folder(tmp_path / "images", "functional", "dusty", "defective")
    server = _server(["functional", "defective"])
    edge = make_edge(server.client(), dataset=folder)

    done = wait_job(edge, edge.post("/v1/jobs/extract", headers=AUTH).json()["id"])

    assert done["state"] == "failed" and done["stage"] == "request"
    assert "['dusty']" in done["error"]
    assert "the server's classes are ['functional', 'defective']" in done["error"]
    assert "Traceback" not in done["error"] and "internal error" not in done["error"]
    assert server.uploads == []
    assert not any(r.url.path.endswith("/weights") for r in server.requests)
