"""The stages of a training cycle on the edge, and the deploy gate.

Stage 2 (``extract`` job): request a cycle, download the base model (sha256 checked,
cached in the blob store), extract features of the local training split with the
cycle's spec, upload them (in the spec's ``stats`` privacy mode: per-class statistics
of the features instead of rows). Nothing but features and labels, or their
statistics, leaves the edge. Labels are the server's class indices: the local classes
are matched to the spec's by name (:func:`fl_core.data.align_classes`), and may be a
subset of them.

Stage 3 (``finetune`` job): download the server's new base model, keep a copy of it as
received, fine-tune it on the local training split (validation split for early
stopping), then the deploy gate (:meth:`CycleService.gate_and_register`, its rule in
:mod:`edge_service.services.gate`) chooses what serves among the fine-tuned candidate,
the server's model as received and the deployed model (when it has the same classes):
the most accurate on the *validation* split (in-sample on the training split when that
is empty), ties to the higher balanced accuracy, then to the deployed model, then to the
fine-tuned one, with ``deploy_min_delta`` in favour of a new model; and never a model
below always answering the training split's majority class: then nothing new is
deployed. The test split is never used to choose: each model's test metrics are
reported only. The fine-tuned candidate is always recorded (an operator can roll
forward to it), the server model when it wins. The stages below the first fine-tuned
one are frozen: the extraction backend runs them once per image of the validation and
test splits, and every model whose frozen weights are the same (always, unless the
backbone's weights changed between cycles) is scored from those activations.

The ``cycle`` job runs stage 2, waits for the server to finish the cycle, then stage 3.
Every job returns a :class:`~fl_core.schemas.CycleJobResult` (defaults where a stage did
not run).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
import torch

from edge_service.config import Settings
from edge_service.services.client import ServerClient
from edge_service.services.dataset import LocalData
from edge_service.services.gate import (
    MajorityBaseline,
    ModelName,
    choose_model,
    majority_baseline,
)
from edge_service.services.jobs import JobContext, Plan
from edge_service.services.registry import ModelRegistry
from edge_service.services.weights import fetch_base_weights
from fedinspect.service import log_event, utcnow
from fl_core.data import ImageSet, Splits
from fl_core.errors import Conflict, FedInspectError, InvalidInput, RemoteError, Unavailable
from fl_core.features import check_model_matches_spec, extract_images
from fl_core.model import SplitModel, model_from_bytes
from fl_core.onnx_runtime import lower_runner
from fl_core.privacy import pack_upload
from fl_core.rounds import make_update, pack_update, snapshot, update_names
from fl_core.schemas import (
    Cycle,
    CycleJobMetrics,
    CycleJobResult,
    CycleState,
    EdgeEvaluationReport,
    EvalMetrics,
    FeatureSpec,
    FinetuneSummary,
    LocalModel,
    MajorityFloor,
    RoundResult,
)
from fl_core.training import (
    FinetuneConfig,
    FrozenActivations,
    evaluate,
    evaluate_activations,
    finetune,
    finetune_activations,
    finetune_start,
    frozen_activations,
    frozen_runner,
    train_activations,
)

log = logging.getLogger("edge_service.cycle")

LAST_CYCLE_KEY = "last_cycle_id"

PLANS: dict[str, Plan] = {
    "cycle": [
        ("request", 0.02),
        ("download", 0.04),
        ("extract", 0.22),
        ("upload", 0.06),
        ("wait", 0.12),
        ("round", 0.08),
        ("download", 0.04),
        ("evaluate", 0.04),
        ("finetune", 0.33),
        ("evaluate", 0.05),
    ],
    "extract": [("request", 0.05), ("download", 0.1), ("extract", 0.7), ("upload", 0.15)],
    "finetune": [("download", 0.08), ("evaluate", 0.07), ("finetune", 0.75), ("evaluate", 0.1)],
}


def waiting_message(cycle: Cycle, now: datetime) -> str:
    """What a job waiting for ``cycle`` waits for, until when, and what cuts it short."""
    deadline = _deadline_of(cycle)
    at = deadline.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    head = f"waiting for cycle {cycle.id} ({cycle.state.value})"
    if cycle.state == CycleState.training:
        return f"{head}: the server is training on {len(cycle.uploads)} uploads"
    if cycle.state == CycleState.rounds:
        n = cycle.plan.rounds if cycle.plan else "?"
        left = (_deadline_of(cycle) - now).total_seconds()
        return (
            f"{head}: round {cycle.round}/{n} has {len(cycle.round_updates)}/"
            f"{len(cycle.uploads)} updates; it is aggregated when every edge has sent its "
            f"update, or at its deadline {at} (in {_duration(max(0.0, left))}) if "
            f"{cycle.min_edges} have (MIN_EDGES); otherwise the cycle ends with the last "
            "round's model"
        )
    uploads = f"{len(cycle.uploads)}/{cycle.min_edges} uploads"
    left = (deadline - now).total_seconds()
    if left > 0:
        when = f"until its deadline {at} (in {_duration(left)})"
    else:
        when = f"its deadline {at} passed {_duration(-left)} ago"
    return (
        f"{head}: {uploads}, the server trains when {cycle.min_edges} edges have uploaded "
        f"or at the deadline; waiting {when}; an operator can train now with "
        f"POST /v1/cycles/{cycle.id}/train on the server"
    )


def _deadline_of(cycle: Cycle) -> datetime:
    """The deadline a job waiting on ``cycle`` goes by: its running round's, else its own."""
    deadline = cycle.deadline
    if cycle.state == CycleState.rounds and cycle.round_deadline is not None:
        deadline = cycle.round_deadline
    return deadline if deadline.tzinfo else deadline.replace(tzinfo=UTC)


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    minutes, secs = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m"


