"""A blob store damaged under a running server (issue 24, smaller findings): weights
whose bytes rotted on disk are not served under their old ETag, and no cycle opens on
a base model whose blob is gone."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.hardening.procs import SERVER_ADMIN_TOKEN, client, free_port, register_edge, services


def _blob(data_dir: Path, sha256: str) -> Path:
    return data_dir / "blobs" / sha256[:2] / sha256


@pytest.mark.slow
def test_rotted_weights_are_not_served(tmp_path: Path) -> None:
    port = free_port()
    data_dir = tmp_path / "server"
    with services(tmp_path) as procs:
        server = procs.server(data_dir, port)
        edge = register_edge(server.url, "edge-a")
        with client(server.url, edge["token"]) as c:
            model = c.get("/v1/models/1").json()
            good = c.get("/v1/models/1/weights")
            assert good.status_code == 200 and good.headers["ETag"] == f'"{model["sha256"]}"'

            blob = _blob(data_dir, model["sha256"])
            rotted = bytearray(blob.read_bytes())
            rotted[len(rotted) // 2] ^= 0xFF  # one flipped byte, same size, same name
            blob.write_bytes(bytes(rotted))
            detail = (
                "the stored weights of model version 1 are corrupt (their sha256 no longer "
                "matches); an operator must restore them"
            )
            for path in ("/v1/models/1/weights", "/v1/models/1/manifest"):
                answer = c.get(path)
                assert answer.status_code == 503, (path, answer.status_code)
                assert answer.json() == {"detail": detail}
            subset = c.post("/v1/models/1/weights/subset", json={"names": ["x"]})
            assert subset.status_code == 503 and subset.json() == {"detail": detail}

            blob.write_bytes(good.content)  # restored: served as before
            assert c.get("/v1/models/1/weights").content == good.content
        server.check_alive()
        assert "Traceback" not in server.log(200_000)


@pytest.mark.slow
def test_no_cycle_opens_on_a_base_model_whose_blob_is_missing(tmp_path: Path) -> None:
    port = free_port()
    data_dir = tmp_path / "server"
    with services(tmp_path) as procs:
        server = procs.server(data_dir, port)
        edge = register_edge(server.url, "edge-a")
        with client(server.url, edge["token"]) as c, client(server.url, SERVER_ADMIN_TOKEN) as a:
            model = c.get("/v1/models/1").json()
            first = c.post("/v1/cycles").json()  # the server now knows this model's spec
            assert a.post(f"/v1/cycles/{first['id']}/cancel").status_code == 200
            blob = _blob(data_dir, model["sha256"])
            kept = blob.read_bytes()
            blob.unlink()
            refused = c.post("/v1/cycles")
            assert refused.status_code == 503, refused.text
            assert refused.json()["detail"] == (
                "the weights of base model version 1 are missing from the server's blob "
                "store: no cycle opens until an operator restores them"
            )
            assert [cycle["state"] for cycle in c.get("/v1/cycles").json()] == ["cancelled"]

            blob.write_bytes(kept)  # restored: cycles open again
            assert c.post("/v1/cycles").status_code == 201
        server.check_alive()
        assert "Traceback" not in server.log(200_000)
