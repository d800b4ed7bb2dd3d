"""The job runner: one background thread at a time, every update persisted.

A job is a function of a :class:`JobContext`; the context moves the job through its
planned stages, turns a stage's own 0..1 progress into a monotone 0..1 over the whole
job, times each stage, and writes stage, progress and message to the database on every
update, so ``GET /v1/jobs/{id}`` always shows where the job is and a restarted edge can
say where it was interrupted (see :meth:`EdgeStore.fail_interrupted_jobs`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from edge_service.db import EdgeStore
from fedinspect.service import log_event
from fl_core.errors import Conflict, FedInspectError
from fl_core.schemas import CycleJobResult, Job, JobKind, JobState

log = logging.getLogger("edge_service.jobs")

#: The stages a job reports, with their share of the job's progress; a stage may appear
#: twice (a cycle downloads the base model, then the new one).
Plan = Sequence[tuple[str, float]]

STAGE_KEYS = (
    "request",
    "download",
    "extract",
    "upload",
    "wait",
    "round",
    "finetune",
    "evaluate",
)


class JobInterrupted(Exception):
    """The edge is stopping: the job gives up at its next wait."""


class JobContext:
    """What a running job sees: progress reporting, timing, and an interruptible sleep."""

    def __init__(self, job_id: str, store: EdgeStore, plan: Plan, stop: threading.Event) -> None:
        total = sum(w for _, w in plan)
        self.job_id = job_id
        self.store = store
        self.plan = [(name, w / total) for name, w in plan]
        self.stop = stop
        self.stage_seconds: dict[str, float] = dict.fromkeys(STAGE_KEYS, 0.0)
        self.stage = ""
        self.progress = 0.0
        self._step = -1
        self._offset = 0.0
        self._weight = 0.0
        self._stage_started = time.perf_counter()

    def begin(self, stage: str, message: str | None = None) -> None:
        """Enter the next planned step named ``stage``."""
        self._close_stage()
        ahead = (i for i in range(self._step + 1, len(self.plan)) if self.plan[i][0] == stage)
        step = next(ahead, None)
        if step is None and self._step >= 0 and self.plan[self._step][0] == stage:
            step = self._step  # the planned step again (a cycle's next round): its share
        if step is not None:
            self._offset = sum(w for _, w in self.plan[:step])
            self._weight = self.plan[step][1]
            self._step = step
        else:  # not planned: report it without moving the bar
            self._offset, self._weight = self.progress, 0.0
        self.stage = stage
        self._stage_started = time.perf_counter()
        self.update(0.0, message or stage)

    def update(self, fraction: float, message: str) -> None:
        """The current stage is ``fraction`` done; progress never goes back."""
        fraction = min(1.0, max(0.0, fraction))
        self.progress = max(self.progress, min(1.0, self._offset + self._weight * fraction))
        self.store.update_job(
            self.job_id, stage=self.stage, progress=self.progress, message=message
        )

    def sleep(self, seconds: float) -> None:
        if self.stop.wait(max(0.0, seconds)):
            raise JobInterrupted(f"interrupted: the edge stopped during {self.stage}")

    def _close_stage(self) -> None:
        if self.stage in self.stage_seconds:
            self.stage_seconds[self.stage] += time.perf_counter() - self._stage_started
        self._stage_started = time.perf_counter()

    def finish(self) -> dict[str, float]:
        self._close_stage()
        self.stage = ""
        return {k: round(v, 3) for k, v in self.stage_seconds.items()}


JobFn = Callable[[JobContext], CycleJobResult]


class JobRunner:
    """Runs at most one job at a time in a daemon thread."""

    def __init__(self, store: EdgeStore, on_finish: Callable[[Job], None] | None = None) -> None:
        self.store = store
        self.stop = threading.Event()
        self._on_finish = on_finish
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._current: str | None = None

    def submit(
        self, kind: JobKind, fn: JobFn, plan: Plan, params: dict[str, Any] | None = None
    ) -> Job:
        """Start a job; Conflict (409) while another one is still running."""
        with self._lock:
            if self.stop.is_set():
                raise Conflict("the edge is shutting down")
            if self._thread is not None and self._thread.is_alive() and self._current:
                running = self.store.get_job(self._current)
                raise Conflict(
                    f"job {running.id} ({running.kind.value}) is still running "
                    f"(stage {running.stage or 'queued'}): one job at a time, "
                    "wait for it to finish"
                )
            job = self.store.create_job(kind, params)
            self._current = job.id
            self._thread = threading.Thread(
                target=self._run, args=(job.id, fn, plan), name=f"job-{job.id[:8]}", daemon=True
            )
            self._thread.start()
        log_event(log, "job.queued", job=job.id, kind=kind.value)
        return job

    def _run(self, job_id: str, fn: JobFn, plan: Plan) -> None:
        ctx = JobContext(job_id, self.store, plan, self.stop)
        self.store.update_job(job_id, state=JobState.running, message="started")
        try:
            result = fn(ctx)
        except JobInterrupted as exc:
            self._fail(job_id, str(exc), ctx)
        except FedInspectError as exc:
            self._fail(job_id, exc.detail, ctx)
        except Exception as exc:
            log_event(log, "job.crashed", logging.ERROR, True, job=job_id, stage=ctx.stage)
            self._fail(
                job_id, f"internal error during {ctx.stage}: {type(exc).__name__}: {exc}", ctx
            )
        else:
            result.stage_seconds = ctx.finish()
            # a finished job names no stage it is in: "done", like its state
            self.store.update_job(
                job_id,
                state=JobState.done,
                stage="done",
                progress=1.0,
                message="done",
                result=result,
            )
            log_event(log, "job.done", job=job_id)
        finally:
            with self._lock:
                self._current = None
            if self._on_finish is not None:
                self._on_finish(self.store.get_job(job_id))

    def _fail(self, job_id: str, error: str, ctx: JobContext) -> None:
        stage = ctx.stage
        ctx.finish()
        log_event(log, "job.failed", logging.WARNING, job=job_id, stage=stage, error=error)
        self.store.update_job(
            job_id, state=JobState.failed, stage=stage, error=error, message=f"failed: {error}"
        )

    def busy(self) -> bool:
        with self._lock:
            return self._thread is not None and self._thread.is_alive()

    def wait_idle(self, timeout: float) -> bool:
        """Wait for the running job, if any; True when none is running."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        return not self.busy()

    def shutdown(self, timeout: float = 5.0) -> None:
        """Ask the running job to stop at its next wait, and give it ``timeout`` seconds.

        A job busy computing (extracting, fine-tuning) cannot stop mid-batch; its thread
        is a daemon, and the next start marks it interrupted.
        """
        self.stop.set()
        self.wait_idle(timeout)


def interruptible_sleep(stop: threading.Event) -> Callable[[float], None]:
    """A ``sleep`` for the server client that a stopping edge cuts short."""

    def sleep(seconds: float) -> None:
        if stop.wait(max(0.0, seconds)):
            raise JobInterrupted("interrupted: the edge stopped while retrying a request")

    return sleep


__all__ = [
    "STAGE_KEYS",
    "JobContext",
    "JobFn",
    "JobInterrupted",
    "JobRunner",
    "Plan",
    "interruptible_sleep",
]