# --------------------------------------------------------------------------- the gate


@dataclass(frozen=True)
class GateOutcome:
    """What the gate did at the end of stage 3. Metrics named for a model (``candidate``,
    ``server_model``, ``previous``, ``deployed``) are on the test split, for reporting
    only; ``validation`` holds those the choice was made on."""

    candidate: EvalMetrics
    server_model: EvalMetrics | None
    previous: EvalMetrics | None
    #: the model that serves after the gate; None when none does, or when it could not
    #: be scored (a deployed model with other classes)
    deployed_metrics: EvalMetrics | None
    validation: dict[ModelName, EvalMetrics]
    majority: MajorityBaseline
    majority_test_accuracy: float
    in_sample: bool
    chosen: ModelName | None
    previous_model_id: int | None
    #: a new model went into service
    deployed: bool
    decision: str
    #: the fine-tuned candidate's record (kept whether or not it serves)
    local_model: LocalModel
    #: the model that serves after the gate, if any
    serving_model: LocalModel | None

    def record(self, result: CycleJobResult) -> None:
        """Write the gate's part of the job result into ``result``."""
        result.metrics = CycleJobMetrics(
            server_model=self.server_model,
            candidate=self.candidate,
            previous=self.previous,
            deployed=self.deployed_metrics,
            validation=dict(self.validation),
        )
        result.majority = MajorityFloor(
            class_name=self.majority.class_name,
            validation_accuracy=self.majority.accuracy,
            test_accuracy=self.majority_test_accuracy,
            n_scored=self.majority.n,
            scored_on="train" if self.in_sample else "validation",
        )
        result.chosen = self.chosen
        result.deployed = self.deployed
        result.decision = self.decision
        result.local_model_id = self.local_model.id
        result.previous_model_id = self.previous_model_id
        result.deployed_model_id = self.serving_model.id if self.serving_model else None


# --------------------------------------------------------------------------- the stages


