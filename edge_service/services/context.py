"""The edge's long-lived objects, built once in the app's lifespan.

Routes reach them through ``api.deps``; tests build an app with their own settings and
server client instead of patching anything.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import httpx

from edge_service.config import Settings
from edge_service.db import EdgeStore
from edge_service.services.client import RetryPolicy, ServerClient, build_http_client
from edge_service.services.cycle import LAST_CYCLE_KEY, PLANS, CycleService
from edge_service.services.dataset import LocalData
from edge_service.services.jobs import JobRunner, interruptible_sleep
from edge_service.services.metrics import EdgeMetrics
from edge_service.services.predict import SERVING_BATCH, PredictLimits, Predictor
from edge_service.services.registry import ModelRegistry
from edge_service.services.serving import DeployedModel
from fedinspect.service import log_event, redact_url
from fl_core.blobstore import LocalBlobStore
from fl_core.schemas import EdgeStatus, Job, JobKind, ServerLink

log = logging.getLogger("edge_service")


@dataclass
class EdgeContext:
    settings: Settings
    store: EdgeStore
    blobs: LocalBlobStore
    http: httpx.Client
    owns_http: bool
    client: ServerClient
    data: LocalData
    registry: ModelRegistry
    metrics: EdgeMetrics
    runner: JobRunner
    cycles: CycleService
    predictor: Predictor
    deployed: DeployedModel

    # ------------------------------------------------------------------ jobs

    def start_job(self, kind: JobKind, model_version: int | None = None) -> Job:
        if kind == JobKind.cycle:
            return self.runner.submit(kind, self.cycles.run_cycle, PLANS["cycle"])
        if kind == JobKind.extract:
            return self.runner.submit(kind, self.cycles.run_extract, PLANS["extract"])
        params: dict[str, Any] = {"model_version": model_version}
        return self.runner.submit(
            kind,
            lambda ctx: self.cycles.run_finetune(ctx, model_version),
            PLANS["finetune"],
            params,
        )

    def status(self) -> EdgeStatus:
        last_cycle = self.store.get_state(LAST_CYCLE_KEY)
        server, problems = self.readiness()
        return EdgeStatus(
            edge_name=self.settings.name,
            server_url=redact_url(self.settings.server_url),
            dataset=self.data.try_summary(),
            deployed_model=self.registry.deployed(),
            last_cycle_id=last_cycle if isinstance(last_cycle, int) else None,
            last_job=self.store.last_job(),
            server=server,
            problems=problems,
        )

    def readiness(self) -> tuple[ServerLink, list[str]]:
        """The server check and what stops this edge from taking part in a cycle."""
        server = self.client.check()
        problems = [] if server.authorized else [server.detail]
        dataset = self.data.problem()
        if dataset is not None:
            problems.append(dataset)
        return server, problems

    def log_readiness(self) -> None:
        """At start-up: say at once what will make the first job fail."""
        server, problems = self.readiness()
        for problem in problems:
            log_event(log, "not_ready", logging.WARNING, edge=self.settings.name, problem=problem)
        if not problems:
            log_event(log, "ready", edge=self.settings.name, server=server.url)

    def close(self) -> None:
        self.runner.shutdown(timeout=5.0)
        if self.owns_http:
            self.http.close()
        self.store.close()


def build_context(settings: Settings, http: httpx.Client | None = None) -> EdgeContext:
    """Open the database and blob store, and wire the services together.

    Jobs that a killed process left queued or running are marked failed first, so the
    edge reports what happened instead of a job that runs forever.
    """
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    store = EdgeStore.open(settings.db_path)
    interrupted = store.fail_interrupted_jobs()
    if interrupted:
        log_event(log, "jobs.interrupted", logging.WARNING, jobs=",".join(interrupted))
    blobs = LocalBlobStore(settings.blob_dir)
    blobs.clean_tmp()
    metrics = EdgeMetrics(store.count_jobs_by_state)
    runner = JobRunner(store)
    owns_http = http is None
    http_client = http if http is not None else build_http_client(settings)
    client = ServerClient(
        http_client,
        settings.token.get_secret_value() if settings.token else None,
        RetryPolicy.from_settings(settings),
        sleep=interruptible_sleep(runner.stop),
        on_transfer=metrics.on_transfer,
    )
    data = LocalData(settings)
    registry = ModelRegistry(store, blobs)
    deployed = DeployedModel(
        registry, settings.extract_backend, settings.threads, settings.onnx_dir
    )
    return EdgeContext(
        settings=settings,
        store=store,
        blobs=blobs,
        http=http_client,
        owns_http=owns_http,
        client=client,
        data=data,
        registry=registry,
        metrics=metrics,
        runner=runner,
        cycles=CycleService(settings, client, data, registry),
        deployed=deployed,
        predictor=Predictor(
            deployed,
            metrics,
            PredictLimits(
                max_pixels=settings.max_image_pixels,
                max_bytes=settings.max_predict_bytes,
                max_files=settings.max_predict_files,
                max_request_pixels=settings.max_predict_pixels,
                max_aspect=settings.max_image_aspect,
                batch_size=min(settings.batch_size, SERVING_BATCH),
            ),
        ),
    )


__all__ = ["EdgeContext", "build_context"]
