"""A full disk under the server's data dir, for real: a small tmpfs (issue 24, defect 5).

The probe got bare 500s, and a training that could not write its model stayed
``training`` with no reason for good. Now a write that finds no space is answered 507
naming the data dir (its setting, not the path), nothing half-written is kept, the
training is recorded as failed with the reason, and once space is freed the server
carries on. Mounting a tmpfs needs root (CAP_SYS_ADMIN), as CI's container has.
"""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.hardening.procs import (
    SERVER_ADMIN_TOKEN,
    client,
    free_port,
    register_edge,
    services,
    wait_until,
)
from tests.server_service.helpers import make_upload

TMPFS_MIB = 48


@contextmanager
def tmpfs(path: Path, size_mib: int) -> Iterator[Path]:
    path.mkdir(parents=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_mib}m", "tmpfs", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert mounted.returncode == 0, f"this test mounts a tmpfs and needs root: {mounted.stderr}"
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(disk: Path, leave: int = 0) -> Path:
    """Fill ``disk`` with one file until no byte is left, then give back ``leave``."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    block = b"\xa5" * (1 << 20)
    try:
        for _ in range(4 * TMPFS_MIB):  # bounded: the tmpfs holds TMPFS_MIB MiB
            for size in (1 << 20, 1 << 12):
                try:
                    os.write(fd, block[:size])
                    break
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC
            else:
                break  # not even 4 KiB fits: full
    finally:
        os.close(fd)
    os.truncate(filler, max(0, filler.stat().st_size - leave))
    return filler


@pytest.mark.slow
def test_a_full_disk_is_507_and_leaves_no_cycle_training(tmp_path: Path) -> None:
    port = free_port()
    with tmpfs(tmp_path / "disk", TMPFS_MIB) as disk, services(tmp_path) as procs:
        # a big head: the trained model (~2 MB) cannot fit where a database write can
        server = procs.server(disk / "server", port, min_edges="2", head_hidden="16384")
        a, b = register_edge(server.url, "edge-a"), register_edge(server.url, "edge-b")
        statuses: list[int] = []
        with client(server.url, a["token"]) as ca, client(server.url, SERVER_ADMIN_TOKEN) as admin:
            cycle = ca.post("/v1/cycles").json()
            url = f"/v1/cycles/{cycle['id']}"
            body = make_upload(cycle, a["edge_id"], rows=64, seed=1)

            filler = fill(disk)
            refused = ca.put(f"{url}/features", content=body)
            statuses.append(refused.status_code)
            assert refused.status_code == 507, refused.text
            assert refused.json()["detail"] == (
                "the server's data dir (FEDINSPECT_SERVER_DATA_DIR) is full: nothing of this "
                "request was stored; retry once an operator has freed space"
            )
            seen = ca.get(url)
            assert seen.status_code == 200 and seen.json()["uploads"] == []
            assert not list((disk / "server" / "blobs" / "tmp").iterdir())  # nothing half-kept

            filler.unlink()  # space again: the same upload is stored
            stored = ca.put(f"{url}/features", content=body)
            assert stored.status_code == 201, stored.text

            # Room for the database, none for the trained model.
            filler = fill(disk, leave=512 * 1024)
            train = admin.post(f"{url}/train")
            statuses.append(train.status_code)
            assert train.status_code == 200 and train.json()["state"] == "training", train.text
            wait_until(lambda: ca.get(url).json()["state"] != "training", 120, "training to end")
            ended = ca.get(url).json()
            assert ended["state"] == "failed", ended
            assert ended["reason"] == (
                "training failed: the server's data dir is full (no space left on device)"
            )

            filler.unlink()
            with client(server.url, b["token"]) as cb:
                again = cb.post("/v1/cycles")
                statuses.append(again.status_code)
                assert again.status_code == 201, again.text
        server.check_alive()
        log = server.log(500_000)
    assert 500 not in statuses
    assert "Traceback" not in log
    assert "event=storage.full" in log and f"data_dir={disk / 'server'}" in log