def finetune_config(s: Settings) -> FinetuneConfig:
    """Stage 3's recipe, from the edge's FINETUNE_* settings."""
    return FinetuneConfig(
        epochs=s.finetune_epochs,
        batch_size=s.batch_size,
        lr=s.finetune_lr,
        backbone_lr_scale=s.finetune_backbone_lr_scale,
        train_from=s.finetune_train_from,
        augment=s.finetune_augment,
        views=s.finetune_views,
        select=s.finetune_select,
        seed=s.split_seed,
    )


@dataclass
class _RoundState:
    """What a cycle job keeps between its federated rounds, and hands to stage 3: the
    activations below the first trained stage of the training views (``views`` per
    image) and of the test split."""

    train: FrozenActivations | None = None
    views: int = 0
    test: FrozenActivations | None = None
    #: the model this edge trained in the last round, kept when AFTER_ROUNDS is
    #: 'last_round': stage 3 offers it to the gate instead of fine-tuning again
    last_local: SplitModel | None = None
    last_epochs: int = 0


def _reusable(
    acts: FrozenActivations | None, model: SplitModel, start: int
) -> FrozenActivations | None:
    """``acts`` if ``model``'s frozen stages made them at stage ``start``, else None."""
    return acts if acts is not None and acts.start == start and acts.fits(model) else None


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

    def run_cycle(self, ctx: JobContext) -> CycleJobResult:
        result = CycleJobResult()
        cycle = self._stage2(ctx, result)
        current = self._wait(ctx, cycle)
        rounds = _RoundState()
        while current.state == CycleState.rounds:
            self._round(ctx, current, result, rounds)
            current = self._wait(ctx, current)
        assert current.result_model_version is not None
        self._stage3(ctx, current.result_model_version, result, rounds)
        return result

    def run_extract(self, ctx: JobContext) -> CycleJobResult:
        result = CycleJobResult()
        self._stage2(ctx, result)
        return result

    def run_finetune(self, ctx: JobContext, model_version: int | None) -> CycleJobResult:
        result = CycleJobResult()
        self._stage3(ctx, model_version, result)
        return result

    # ------------------------------------------------------------------ stage 2

    def _stage2(self, ctx: JobContext, result: CycleJobResult) -> Cycle:
        ctx.begin("request", "requesting a training cycle")
        splits = self.data.splits()
        cycle = self.client.create_cycle()
        spec = cycle.spec
        result.cycle_id = cycle.id
        result.base_model_version = spec.base_model_version
        self.registry.store.set_state(LAST_CYCLE_KEY, cycle.id)
        splits = self.data.aligned(spec.class_names)
        log_event(
            log,
            "cycle.joined",
            cycle_id=cycle.id,
            edge=self.settings.name,
            state=cycle.state.value,
            base_model=spec.base_model_version,
        )
        ctx.update(1.0, f"joined cycle {cycle.id}")

        ctx.begin("download", f"downloading base model {spec.base_model_version}")
        model = self._base_model(spec, result)
        ctx.update(1.0, f"base model {spec.base_model_version} ready")

        train = splits.train
        result.n_train, result.n_val, result.n_test = (
            len(train),
            len(splits.val),
            len(splits.test),
        )
        result.raw_train_bytes = train.raw_bytes()
        ctx.begin("extract", f"extracting features 0/{len(train)}")
        runner = lower_runner(model, self.settings.extract_backend)
        result.extract_backend = runner.backend
        log_event(
            log,
            "features.extract",
            cycle_id=cycle.id,
            edge=self.settings.name,
            backend=runner.backend,
            reason=runner.reason,
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
        result.rows_uploaded = ack.rows
        result.upload_sha256 = ack.sha256
        result.bytes_uploaded = len(body)
        log_event(
            log,
            "features.uploaded",
            cycle_id=cycle.id,
            edge=self.settings.name,
            rows=ack.rows,
            bytes=len(body),
            unchanged=ack.unchanged,
        )
        ctx.update(1.0, f"uploaded {ack.rows} rows ({len(body)} bytes) to cycle {cycle.id}")
        return cycle

    def _base_model(self, spec: FeatureSpec, result: CycleJobResult) -> SplitModel:
        fetched = fetch_base_weights(
            self.client,
            self.registry,
            spec.base_model_version,
            spec.base_model_sha256,
            backbone=spec.backbone,
        )
        result.bytes_downloaded += fetched.downloaded
        result.downloads.append(fetched.how)
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
        """Poll the cycle until it is done, or at a federated round this edge has not sent
        its update for, with backoff, bounded by its (round's) deadline + margin."""
        ctx.begin("wait", f"waiting for cycle {cycle.id}")
        s = self.settings
        me = s.effective_edge_id
        interval = s.poll_interval_s
        started = utcnow()
        span = max(1.0, (_deadline_of(cycle) - started).total_seconds())
        while True:
            current = self.client.get_cycle(cycle.id)
            if current.state == CycleState.rounds and me not in {
                u.edge_id for u in current.round_updates
            }:
                return current
            if current.state == CycleState.done:
                if current.result_model_version is None:
                    raise RemoteError(f"cycle {cycle.id} is done but names no model", 502)
                log_event(
                    log,
                    "cycle.done",
                    cycle_id=cycle.id,
                    edge=s.name,
                    model=current.result_model_version,
                )
                ctx.update(1.0, f"cycle {cycle.id} done: model {current.result_model_version}")
                return current
            if current.state in (CycleState.failed, CycleState.cancelled):
                reason = current.reason or "no reason given"
                raise Conflict(f"cycle {cycle.id} {current.state.value} on the server: {reason}")
            now = utcnow()
            deadline = _deadline_of(current)
            over = (now - deadline).total_seconds()
            if over > s.wait_margin_s:
                raise Unavailable(
                    f"cycle {cycle.id} is still {current.state.value} {over:.0f}s after its "
                    f"deadline (margin {s.wait_margin_s:.0f}s): gave up waiting"
                )
            elapsed = (now - started).total_seconds()
            ctx.update(min(0.95, elapsed / span), waiting_message(current, now))
            ctx.sleep(interval)
            interval = min(interval * 1.5, s.poll_max_interval_s)

    # ------------------------------------------------------------------ rounds

    def _round(
        self, ctx: JobContext, cycle: Cycle, result: CycleJobResult, state: _RoundState
    ) -> None:
        """One federated round: train the round's model on the local training split from
        the plan's first stage up, and send the clipped update of those parameters."""
        s = self.settings
        plan = cycle.plan
        version = cycle.round_model_version
        if plan is None or version is None:
            raise RemoteError(f"cycle {cycle.id} is in rounds but names no plan or model", 502)
        r = cycle.round
        started = time.perf_counter()
        ctx.begin("round", f"round {r}/{plan.rounds}: downloading model {version}")

        def report(fraction: float, message: str) -> None:
            """Progress within this round, as a share of all the cycle's rounds."""
            ctx.update((r - 1 + fraction) / plan.rounds, message)

        info = self.client.get_model(version)
        fetched = fetch_base_weights(
            self.client, self.registry, info.version, info.sha256, backbone=info.backbone
        )
        result.bytes_downloaded += fetched.downloaded
        result.downloads.append(fetched.how)
        model = model_from_bytes(fetched.data)
        splits = self.data.aligned(model.class_names)
        config = dataclasses.replace(
            finetune_config(s),
            train_from=plan.train_from,
            epochs=plan.epochs,
            lr=plan.lr,
            backbone_lr_scale=plan.backbone_lr_scale,
            seed=s.split_seed + r,
        )
        start = finetune_start(model, plan.train_from)
        if state.train is None or state.train.start != start:
            # the stages below `start` are the same in every round of a cycle: their
            # activations of the training views (and of the test split) are made once
            frozen = frozen_runner(model, plan.train_from, s.extract_backend)
            _, x, y = train_activations(
                model,
                splits.train,
                config,
                frozen=frozen,
                progress=lambda frac, msg: report(0.8 * frac, f"round {r}: {msg}"),
            )
            state.train = FrozenActivations(x, y, start, model.stages_digest(start))
            state.views = config.cached_views
            state.test = (
                frozen_activations(model, splits.test, start, s.batch_size, frozen)
                if len(splits.test)
                else None
            )
        test = (
            evaluate_activations(model, state.test, s.batch_size)
            if state.test is not None
            else None
        )
        names = update_names(model, plan.train_from)
        before = snapshot(model, names)
        report(0.8, f"round {r}/{plan.rounds}: training from {plan.train_from}")
        finetune_activations(
            model,
            start,
            state.train.x,
            state.train.labels,
            config=config,
            progress=lambda frac, msg: report(0.8 + 0.15 * frac, f"round {r}: {msg}"),
        )
        delta, norm = make_update(model, before, plan)
        if r == plan.rounds and s.after_rounds == "last_round":
            state.last_local, state.last_epochs = model, plan.epochs
        body = pack_update(
            delta,
            plan,
            spec_hash=cycle.spec_hash,
            edge_id=s.effective_edge_id,
            round_number=r,
            base_version=version,
            samples=len(splits.train),
        )
        ack = self.client.upload_round_update(cycle.id, r, body)
        result.bytes_uploaded += len(body)
        seconds = time.perf_counter() - started
        result.rounds.append(
            RoundResult(
                round=r,
                model_version=version,
                samples=len(splits.train),
                norm=norm,
                clipped=norm > plan.clip_norm,
                bytes_uploaded=len(body),
                bytes_downloaded=fetched.downloaded,
                seconds=seconds,
                test=test,
            )
        )
        log_event(
            log,
            "round.update_sent",
            cycle_id=cycle.id,
            edge=s.name,
            round=r,
            model=version,
            norm=round(norm, 4),
            bytes=len(body),
            unchanged=ack.unchanged,
        )
        report(1.0, f"round {r}/{plan.rounds}: update sent ({len(body)} bytes)")

    # ------------------------------------------------------------------ stage 3

    def _stage3(
        self,
        ctx: JobContext,
        version: int | None,
        result: CycleJobResult,
        rounds: _RoundState | None = None,
    ) -> None:
        """Download the model, fine-tune it, gate and deploy. ``rounds``: the activations
        the cycle's rounds cached, used where this model's frozen stages made them."""
        s = self.settings
        splits = self.data.splits()
        ctx.begin("download", f"downloading model {version or 'latest'}")
        info = self.client.get_model(version if version is not None else "latest")
        # a cycle changes only the part above the cut: fetch the tensors that changed
        fetched = fetch_base_weights(
            self.client, self.registry, info.version, info.sha256, backbone=info.backbone
        )
        weights = fetched.data
        result.bytes_downloaded += fetched.downloaded
        result.downloads.append(fetched.how)
        result.model_version = info.version
        result.n_train, result.n_val, result.n_test = (
            len(splits.train),
            len(splits.val),
            len(splits.test),
        )
        result.raw_train_bytes = splits.train.raw_bytes()
        model = model_from_bytes(weights)
        splits = self.data.aligned(model.class_names)
        if not len(splits.test):
            raise InvalidInput(
                "the local test split is empty: stage 3 reports the models' test metrics"
            )
        ctx.update(1.0, f"model {info.version} ready")

        ctx.begin("evaluate", f"evaluating server model {info.version}")
        start = finetune_start(model, s.finetune_train_from)
        # the frozen stages, run by the extraction backend, once per image: every model
        # with the same frozen weights is scored from these activations
        frozen = frozen_runner(model, s.finetune_train_from, s.extract_backend)
        config = finetune_config(s)
        rounds = rounds or _RoundState()
        train_acts = (
            _reusable(rounds.train, model, start) if rounds.views == config.cached_views else None
        )
        test_acts = _reusable(rounds.test, model, start) or frozen_activations(
            model, splits.test, start, s.batch_size, frozen
        )
        scored = splits.val if len(splits.val) else splits.train
        scored_acts = frozen_activations(model, scored, start, s.batch_size, frozen)
        server_metrics = evaluate_activations(model, test_acts, s.batch_size)
        result.metrics.server_model = server_metrics
        # fine-tuning changes the model in place; the gate weighs the server's as received,
        # answering for this edge's class frequencies rather than the pooled ones (its
        # head was trained with classes weighed equally: see SplitModel.set_class_prior)
        server_model = copy.deepcopy(model)
        n_classes = len(model.class_names)
        server_model.set_class_prior(
            torch.from_numpy(np.bincount(splits.train.labels, minlength=n_classes))
        )
        ctx.update(1.0, f"server model test accuracy {server_metrics.accuracy:.4f}")

        ctx.begin("finetune", "fine-tuning")
        if rounds.last_local is not None:
            # AFTER_ROUNDS=last_round: the model trained here in the last round stands
            # as the fine-tuned candidate
            model, rounds.last_local = rounds.last_local, None
            result.finetune = FinetuneSummary(
                epochs_run=rounds.last_epochs, best_epoch=rounds.last_epochs
            )
            ctx.update(1.0, "the model trained in the last round is the candidate")
        else:
            report = finetune(
                model,
                splits.train,
                splits.val if len(splits.val) else None,
                config,
                progress=lambda frac, msg: ctx.update(frac, f"fine-tuning: {msg}"),
                frozen=frozen,
                cached=None if train_acts is None else (train_acts.x, train_acts.labels),
            )
            result.finetune = FinetuneSummary(
                epochs_run=report.epochs_run, best_epoch=report.best_epoch
            )
        del train_acts
        rounds.train = None  # the training views' activations: no longer needed

        ctx.begin("evaluate", "choosing the model to deploy")
        outcome = self.gate_and_register(
            model,
            info.version,
            splits,
            server_model=server_model,
            progress=lambda frac, msg: ctx.update(frac, msg),
            scored_acts=scored_acts,
            test_acts=test_acts,
        )
        outcome.record(result)
        self._report(info.version, outcome, len(splits.test))
        ctx.update(1.0, outcome.decision)

    def _report(self, version: int, outcome: GateOutcome, n_test: int) -> None:
        """Send the server the gate's test metrics (never images): the fleet's accuracy
        view. A refused or failed report is logged; the deployed model is not undone."""
        report = EdgeEvaluationReport(
            chosen=outcome.chosen,
            deployed=outcome.deployed,
            decision=outcome.decision[:1000],
            n_test=n_test,
            metrics={
                "candidate": outcome.candidate,
                "server_model": outcome.server_model,
                "previous": outcome.previous,
                "deployed": outcome.deployed_metrics,
            },
        )
        try:
            self.client.report_evaluation(version, report)
        except FedInspectError as exc:
            log_event(
                log,
                "evaluation.report_failed",
                logging.WARNING,
                edge=self.settings.name,
                model=version,
                error=exc.detail,
            )
        else:
            log_event(log, "evaluation.reported", edge=self.settings.name, model=version)

    def gate_and_register(
        self,
        candidate: SplitModel,
        base_version: int,
        splits: Splits,
        server_model: SplitModel | None = None,
        progress: Callable[[float, str], None] | None = None,
        scored_acts: FrozenActivations | None = None,
        test_acts: FrozenActivations | None = None,
    ) -> GateOutcome:
        """Choose what serves among the fine-tuned ``candidate``, the ``server_model`` as
        received and the deployed model (when it has the same classes), by their metrics
        on the validation split (the training split, in-sample, when it is empty), with
        :func:`~edge_service.services.gate.choose_model`; record the candidate, and the
        server model when it wins; deploy the winner unless the deployed model stays.

        Test-split metrics of each model are computed for reporting only. ``scored_acts``
        and ``test_acts`` (activations of the scored and test splits at some frozen stage)
        stand in for the images for each model whose frozen weights made them."""
        s = self.settings
        in_sample = not len(splits.val)
        scored_set = splits.train if in_sample else splits.val
        if not len(scored_set):
            raise InvalidInput("the deploy gate needs validation or training images")

        def score(m: SplitModel, images: ImageSet, acts: FrozenActivations | None) -> EvalMetrics:
            if acts is not None and acts.fits(m):
                return evaluate_activations(m, acts, s.batch_size)
            return evaluate(m, images, s.batch_size)

        models: dict[ModelName, SplitModel] = {"candidate": candidate}
        if server_model is not None:
            models["server_model"] = server_model
        deployed = self.registry.deployed()
        unscored = ""
        if deployed is not None:
            if progress is not None:
                progress(0.3, f"loading the deployed model {deployed.id}")
            current = self.registry.load(deployed)
            if current.class_names == candidate.class_names:
                models["previous"] = current
            else:  # nothing to compare with: the task itself changed
                unscored = f"; model {deployed.id} was not scored: it has other classes"

        validation = {n: score(m, scored_set, scored_acts) for n, m in models.items()}
        if progress is not None:
            progress(0.6, "evaluating on the test split (reporting only)")
        test = {n: score(m, splits.test, test_acts) for n, m in models.items()}
        majority = majority_baseline(splits.train.labels, scored_set.labels, candidate.class_names)
        majority_test = float(np.mean(splits.test.labels == majority.class_index))
        choice = choose_model(
            validation,
            majority,
            s.deploy_min_delta,
            in_sample=in_sample,
            deployed_id=deployed.id if deployed else None,
        )
        reason = choice.reason + unscored

        note = reason if choice.chosen == "candidate" else f"not chosen: {reason}"
        local = self.registry.add_candidate(candidate, base_version, test["candidate"], note=note)
        gate = {
            "chosen": choice.chosen,
            "scored_on": "train" if in_sample else "validation",
            "n_scored": majority.n,
            "validation_accuracy": {n: m.accuracy for n, m in validation.items()},
            "majority_class": majority.class_name,
            "majority_accuracy": majority.accuracy,
            "candidate_model_id": local.id,
        }
        if "previous" in test and deployed is not None:
            self.registry.store.update_model(deployed.id, metrics=test["previous"])
        if choice.chosen == "candidate":
            decision = reason
            self.registry.deploy(local.id, decision, gate)
        elif choice.chosen == "server_model":
            assert server_model is not None
            base = self.registry.add_candidate(
                server_model, base_version, test["server_model"], note=reason, source="base"
            )
            decision = (
                f"{reason} (server model {base_version} recorded as model {base.id}, "
                f"the fine-tuned one as model {local.id})"
            )
            self.registry.deploy(base.id, decision, gate)
        else:
            decision = f"{reason} (the fine-tuned model recorded as model {local.id})"
            self.registry.record_decision(decision, gate)
        log_event(
            log,
            "gate",
            edge=s.name,
            model=base_version,
            local_model=local.id,
            chosen=choice.chosen,
            deployed=choice.deploy,
            reason=reason,
        )
        return GateOutcome(
            candidate=test["candidate"],
            server_model=test.get("server_model"),
            previous=test.get("previous"),
            deployed_metrics=test[choice.chosen] if choice.chosen is not None else None,
            validation=validation,
            majority=majority,
            majority_test_accuracy=majority_test,
            in_sample=in_sample,
            chosen=choice.chosen,
            previous_model_id=deployed.id if deployed else None,
            deployed=choice.deploy,
            decision=decision,
            local_model=self.registry.store.get_model(local.id),
            serving_model=self.registry.deployed(),
        )


__all__ = [
    "LAST_CYCLE_KEY",
    "PLANS",
    "CycleService",
    "GateOutcome",
    "waiting_message",
]
