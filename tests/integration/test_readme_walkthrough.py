"""The README's curl walkthrough works when pasted into a shell.

The block between the ``walkthrough-server`` markers is run verbatim with bash
against a real server process (EfficientNet-Lite0 at 64 px to keep it quick).
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.processes import HOST, ROOT, Process, free_port, wait_healthy

pytest.importorskip("elpv_dataset")


def _walkthrough() -> str:
    text = (ROOT / "README.md").read_text()
    block = text.split("<!-- walkthrough-server:begin -->")[1].split(
        "<!-- walkthrough-server:end -->"
    )[0]
    return block.strip().removeprefix("```bash").removesuffix("```")


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[str, str]]:
    token = secrets.token_urlsafe(24)
    port = free_port()
    proc = Process(
        "server",
        "server",
        {
            "FEDINSPECT_SERVER_ADMIN_TOKEN": token,
            "FEDINSPECT_SERVER_MIN_EDGES": "2",
            "FEDINSPECT_SERVER_ROUNDS": "1",  # as the README exports
            "FEDINSPECT_SERVER_DATA_DIR": str(tmp_path / "server"),
            "FEDINSPECT_SERVER_HOST": HOST,
            "FEDINSPECT_SERVER_PORT": str(port),
            "FEDINSPECT_SERVER_INPUT_SIZE": "64",
            "FEDINSPECT_SERVER_TRAIN_EPOCHS": "10",
        },
        tmp_path,
    )
    try:
        url = f"http://{HOST}:{port}"
        wait_healthy(url, proc)
        yield url, token
    finally:
        proc.stop()


@pytest.mark.slow
def test_curl_walkthrough_runs_a_whole_cycle(tmp_path: Path, server: tuple[str, str]) -> None:
    url, token = server
    work = tmp_path / "shell"
    work.mkdir()
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "FEDINSPECT_URL": url,
        "FEDINSPECT_SERVER_ADMIN_TOKEN": token,
    }
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", _walkthrough()],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    assert '"state": "done"' in done.stdout
    # the head is version 2, round 1 averaged the edge's update into version 3
    assert '"result_model_version": 3' in done.stdout
    last = done.stdout.strip().splitlines()[-1].split()
    assert last[:2] == ["3", "2"]  # version 3, parent 2
    import hashlib

    assert hashlib.sha256((work / "new.safetensors").read_bytes()).hexdigest() == last[2]
    assert (work / "features.safetensors").stat().st_size < 64 * 300 * 300
    # the update carries only the trained blocks, in fp16: well under the model's size
    assert (work / "update.safetensors").stat().st_size < (work / "new.safetensors").stat().st_size
