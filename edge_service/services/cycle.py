"""The stages of a training cycle on the edge, and the deploy gate.

Stage 2 (``extract`` job): request a cycle, download the base model (sha256 checked,
cached in the blob store), extract features of the local training split with the
cycle's spec, upload them (in the spec's ``stats`` privacy mode: per-class statistics
of the features instead of rows). Nothing but features and labels, or their
statistics, leaves the edge.

Stage 3 (``finetune`` job): download the server's new base model, evaluate it on the
local test split, fine-tune it on the local training split (validation split for early
stopping), evaluate the candidate and the deployed model on the test split, and deploy
the candidate only if it is not worse (:func:`deploy_gate`). The stages below the first
fine-tuned one are frozen: the extraction backend runs them, once per image, and the
three evaluations share one pass of them over the test split whenever the models' frozen
weights are the same (always, unless the backbone's weights changed between cycles).

The ``cycle`` job runs stage 2, waits for the server to finish the cycle, then stage 3.
Every job returns the same result keys (``None`` where a stage did not run).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from edge_service.config import Settings
from edge_service.services.client import ServerClient
from edge_service.services.dataset import LocalData
from edge_service.services.jobs import JobContext, Plan
from edge_service.services.registry import ModelRegistry
from edge_service.services.weights import fetch_base_weights
from fl_core.data import ImageSet
from fl_core.errors import Conflict, InvalidInput, RemoteError, Unavailable
from fl_core.features import check_model_matches_spec, extract_images
from fl_core.model import SplitModel, model_from_bytes
from fl_core.onnx_runtime import lower_runner
from fl_core.privacy import pack_upload
from fl_core.schemas import Cycle, CycleState, EvalMetrics, FeatureSpec, LocalModel
from fl_core.training import (
    FinetuneConfig,
    FrozenActivations,
    evaluate,
    evaluate_activations,
    finetune,
    finetune_start,
    frozen_activations,
    frozen_runner,
)

log = logging.getLogger("edge_service.cycle")

LAST_CYCLE_KEY = "last_cycle_id"

PLANS: dict[str, Plan] = {
    "cycle": [
        ("request", 0.02),
        ("download", 0.04),
        ("extract", 0.22),
        ("upload", 0.06),
        ("wait", 0.2),
        ("download", 0.04),
        ("evaluate", 0.04),
        ("finetune", 0.33),
        ("evaluate", 0.05),
    ],
    "extract": [("request", 0.05), ("download", 0.1), ("extract", 0.7), ("upload", 0.15)],
    "finetune": [("download", 0.08), ("evaluate", 0.07), ("finetune", 0.75), ("evaluate", 0.1)],
}


# --------------------------------------------------------------------------- the gate


@dataclass(frozen=True)
class GateDecision:
    deploy: bool
    reason: str


@dataclass(frozen=True)
class GateOutcome:
    """What the gate did with one candidate."""

    candidate: EvalMetrics
    previous: EvalMetrics | None
    previous_model_id: int | None
    deployed: bool
    decision: str
    local_model: LocalModel


def deploy_gate(
    candidate: EvalMetrics, deployed: EvalMetrics | None, min_delta: float
) -> GateDecision:
    """Deploy the candidate unless its test accuracy is below the deployed one's - delta."""
    if deployed is None:
        return GateDecision(
            True, f"deployed: no model was deployed (candidate accuracy {candidate.accuracy:.4f})"
        )
    floor = deployed.accuracy - min_delta
    if candidate.accuracy >= floor:
        return GateDecision(
            True,
            f"deployed: candidate accuracy {candidate.accuracy:.4f} >= deployed accuracy "
            f"{deployed.accuracy:.4f} - {min_delta:g}",
        )
    return GateDecision(
        False,
        f"rejected: candidate accuracy {candidate.accuracy:.4f} < deployed accuracy "
        f"{deployed.accuracy:.4f} - {min_delta:g}; the deployed model stays",
    )


# --------------------------------------------------------------------------- the stages


