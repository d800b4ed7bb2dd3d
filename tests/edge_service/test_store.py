"""The job store and runner: persistence, interrupted jobs after a restart, one at a time."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from sqlalchemy import update

from edge_service.db import EdgeStore, JobRow
from edge_service.services.jobs import JobContext, JobRunner
from fl_core.errors import Conflict, InvalidInput
from fl_core.schemas import CycleJobResult, JobKind, JobState
from tests.edge_service.conftest import AUTH, EdgeFactory, TestClient
from tests.edge_service.fakes import FakeServer
from tests.factories import cycle_job_result, eval_metrics


def test_jobs_persist_across_reopening(tmp_path: Path) -> None:
    store = EdgeStore.open(tmp_path / "edge.db")
    job = store.create_job(JobKind.extract, {"x": 1})
    store.update_job(job.id, state=JobState.running, stage="extract", progress=0.4, message="m")
    store.update_job(job.id, state=JobState.done, progress=1.0, result=CycleJobResult(n_train=3))
    store.close()

    again = EdgeStore.open(tmp_path / "edge.db")
    loaded = again.get_job(job.id)
    assert loaded.state == JobState.done and loaded.result == CycleJobResult(n_train=3)
    assert loaded.stage == "extract" and loaded.progress == 1.0
    assert loaded.created_at.tzinfo is not None
    assert again.job_params(job.id) == {"x": 1}
    assert again.fail_interrupted_jobs() == []
    again.close()


def test_running_and_queued_jobs_are_failed_on_restart(tmp_path: Path) -> None:
    store = EdgeStore.open(tmp_path / "edge.db")
    running = store.create_job(JobKind.cycle)
    store.update_job(running.id, state=JobState.running, stage="extract", progress=0.3)
    queued = store.create_job(JobKind.finetune)
    store.close()

    again = EdgeStore.open(tmp_path / "edge.db")
    assert sorted(again.fail_interrupted_jobs()) == sorted([running.id, queued.id])
    job = again.get_job(running.id)
    assert job.state == JobState.failed
    assert job.error == "interrupted: the edge restarted during extract"
    assert job.progress == pytest.approx(0.3)
    assert again.get_job(queued.id).error == "interrupted: the edge restarted during queued"
    assert again.count_jobs_by_state()["failed"] == 2
    again.close()


def test_a_restarted_edge_reports_the_interrupted_job(
    make_edge: EdgeFactory, fake_server: FakeServer, tmp_path: Path
) -> None:
    store = EdgeStore.open(tmp_path / "edge" / "edge.db")
    job = store.create_job(JobKind.cycle)
    store.update_job(job.id, state=JobState.running, stage="wait", progress=0.5)
    store.close()

    edge: TestClient = make_edge(fake_server.client())
    reported = edge.get(f"/v1/jobs/{job.id}", headers=AUTH).json()
    assert reported["state"] == "failed"
    assert reported["error"] == "interrupted: the edge restarted during wait"
    assert edge.get("/v1/status", headers=AUTH).json()["last_job"]["id"] == job.id
    metrics = edge.get("/metrics", headers=AUTH).text
    assert 'fedinspect_edge_jobs{state="failed"} 1.0' in metrics
    # and the edge accepts new work
    assert edge.post("/v1/jobs/extract", headers=AUTH).status_code == 202


def test_runner_progress_is_monotone_and_persisted(tmp_path: Path) -> None:
    store = EdgeStore.open(tmp_path / "edge.db")
    runner = JobRunner(store)
    seen: list[float] = []

    def work(ctx: JobContext) -> CycleJobResult:
        ctx.begin("extract")
        for i in range(5):
            ctx.update(i / 4, f"extracting features {i}/4")
            seen.append(store.get_job(ctx.job_id).progress)
        ctx.update(0.1, "going back is ignored")
        seen.append(store.get_job(ctx.job_id).progress)
        ctx.begin("upload")
        ctx.update(0.5, "uploading")
        seen.append(store.get_job(ctx.job_id).progress)
        return cycle_job_result(decision="ok")

    job = runner.submit(JobKind.extract, work, [("extract", 3.0), ("upload", 1.0)])
    assert runner.wait_idle(10)
    done = store.get_job(job.id)
    assert done.state == JobState.done and done.progress == 1.0
    assert done.result is not None and done.result.decision == "ok"
    # the runner's own timing replaces whatever the job said
    assert set(done.result.stage_seconds) >= {"extract", "upload"}
    assert seen == sorted(seen)
    assert seen[4] == pytest.approx(0.75) and seen[-1] == pytest.approx(0.875)
    store.close()


def test_rounds_advance_the_bar_across_the_waits_between_them(tmp_path: Path) -> None:
    """A cycle's rounds share one planned step: each round re-enters it after the
    (unplanned) wait for the others, and the bar keeps moving."""
    store = EdgeStore.open(tmp_path / "edge.db")
    runner = JobRunner(store)
    seen: list[float] = []

    def work(ctx: JobContext) -> CycleJobResult:
        ctx.begin("wait")
        ctx.update(1.0, "head trained")
        for r in (1, 2):
            ctx.begin("round")
            ctx.update((r - 0.5) / 2, f"round {r}: training")
            ctx.update(r / 2, f"round {r}: update sent")
            seen.append(store.get_job(ctx.job_id).progress)
            ctx.begin("wait")  # for the other edges' updates
            ctx.update(0.9, "waiting")
            seen.append(store.get_job(ctx.job_id).progress)
        ctx.begin("finetune")
        ctx.update(0.5, "fine-tuning")
        seen.append(store.get_job(ctx.job_id).progress)
        return cycle_job_result()

    job = runner.submit(JobKind.cycle, work, [("wait", 1.0), ("round", 2.0), ("finetune", 1.0)])
    assert runner.wait_idle(10)
    assert store.get_job(job.id).state == JobState.done
    assert seen == pytest.approx([0.5, 0.5, 0.75, 0.75, 0.875])
    store.close()


def test_runner_allows_one_job_at_a_time_and_records_errors(tmp_path: Path) -> None:
    store = EdgeStore.open(tmp_path / "edge.db")
    runner = JobRunner(store)
    release = threading.Event()

    def blocked(ctx: JobContext) -> CycleJobResult:
        ctx.begin("wait")
        release.wait(10)
        raise InvalidInput("the local test split is empty")

    first = runner.submit(JobKind.cycle, blocked, [("wait", 1.0)])
    with pytest.raises(Conflict, match=f"job {first.id} \\(cycle\\) is still running"):
        runner.submit(JobKind.extract, blocked, [("wait", 1.0)])
    release.set()
    assert runner.wait_idle(10)
    failed = store.get_job(first.id)
    assert failed.state == JobState.failed and failed.stage == "wait"
    assert failed.error == "the local test split is empty"

    def crash(ctx: JobContext) -> CycleJobResult:
        ctx.begin("finetune")
        raise RuntimeError("boom")

    second = runner.submit(JobKind.finetune, crash, [("finetune", 1.0)])
    assert runner.wait_idle(10)
    assert store.get_job(second.id).error == "internal error during finetune: RuntimeError: boom"
    store.close()


def test_shutdown_interrupts_a_waiting_job(tmp_path: Path) -> None:
    store = EdgeStore.open(tmp_path / "edge.db")
    runner = JobRunner(store)

    def waits(ctx: JobContext) -> CycleJobResult:
        ctx.begin("wait")
        ctx.sleep(30)
        return CycleJobResult()

    job = runner.submit(JobKind.cycle, waits, [("wait", 1.0)])
    runner.shutdown(timeout=10)
    assert not runner.busy()
    assert store.get_job(job.id).error == "interrupted: the edge stopped during wait"
    with pytest.raises(Conflict, match="shutting down"):
        runner.submit(JobKind.cycle, waits, [("wait", 1.0)])
    store.close()


def test_jobs_stored_as_succeeded_read_as_done(tmp_path: Path) -> None:
    """Databases written before jobs and cycles shared one vocabulary stay readable."""
    store = EdgeStore.open(tmp_path / "edge.db")
    job = store.create_job(JobKind.extract)
    with store._sessions() as s:
        s.execute(update(JobRow).where(JobRow.id == job.id).values(state="succeeded"))
        s.commit()
    assert store.get_job(job.id).state == JobState.done
    assert store.count_jobs_by_state()["done"] == 1
    store.close()


def test_results_stored_before_the_typed_contract_still_read(tmp_path: Path) -> None:
    """A job result written by an older edge (no gate validation, majority floor,
    downloads or fine-tuning fields) reads with those fields' defaults."""
    store = EdgeStore.open(tmp_path / "edge.db")
    job = store.create_job(JobKind.finetune)
    old = {
        "cycle_id": None,
        "model_version": 2,
        "n_train": 6,
        "n_val": 2,
        "n_test": 4,
        "bytes_uploaded": 0,
        "bytes_downloaded": 10,
        "raw_train_bytes": 50,
        "metrics": {
            "server_model": eval_metrics(0.7).model_dump(mode="json"),
            "candidate": eval_metrics(0.8).model_dump(mode="json"),
            "previous": None,
        },
        "previous_model_id": None,
        "deployed": True,
        "decision": "deployed: no model was deployed (candidate accuracy 0.8000)",
        "local_model_id": 1,
        "stage_seconds": {"finetune": 1.5},
    }
    with store._sessions() as s:
        s.execute(update(JobRow).where(JobRow.id == job.id).values(result=json.dumps(old)))
        s.commit()
    result = store.get_job(job.id).result
    assert result is not None
    assert result.metrics.candidate == eval_metrics(0.8)
    assert result.metrics.validation is None and result.majority is None
    assert result.finetune is None and result.downloads == [] and result.chosen is None
    assert (result.model_version, result.bytes_downloaded, result.local_model_id) == (2, 10, 1)
    assert result.decision == old["decision"] and result.stage_seconds == {"finetune": 1.5}
    store.close()
