"""The model registry: versions, their metadata, weights and feature specs."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError as DBIntegrityError

from fl_core import serialization
from fl_core.backbones import build_backbone
from fl_core.errors import IntegrityError, InvalidInput, NotFound, Unavailable, shorten
from fl_core.features import make_spec
from fl_core.model import (
    HeadConfig,
    SplitModel,
    build_split_model,
    model_from_bytes,
    model_to_bytes,
)
from fl_core.schemas import (
    AggregatedUpdate,
    EvalMetrics,
    FeatureSpec,
    ModelInfo,
    ModelManifest,
    PrivacyConfig,
    RoundPlan,
    TrainedFrom,
)
from fl_core.training import finetune_start
from server_service.config import Settings
from server_service.db import ModelRow, Session, utcnow
from server_service.logs import log_event
from server_service.runtime import Runtime


def to_info(row: ModelRow) -> ModelInfo:
    return ModelInfo(
        version=row.version,
        parent=row.parent,
        backbone=row.backbone,
        cut=row.cut,
        input_size=row.input_size,
        class_names=json.loads(row.class_names_json),
        metrics=EvalMetrics.model_validate_json(row.metrics_json) if row.metrics_json else None,
        sha256=row.sha256,
        size=row.size,
        created_at=row.created_at,
        trained_from=(
            TrainedFrom.model_validate_json(row.trained_from_json)
            if row.trained_from_json
            else None
        ),
        privacy=(PrivacyConfig.model_validate_json(row.privacy_json) if row.privacy_json else None),
    )


def model_row(
    version: int,
    parent: int | None,
    model: SplitModel,
    sha256: str,
    size: int,
    metrics: EvalMetrics | None = None,
    trained_from: TrainedFrom | None = None,
    privacy: PrivacyConfig | None = None,
) -> ModelRow:
    return ModelRow(
        version=version,
        parent=parent,
        backbone=model.arch.backbone,
        cut=model.arch.cut,
        input_size=model.arch.input_size,
        class_names_json=json.dumps(model.class_names),
        metrics_json=metrics.model_dump_json() if metrics else None,
        sha256=sha256,
        size=size,
        created_at=utcnow(),
        trained_from_json=trained_from.model_dump_json() if trained_from else None,
        privacy_json=privacy.model_dump_json() if privacy else None,
    )


def ensure_base_model(rt: Runtime) -> None:
    """Create version 1 from the configured backbone unless a model exists already."""
    with rt.sessions() as session:
        if session.scalar(select(func.count()).select_from(ModelRow)):
            return
    s = rt.settings
    cut = s.cut
    if s.privacy.mode == "spatial" and cut == "pooled":
        cut = build_backbone(s.backbone, pretrained=False).info.spatial_cut
    model = build_split_model(
        s.class_names,
        backbone=s.backbone,
        cut=cut,
        input_size=s.input_size,
        head=HeadConfig(hidden=s.head_hidden),
        pretrained=s.pretrained,
    )
    data = model_to_bytes(model)
    sha = rt.blobs.put(data)
    with rt.sessions() as session:
        session.add(model_row(1, None, model, sha, len(data)))
        try:
            session.commit()
        except DBIntegrityError:
            # Another replica created it first: theirs is as good as ours.
            session.rollback()
            return
    log_event("model.registered", version=1, parent=None, sha256=sha, backbone=s.backbone)


def get_model(session: Session, version: int) -> ModelRow:
    row = session.get(ModelRow, version)
    if row is None:
        raise NotFound(f"model version {version} not found")
    return row


def latest_model(session: Session) -> ModelRow:
    row = session.scalar(select(ModelRow).order_by(ModelRow.version.desc()).limit(1))
    if row is None:
        raise NotFound("no model registered yet")
    return row


def list_models(session: Session) -> list[ModelInfo]:
    return [to_info(r) for r in session.scalars(select(ModelRow).order_by(ModelRow.version))]


def next_version(session: Session) -> int:
    return int(session.scalar(select(func.max(ModelRow.version))) or 0) + 1


#: attempts at taking the next version number when replicas register concurrently
VERSION_ATTEMPTS = 3


def register_version(
    rt: Runtime,
    claim: Callable[[Session, int], bool],
    make_row: Callable[[int], ModelRow],
) -> int | None:
    """Insert the next model version in the transaction of ``claim(session, version)``
    (the cycle's conditional move to what the version makes of it); the version, or
    None when ``claim`` finds the cycle moved on. Another replica taking the same number
    makes it try the next one."""
    for attempt in range(VERSION_ATTEMPTS):
        with rt.sessions() as session:
            version = next_version(session)
            if not claim(session, version):
                session.rollback()
                return None
            session.add(make_row(version))
            try:
                session.commit()
            except DBIntegrityError:
                session.rollback()  # another replica took this version number
                if attempt == VERSION_ATTEMPTS - 1:
                    raise
                continue
            return version
    return None


def _missing(row: ModelRow) -> NotFound:
    return NotFound(f"weights of model version {row.version} are missing from the blob store")


def weights_path(rt: Runtime, row: ModelRow) -> Path | None:
    """The weights' file in a local blob store; None when the store is remote."""
    try:
        return rt.blobs.local_path(row.sha256)
    except NotFound:
        raise _missing(row) from None


def verified_weights_path(rt: Runtime, row: ModelRow) -> Path | None:
    """The weights' local file, after checking its bytes still hash to the recorded sha256
    (a blob that rotted on disk is not served under its old ETag); None when the store is
    remote (:func:`weights_bytes` checks those bytes as it reads them)."""
    path = weights_path(rt, row)
    if path is not None and serialization.sha256_file(path) != row.sha256:
        raise _corrupt(row)
    return path


def _corrupt(row: ModelRow) -> Unavailable:
    log_event("model.weights_corrupt", logging.ERROR, version=row.version, sha256=row.sha256)
    return Unavailable(
        f"the stored weights of model version {row.version} are corrupt (their sha256 no "
        "longer matches); an operator must restore them"
    )


def weights_bytes(rt: Runtime, row: ModelRow) -> bytes:
    """A version's weights, their sha256 checked."""
    try:
        return rt.blobs.get(row.sha256)
    except NotFound:
        raise _missing(row) from None
    except IntegrityError:
        raise _corrupt(row) from None


#: per-tensor digests by the blob's sha256: a blob never changes, so neither do they
_DIGESTS: dict[str, dict[str, str]] = {}
_DIGESTS_MAX = 16
_digests_lock = threading.Lock()


def _digests(rt: Runtime, row: ModelRow) -> dict[str, str]:
    with _digests_lock:
        cached = _DIGESTS.get(row.sha256)
    if cached is not None:
        return cached
    digests = serialization.tensor_digests(weights_bytes(rt, row))
    with _digests_lock:
        if len(_DIGESTS) >= _DIGESTS_MAX:
            _DIGESTS.pop(next(iter(_DIGESTS)))
        _DIGESTS[row.sha256] = digests
    return digests


def _update_of(row: ModelRow) -> AggregatedUpdate | None:
    info = to_info(row)
    return info.trained_from.update if info.trained_from is not None else None


def manifest(rt: Runtime, row: ModelRow) -> ModelManifest:
    """Per-tensor digests of a version's weights (what an edge needs to fetch a delta)
    and, for a round's model, its averaged update."""
    digests = _digests(rt, row)
    return ModelManifest(
        version=row.version, sha256=row.sha256, tensors=dict(digests), update=_update_of(row)
    )


def update_bytes(rt: Runtime, row: ModelRow) -> bytes:
    """The averaged update that made a round's model from its parent, its sha256 checked."""
    update = _update_of(row)
    if update is None:
        raise NotFound(
            f"model version {row.version} is not a federated round's aggregate, so it has "
            "no averaged update: fetch the tensors its manifest lists instead"
        )
    try:
        return rt.blobs.get(update.sha256)
    except NotFound:
        raise NotFound(
            f"the averaged update of model version {row.version} is missing from the blob "
            "store: fetch the tensors its manifest lists instead"
        ) from None
    except IntegrityError:
        log_event("model.update_corrupt", logging.ERROR, version=row.version, sha256=update.sha256)
        raise Unavailable(
            f"the stored averaged update of model version {row.version} is corrupt (its "
            "sha256 no longer matches): fetch the tensors its manifest lists instead"
        ) from None


def weights_subset(rt: Runtime, row: ModelRow, names: list[str]) -> bytes:
    """The named tensors of a version's weights, with the full file's metadata."""
    data = weights_bytes(rt, row)
    try:
        return serialization.subset(data, list(dict.fromkeys(names)))
    except KeyError as exc:
        missing = shorten(str(exc.args[0]))
        raise InvalidInput(f"model version {row.version} has no tensor {missing!r}") from None


def load_model(rt: Runtime, row: ModelRow) -> SplitModel:
    return model_from_bytes(rt.blobs.get(row.sha256))


def _build_spec_and_plan(rt: Runtime, row: ModelRow) -> None:
    """Load ``row``'s model once and cache what cycles based on it need: the feature
    spec, and the round plan (left out when the settings name a stage it lacks; then
    :func:`plan_for` says so). Called under ``rt.spec_build``."""
    key = (row.version, row.sha256)
    model = load_model(rt, row)
    spec = make_spec(model, row.version, row.sha256, rt.settings.privacy)
    try:
        plan: RoundPlan | None = round_plan(rt.settings, model)
    except InvalidInput:
        plan = None
    with rt.lock:
        rt.specs[key] = spec
        if plan is not None:
            rt.plans[key] = plan


def spec_for(rt: Runtime, row: ModelRow) -> FeatureSpec:
    """The feature spec edges follow for cycles based on this model (cached)."""
    key = (row.version, row.sha256)
    with rt.lock:
        cached = rt.specs.get(key)
    if cached is not None:
        return cached
    with rt.spec_build:  # one build; whoever waited finds it cached
        with rt.lock:
            cached = rt.specs.get(key)
        if cached is None:
            _build_spec_and_plan(rt, row)
    with rt.lock:
        return rt.specs[key]


def round_plan(s: Settings, model: SplitModel) -> RoundPlan:
    """The ROUND_* settings as the round plan of a cycle on ``model``."""
    train_from = s.round_train_from or model.info.finetune_from
    finetune_start(model, train_from)  # InvalidInput for a stage the backbone lacks
    return RoundPlan(
        rounds=s.rounds,
        train_from=train_from,
        epochs=s.round_epochs,
        lr=s.round_lr,
        backbone_lr_scale=s.round_backbone_lr_scale,
        clip_norm=s.round_clip_norm,
        noise_multiplier=s.round_noise_multiplier,
        dtype=s.round_dtype,
        deadline_s=s.round_deadline_s,
    )


def plan_for(rt: Runtime, row: ModelRow) -> RoundPlan:
    """The round plan of a cycle opened now on model ``row`` (the ROUND_* settings;
    cached with its spec, so that a burst of joins loads the model once).

    ``round_train_from`` may name any stage of the backbone, or ``upper`` (the stages
    above the cut); another name is refused (:class:`InvalidInput`)."""
    key = (row.version, row.sha256)
    with rt.lock:
        cached = rt.plans.get(key)
    if cached is not None:
        return cached
    with rt.spec_build:
        with rt.lock:
            cached = rt.plans.get(key)
        if cached is not None:
            return cached
        _build_spec_and_plan(rt, row)
        with rt.lock:
            cached = rt.plans.get(key)
        if cached is not None:
            return cached
        # raises the InvalidInput that left it out
        return round_plan(rt.settings, load_model(rt, row))


__all__ = [
    "ensure_base_model",
    "get_model",
    "latest_model",
    "list_models",
    "load_model",
    "manifest",
    "model_row",
    "next_version",
    "plan_for",
    "register_version",
    "round_plan",
    "spec_for",
    "to_info",
    "update_bytes",
    "verified_weights_path",
    "weights_bytes",
    "weights_path",
    "weights_subset",
]