def _empty_result() -> dict[str, Any]:
    return {
        "cycle_id": None,
        "base_model_version": None,
        "model_version": None,
        "n_train": 0,
        "n_val": 0,
        "n_test": 0,
        "rows_uploaded": 0,
        "upload_sha256": None,
        "bytes_uploaded": 0,
        "bytes_downloaded": 0,
        # how each base model arrived: cached, delta (changed tensors only) or full
        "downloads": [],
        "raw_train_bytes": 0,
        "extract_backend": None,
        "metrics": {"server_model": None, "candidate": None, "previous": None},
        "deployed": False,
        "decision": "",
        "local_model_id": None,
        "previous_model_id": None,
    }


class CycleService:
    """Runs the cycle's stages for the job runner."""

    def __init__(
        self,
        settings: Settings,
        client: ServerClient,
        data: LocalData,
        registry: ModelRegistry,
    ) -> None:
        self.settings = settings
        self.client = client
        self.data = data
        self.registry = registry

    # ------------------------------------------------------------------ jobs

    def run_cycle(self, ctx: JobContext) -> dict[str, Any]:
        result = _empty_result()
        cycle = self._stage2(ctx, result)
        done = self._wait(ctx, cycle)
        assert done.result_model_version is not None
        self._stage3(ctx, done.result_model_version, result)
        return result

    def run_extract(self, ctx: JobContext) -> dict[str, Any]:
        result = _empty_result()
        self._stage2(ctx, result)
        return result

    def run_finetune(self, ctx: JobContext, model_version: int | None) -> dict[str, Any]:
        result = _empty_result()
        self._stage3(ctx, model_version, result)
        return result

    # ------------------------------------------------------------------ stage 2

    def _stage2(self, ctx: JobContext, result: dict[str, Any]) -> Cycle:
        ctx.begin("request", "requesting a training cycle")
        splits = self.data.splits()
        cycle = self.client.create_cycle()
        spec = cycle.spec
        result["cycle_id"] = cycle.id
        result["base_model_version"] = spec.base_model_version
        self.registry.store.set_state(LAST_CYCLE_KEY, cycle.id)
        self.data.check_classes(spec.class_names)
        log.info(
            "cycle=%d edge=%s event=joined state=%s base_model=%d",
            cycle.id,
            self.settings.name,
            cycle.state.value,
            spec.base_model_version,
        )
        ctx.update(1.0, f"joined cycle {cycle.id}")

        ctx.begin("download", f"downloading base model {spec.base_model_version}")
        model = self._base_model(spec, result)
        ctx.update(1.0, f"base model {spec.base_model_version} ready")

        train = splits.train
        result["n_train"], result["n_val"], result["n_test"] = (
            len(train),
            len(splits.val),
            len(splits.test),
        )
        result["raw_train_bytes"] = train.raw_bytes()
        ctx.begin("extract", f"extracting features 0/{len(train)}")
        runner = lower_runner(model, self.settings.extract_backend)
        result["extract_backend"] = runner.backend
        log.info(
            "cycle=%d edge=%s event=extract backend=%s reason=%r",
            cycle.id,
            self.settings.name,
            runner.backend,
            runner.reason,
        )
        features, labels = extract_images(
            model,
            train,
            self.settings.batch_size,
            lower=runner,
            progress=lambda done, total: ctx.update(
                done / max(1, total), f"extracting features {done}/{total}"
            ),
        )

        ctx.begin("upload", f"uploading {len(labels)} feature rows")
        # rows, or per-class statistics of them, as the spec's privacy mode says
        body = pack_upload(features, labels, spec, self.settings.effective_edge_id)
        ack = self.client.upload_features(cycle.id, body)
        result["rows_uploaded"] = ack.rows
        result["upload_sha256"] = ack.sha256
        result["bytes_uploaded"] = len(body)
        log.info(
            "cycle=%d edge=%s event=uploaded rows=%d bytes=%d unchanged=%s",
            cycle.id,
            self.settings.name,
            ack.rows,
            len(body),
            ack.unchanged,
        )
        ctx.update(1.0, f"uploaded {ack.rows} rows ({len(body)} bytes) to cycle {cycle.id}")
        return cycle

    def _base_model(self, spec: FeatureSpec, result: dict[str, Any]) -> SplitModel:
        fetched = fetch_base_weights(
            self.client,
            self.registry,
            spec.base_model_version,
            spec.base_model_sha256,
            backbone=spec.backbone,
        )
        result["bytes_downloaded"] += fetched.downloaded
        result["downloads"].append(fetched.how)
        model = model_from_bytes(fetched.data)
        check_model_matches_spec(model, spec)
        if model.class_names != list(spec.class_names):
            raise InvalidInput(
                f"base model {spec.base_model_version} has classes {model.class_names}, "
                f"the cycle's spec says {list(spec.class_names)}"
            )
        return model

    # ------------------------------------------------------------------ wait

    def _wait(self, ctx: JobContext, cycle: Cycle) -> Cycle:
        """Poll the cycle until it is done, with backoff, bounded by its deadline + margin."""
        ctx.begin("wait", f"waiting for cycle {cycle.id}")
        s = self.settings
        interval = s.poll_interval_s
        deadline = cycle.deadline if cycle.deadline.tzinfo else cycle.deadline.replace(tzinfo=UTC)
        started = datetime.now(UTC)
        span = max(1.0, (deadline - started).total_seconds())
        while True:
            current = self.client.get_cycle(cycle.id)
            if current.state == CycleState.done:
                if current.result_model_version is None:
                    raise RemoteError(f"cycle {cycle.id} is done but names no model", 502)
                log.info(
                    "cycle=%d edge=%s event=done model=%d",
                    cycle.id,
                    s.name,
                    current.result_model_version,
                )
                ctx.update(1.0, f"cycle {cycle.id} done: model {current.result_model_version}")
                return current
            if current.state in (CycleState.failed, CycleState.cancelled):
                reason = current.reason or "no reason given"
                raise Conflict(f"cycle {cycle.id} {current.state.value} on the server: {reason}")
            now = datetime.now(UTC)
            over = (now - deadline).total_seconds()
            if over > s.wait_margin_s:
                raise Unavailable(
                    f"cycle {cycle.id} is still {current.state.value} {over:.0f}s after its "
                    f"deadline (margin {s.wait_margin_s:.0f}s): gave up waiting"
                )
            elapsed = (now - started).total_seconds()
            ctx.update(
                min(0.95, elapsed / span),
                f"waiting for cycle {cycle.id}: {current.state.value}, "
                f"{len(current.uploads)}/{current.min_edges} uploads",
            )
            ctx.sleep(interval)
            interval = min(interval * 1.5, s.poll_max_interval_s)

    # ------------------------------------------------------------------ stage 3

    def _stage3(self, ctx: JobContext, version: int | None, result: dict[str, Any]) -> None:
        s = self.settings
        splits = self.data.splits()
        ctx.begin("download", f"downloading model {version or 'latest'}")
        info = self.client.get_model(version if version is not None else "latest")
        # a cycle changes only the part above the cut: fetch the tensors that changed
        fetched = fetch_base_weights(
            self.client, self.registry, info.version, info.sha256, backbone=info.backbone
        )
        weights = fetched.data
        result["bytes_downloaded"] += fetched.downloaded
        result["downloads"].append(fetched.how)
        result["model_version"] = info.version
        result["n_train"], result["n_val"], result["n_test"] = (
            len(splits.train),
            len(splits.val),
            len(splits.test),
        )
        result["raw_train_bytes"] = splits.train.raw_bytes()
        model = model_from_bytes(weights)
        self.data.check_classes(model.class_names)
        if not len(splits.test):
            raise InvalidInput("the local test split is empty: the deploy gate needs test images")
        ctx.update(1.0, f"model {info.version} ready")

        ctx.begin("evaluate", f"evaluating server model {info.version}")
        start = finetune_start(model, s.finetune_train_from)
        # the frozen stages, run by the extraction backend
        frozen = frozen_runner(model, s.finetune_train_from, s.extract_backend)
        test_acts = frozen_activations(model, splits.test, start, s.batch_size, frozen)
        server_metrics = evaluate_activations(model, test_acts, s.batch_size)
        result["metrics"]["server_model"] = server_metrics.model_dump(mode="json")
        ctx.update(1.0, f"server model accuracy {server_metrics.accuracy:.4f}")

        ctx.begin("finetune", "fine-tuning")
        config = FinetuneConfig(
            epochs=s.finetune_epochs,
            batch_size=s.batch_size,
            lr=s.finetune_lr,
            train_from=s.finetune_train_from,
            augment=s.finetune_augment,
            views=s.finetune_views,
            seed=s.split_seed,
        )
        finetune(
            model,
            splits.train,
            splits.val if len(splits.val) else None,
            config,
            progress=lambda frac, msg: ctx.update(frac, f"fine-tuning: {msg}"),
            frozen=frozen,
        )

        ctx.begin("evaluate", "evaluating the candidate")
        outcome = self.gate_and_register(
            model,
            info.version,
            splits.test,
            progress=lambda frac, msg: ctx.update(frac, msg),
            test_acts=test_acts,
        )
        result["metrics"]["candidate"] = outcome.candidate.model_dump(mode="json")
        if outcome.previous is not None:
            result["metrics"]["previous"] = outcome.previous.model_dump(mode="json")
        result["previous_model_id"] = outcome.previous_model_id
        result["deployed"] = outcome.deployed
        result["decision"] = outcome.decision
        result["local_model_id"] = outcome.local_model.id
        ctx.update(1.0, outcome.decision)

    def gate_and_register(
        self,
        model: SplitModel,
        base_version: int,
        test: ImageSet,
        progress: Callable[[float, str], None] | None = None,
        test_acts: FrozenActivations | None = None,
    ) -> GateOutcome:
        """Evaluate a candidate and the deployed model on ``test``; record the candidate,
        and deploy it unless the gate says it is worse.

        ``test_acts`` (activations of ``test`` at some frozen stage) stand in for
        ``test`` for each model whose frozen weights made them."""
        s = self.settings

        def evaluate_on_test(m: SplitModel) -> EvalMetrics:
            if test_acts is not None and test_acts.fits(m):
                return evaluate_activations(m, test_acts, s.batch_size)
            return evaluate(m, test, s.batch_size)

        candidate = evaluate_on_test(model)
        deployed = self.registry.deployed()
        previous: EvalMetrics | None = None
        reason: str | None = None
        if deployed is not None:
            if progress is not None:
                progress(0.5, f"evaluating the deployed model {deployed.id}")
            current = self.registry.load(deployed)
            if current.class_names == model.class_names:
                previous = evaluate_on_test(current)
                self.registry.store.update_model(deployed.id, metrics=previous)
            else:  # nothing to compare with: the task itself changed
                reason = f"deployed: model {deployed.id} has other classes than the candidate"
        decision = deploy_gate(candidate, previous, s.deploy_min_delta)
        reason = reason or decision.reason
        local = self.registry.add_candidate(model, base_version, candidate, note=reason)
        if decision.deploy:
            self.registry.deploy(local.id, reason)
        else:
            self.registry.record_decision(f"{reason} (candidate recorded as model {local.id})")
        log.info(
            "edge=%s event=gate model=%d local_model=%d deployed=%s reason=%r",
            s.name,
            base_version,
            local.id,
            decision.deploy,
            reason,
        )
        return GateOutcome(
            candidate=candidate,
            previous=previous,
            previous_model_id=deployed.id if deployed else None,
            deployed=decision.deploy,
            decision=reason,
            local_model=self.registry.store.get_model(local.id),
        )


__all__ = [
    "LAST_CYCLE_KEY",
    "PLANS",
    "CycleService",
    "GateDecision",
    "GateOutcome",
    "deploy_gate",
]
