"""Pydantic wire models shared by the server and the edges (v1).

Every JSON body that crosses the wire is one of these. Tensors never travel as JSON:
they travel as safetensors bodies (see ``fl_core.serialization``).
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from fl_core.errors import InvalidInput

FeatureDType = Literal["float32", "float16", "int8"]
PrivacyMode = Literal["pooled", "spatial", "stats"]
"""What leaves an edge: ``pooled`` one pooled vector per image (the cut is ``pooled``),
``spatial`` one map per image from an intermediate block (the cut names it), ``stats``
per-class statistics of the pooled vectors (count, mean, variance) and no rows at all."""


class ErrorResponse(BaseModel):
    """The body of every 4xx/5xx answer."""

    detail: str


# --------------------------------------------------------------------------- features


class PrivacyConfig(BaseModel):
    """What the edge sends and what it does to features before they leave it.

    Clipping and noise apply to each feature row, in every mode (in ``stats`` mode to
    the rows the statistics are computed from). ``dtype`` is the wire dtype of rows;
    statistics always travel as float32.
    """

    model_config = ConfigDict(frozen=True)

    mode: PrivacyMode = Field(
        default="pooled",
        description="pooled: a pooled vector per image; spatial: an intermediate block's "
        "map per image (the cut names the block); stats: per-class count, mean and "
        "variance of the pooled vectors instead of rows",
    )
    dtype: FeatureDType = "float32"
    clip_norm: float | None = Field(
        default=None, gt=0, description="L2 bound each feature row is clipped to"
    )
    noise_sigma: float = Field(
        default=0.0, ge=0, description="std of Gaussian noise added after clipping"
    )
    stats_min_count: int = Field(
        default=10,
        ge=1,
        description="stats mode: a class with fewer rows than this at an edge is sent "
        "as count 0 (a mean of very few rows describes those few images)",
    )
    stats_rank: int = Field(
        default=32,
        ge=0,
        le=256,
        description="stats mode: how many principal directions of its rows (about their "
        "class means) an edge sends, at most one for every 32 rows; 0 sends the diagonal "
        "variance alone",
    )

    def for_cut(self, cut: str) -> PrivacyConfig:
        """This config, checked against a cut point (mode inferred when not given).

        A config that does not name its mode takes ``pooled`` at the ``pooled`` cut and
        ``spatial`` at any other, as before modes existed. A mode that contradicts the
        cut is an error rather than a silent change of what leaves the edge.
        """
        if "mode" not in self.model_fields_set:
            return self.model_copy(update={"mode": "pooled" if cut == "pooled" else "spatial"})
        if self.mode == "spatial" and cut == "pooled":
            raise InvalidInput(
                "privacy mode 'spatial' sends an intermediate block's map: "
                "the cut must name a block, not 'pooled'"
            )
        if self.mode in ("pooled", "stats") and cut != "pooled":
            raise InvalidInput(
                f"privacy mode {self.mode!r} works on the pooled vector: the cut must be "
                f"'pooled', not {cut!r} (mode 'spatial' sends a block's map)"
            )
        if self.mode == "stats" and self.dtype != "float32":
            raise InvalidInput(
                "privacy mode 'stats' sends float32 statistics: dtype must be float32"
            )
        return self


class FeatureSpec(BaseModel):
    """Everything an edge needs to produce features the server will accept.

    Both sides compare ``spec_hash()``; an upload made with another spec is refused.
    """

    model_config = ConfigDict(frozen=True)

    backbone: str
    cut: str
    input_size: int
    feature_shape: list[int] = Field(description="shape of one row, without the batch axis")
    privacy: PrivacyConfig = PrivacyConfig()
    class_names: list[str]
    base_model_version: int
    base_model_sha256: str

    def spec_hash(self) -> str:
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


# --------------------------------------------------------------------------- metrics


class ClassMetrics(BaseModel):
    name: str
    precision: float
    recall: float
    f1: float
    support: int


class EvalMetrics(BaseModel):
    """Classification metrics on one labelled set."""

    n: int
    accuracy: float
    balanced_accuracy: float
    macro_f1: float
    per_class: list[ClassMetrics]
    confusion_matrix: list[list[int]] = Field(description="rows: true class, columns: predicted")
    roc_auc: float | None = Field(default=None, description="two-class tasks only")


# --------------------------------------------------------------------------- server


class EdgeCreate(BaseModel):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")


class EdgeCreated(BaseModel):
    edge_id: str
    name: str
    token: str = Field(description="shown once; the server keeps only its hash")


class EdgeInfo(BaseModel):
    edge_id: str
    name: str
    created_at: datetime
    revoked: bool = False


class CycleState(StrEnum):
    collecting = "collecting"
    training = "training"
    #: the head is trained; federated fine-tuning rounds run (``Cycle.round``)
    rounds = "rounds"
    done = "done"
    failed = "failed"
    cancelled = "cancelled"


class UploadInfo(BaseModel):
    edge_id: str
    rows: int
    sha256: str
    size: int
    received_at: datetime


class UploadAck(BaseModel):
    cycle_id: int
    edge_id: str
    rows: int
    sha256: str
    unchanged: bool = Field(description="true when the same bytes were already stored")
    replaced: bool = Field(description="true when an earlier, different upload was replaced")


class RoundPlan(BaseModel):
    """How a cycle's federated fine-tuning rounds run (the server's ROUND_* settings
    when the cycle opened)."""

    model_config = ConfigDict(frozen=True)

    rounds: int = Field(ge=0, le=50, description="rounds after the head; 0: a one-shot cycle")
    train_from: str = Field(
        description="first stage an edge trains in a round (with every stage above it "
        "and the head); its update carries exactly those parameters"
    )
    epochs: int = Field(ge=1, le=20, description="local epochs over the edge's views per round")
    lr: float = Field(
        default=1e-3, gt=0, description="peak learning rate of the head in a round's training"
    )
    backbone_lr_scale: float = Field(
        default=0.1,
        gt=0,
        le=1,
        description="learning rate of the trained backbone stages, relative to lr (the head's)",
    )
    clip_norm: float = Field(
        gt=0, description="L2 bound of one edge's update; the server refuses a longer one"
    )
    noise_multiplier: float = Field(
        ge=0,
        description="Gaussian noise added by the server to the averaged update: standard "
        "deviation noise_multiplier x clip_norm x the largest edge weight (0: none)",
    )
    dtype: Literal["float16", "float32", "int8"] = Field(
        description="dtype of an update on the wire (int8: per-row scaled, stochastically "
        "rounded codes)"
    )
    deadline_s: float = Field(gt=0, description="seconds each round waits for the quorum")


class RoundUpdateInfo(BaseModel):
    edge_id: str
    round: int
    samples: int = Field(description="training images the edge trained on (its weight)")
    norm: float = Field(description="L2 norm of the update as received")
    sha256: str
    size: int
    received_at: datetime


class RoundUpdateAck(BaseModel):
    cycle_id: int
    round: int
    edge_id: str
    samples: int
    norm: float
    sha256: str
    unchanged: bool = Field(description="true when the same bytes were already stored")
    replaced: bool = Field(description="true when an earlier, different update was replaced")


class Cycle(BaseModel):
    id: int
    state: CycleState
    base_model_version: int
    spec: FeatureSpec
    spec_hash: str
    min_edges: int
    deadline: datetime
    created_at: datetime
    updated_at: datetime
    joined_edges: list[str] = []
    uploads: list[UploadInfo] = []
    result_model_version: int | None = None
    metrics: EvalMetrics | None = None
    reason: str | None = Field(
        default=None, description="why it failed or was cancelled, or why its rounds stopped"
    )
    plan: RoundPlan | None = Field(
        default=None, description="its federated fine-tuning rounds (None: none, as R = 0)"
    )
    round: int = Field(
        default=0,
        description="the round running (1..plan.rounds) in state rounds; after it, the "
        "rounds completed",
    )
    round_model_version: int | None = Field(
        default=None, description="the model the current round trains from"
    )
    round_deadline: datetime | None = None
    round_updates: list[RoundUpdateInfo] = Field(
        default=[], description="the updates received for the current round"
    )
    round_versions: list[int] = Field(
        default=[],
        description="model versions of the cycle in order: the head's, then each round's",
    )


class AggregatedUpdate(BaseModel):
    """The averaged update a federated round added to its model: the parent's weights plus
    these tensors (``GET /v1/models/{version}/update``) are the version's weights, to the
    bit, so an edge holding the parent downloads only this."""

    parent: int = Field(description="the version the update was added to")
    parent_sha256: str = Field(description="sha256 of the parent's weights")
    sha256: str = Field(description="sha256 of the update file (safetensors)")
    size: int = Field(description="bytes of the update file")
    dtype: str = Field(description="the wire dtype of its tensors (the round plan's)")


class TrainedFrom(BaseModel):
    cycle_id: int | None = None
    edges: list[str] = []
    rows_per_edge: dict[str, int] = {}
    rows_train: int = 0
    rows_val: int = 0
    round: int | None = Field(default=None, description="the federated round it aggregates")
    samples_per_edge: dict[str, int] = Field(
        default={}, description="a round's edges and the training images each trained on"
    )
    update: AggregatedUpdate | None = Field(
        default=None, description="a round's averaged update, as added to the parent"
    )


class ModelInfo(BaseModel):
    version: int
    parent: int | None
    backbone: str
    cut: str
    input_size: int
    class_names: list[str]
    metrics: EvalMetrics | None = None
    sha256: str
    size: int
    created_at: datetime
    trained_from: TrainedFrom | None = None
    privacy: PrivacyConfig | None = None


class ModelManifest(BaseModel):
    """Per-tensor digests of a model version's weights, so an edge can fetch only what
    changed since a version it holds (``POST /v1/models/{version}/weights/subset``)."""

    version: int
    sha256: str = Field(description="sha256 of the full weights file (as ModelInfo.sha256)")
    tensors: dict[str, str] = Field(
        description="tensor name -> sha256 of its dtype, shape and bytes "
        "(fl_core.serialization.tensor_digests)"
    )
    update: AggregatedUpdate | None = Field(
        default=None,
        description="when the version is a federated round's aggregate: the update that "
        "turns its parent into it, smaller than the changed tensors themselves",
    )


class TensorSubset(BaseModel):
    """The tensors an edge asks for."""

    names: list[str] = Field(min_length=1, max_length=10_000)


ReportedModel = Literal["candidate", "server_model", "previous", "deployed"]


class EdgeEvaluationReport(BaseModel):
    """What an edge tells the server after stage 3 about a server model version: test
    metrics of each model the gate weighed, and what it deployed. Metrics only: no
    image, no feature, no prediction leaves the edge this way."""

    model_config = ConfigDict(extra="forbid")

    chosen: Literal["candidate", "server_model", "previous"] | None = Field(
        default=None, description="the model that serves after the gate; None: none"
    )
    deployed: bool = Field(description="a new model went into service")
    decision: str = Field(default="", max_length=1000, description="the gate's reason")
    n_test: int = Field(ge=0, description="images of the edge's test split")
    metrics: dict[ReportedModel, EvalMetrics | None] = Field(
        default={}, description="test-split metrics of each model the gate weighed"
    )


class EdgeEvaluation(BaseModel):
    """An edge's report as the server stored it."""

    edge_id: str
    model_version: int
    cycle_id: int | None = Field(description="the cycle that trained the model version")
    reported_at: datetime
    report: EdgeEvaluationReport


class EdgeActivity(BaseModel):
    """One edge as the fleet view shows it."""

    edge_id: str
    name: str
    created_at: datetime
    revoked: bool
    last_seen: datetime | None = Field(
        description="the edge's latest recorded act: joining a cycle, uploading, reporting"
    )
    last_upload: datetime | None
    last_cycle_id: int | None
    deployed_model_version: int | None = Field(
        description="server model version behind the model the edge reported serving"
    )
    test_accuracy: float | None = Field(
        description="test accuracy the edge reported for the model it serves"
    )
    reported_at: datetime | None


class TrainingProgress(BaseModel):
    cycle_id: int
    fraction: float = Field(ge=0.0, le=1.0)
    message: str
    updated_at: datetime


class Overview(BaseModel):
    """Everything the dashboard shows, in one answer."""

    now: datetime
    edges: list[EdgeActivity]
    cycles: list[Cycle]
    models: list[ModelInfo]
    evaluations: list[EdgeEvaluation]
    training: list[TrainingProgress] = Field(
        description="progress of the trainings this server process runs (best effort)"
    )


# --------------------------------------------------------------------------- edge


class JobKind(StrEnum):
    cycle = "cycle"
    extract = "extract"
    finetune = "finetune"


class JobState(StrEnum):
    """A job's state, in the words of :class:`CycleState`: a job ends ``done`` or
    ``failed`` as a cycle does (databases written before this read ``succeeded`` as
    ``done``)."""

    queued = "queued"
    running = "running"
    done = "done"
    failed = "failed"

    @classmethod
    def _missing_(cls, value: object) -> JobState | None:
        return cls.done if value == "succeeded" else None


GateModel = Literal["candidate", "server_model", "previous"]
"""The models the edge's deploy gate weighs: the fine-tuned candidate, the server's model
as received, and the previously deployed one."""

WeightsDownload = Literal["cached", "update", "delta", "full"]
"""How an edge got a model's weights: from its cache, as a round's averaged update to the
version it holds, the changed tensors only, or whole."""


class CycleJobMetrics(BaseModel):
    """Test-split metrics of each model the gate weighed (reporting only; None where a
    model was not scored), and the validation metrics it chose on."""

    server_model: EvalMetrics | None = None
    candidate: EvalMetrics | None = None
    previous: EvalMetrics | None = None
    deployed: EvalMetrics | None = Field(
        default=None, description="the model that serves after the gate, if it was scored"
    )
    validation: dict[GateModel, EvalMetrics] | None = Field(
        default=None,
        description="metrics of each weighed model on the split the gate scored on",
    )


class MajorityFloor(BaseModel):
    """Always answering the training split's most frequent class: the floor below which
    the gate deploys nothing."""

    class_name: str
    validation_accuracy: float = Field(description="on the split the gate scored on")
    test_accuracy: float
    n_scored: int
    scored_on: Literal["validation", "train"]


class FinetuneSummary(BaseModel):
    """How stage 3's fine-tuning went."""

    epochs_run: int = Field(ge=0)
    best_epoch: int = Field(
        ge=0, description="the epoch whose weights were kept (early stopping / selection)"
    )


class RoundResult(BaseModel):
    """One federated round at an edge: what it trained from, sent, and scored."""

    round: int
    model_version: int = Field(description="the round's model the edge trained from")
    samples: int
    norm: float = Field(description="L2 norm of the update before clipping")
    clipped: bool
    bytes_uploaded: int
    bytes_downloaded: int
    seconds: float
    test: EvalMetrics | None = Field(
        default=None,
        description="the round's model as received, on the local test split (reporting only)",
    )


class CycleJobResult(BaseModel):
    """The result of an edge's ``cycle``, ``extract`` or ``finetune`` job: every kind
    fills the same fields, defaults where a stage did not run (jobs stored before a
    field existed read with its default)."""

    cycle_id: int | None = None
    base_model_version: int | None = Field(
        default=None, description="the cycle's base model, features were extracted with"
    )
    model_version: int | None = Field(
        default=None, description="the server model stage 3 fine-tuned"
    )
    n_train: int = 0
    n_val: int = 0
    n_test: int = 0
    rows_uploaded: int = 0
    upload_sha256: str | None = None
    bytes_uploaded: int = 0
    bytes_downloaded: int = 0
    downloads: list[WeightsDownload] = Field(
        default=[], description="how each model's weights arrived, in order"
    )
    raw_train_bytes: int = Field(
        default=0, description="size of the training images, which never leave the edge"
    )
    extract_backend: str | None = None
    metrics: CycleJobMetrics = Field(default_factory=CycleJobMetrics)
    majority: MajorityFloor | None = None
    finetune: FinetuneSummary | None = None
    chosen: GateModel | None = Field(
        default=None, description="the gate's model that serves after it; None: none"
    )
    deployed: bool = Field(default=False, description="a new model went into service")
    decision: str = Field(default="", description="what the gate decided and why")
    local_model_id: int | None = Field(
        default=None, description="local model id the fine-tuned candidate was recorded as"
    )
    previous_model_id: int | None = None
    deployed_model_id: int | None = None
    rounds: list[RoundResult] = Field(
        default=[], description="this edge's part in each federated round, in order"
    )
    stage_seconds: dict[str, float] = Field(default={}, description="seconds spent per stage")


class Job(BaseModel):
    id: str
    kind: JobKind
    state: JobState
    stage: str = ""
    progress: float = Field(default=0.0, ge=0.0, le=1.0)
    message: str = ""
    result: CycleJobResult | None = Field(
        default=None, description="set when the job is done (every job kind has this shape)"
    )
    error: str | None = None
    created_at: datetime
    updated_at: datetime


class SplitCounts(BaseModel):
    train: dict[str, int]
    val: dict[str, int]
    test: dict[str, int]


class DatasetSummary(BaseModel):
    spec: str
    class_names: list[str]
    n_images: int
    counts: SplitCounts


class LocalModel(BaseModel):
    id: int
    base_version: int | None = Field(description="server model version it came from")
    source: Literal["base", "finetuned"]
    sha256: str
    created_at: datetime
    active: bool
    metrics: EvalMetrics | None = None
    note: str = ""


class ServerLink(BaseModel):
    """Whether the edge reached its server with its token, checked when asked."""

    url: str
    reachable: bool
    authorized: bool = Field(description="the server accepted this edge's token")
    detail: str = Field(description="what the check found, in words")


class EdgeStatus(BaseModel):
    edge_name: str
    server_url: str
    dataset: DatasetSummary | None
    deployed_model: LocalModel | None
    last_cycle_id: int | None
    last_job: Job | None
    server: ServerLink | None = Field(
        default=None, description="the server check made for this answer"
    )
    problems: list[str] = Field(
        default=[],
        description="what stops this edge from taking part in a cycle (server unreachable, "
        "token refused, dataset missing); empty when nothing does",
    )


class ScoredLabel(BaseModel):
    filename: str
    label: str
    scores: dict[str, float]
    heatmap_png_base64: str | None = Field(
        default=None,
        description="Grad-CAM of the predicted class over the image, a PNG in base64 "
        "(POST /v1/predict?heatmap=true&format=png answers the PNG itself)",
    )
    heatmap_class: str | None = Field(
        default=None, description="the class the heat map shows (the predicted one)"
    )


class PredictResponse(BaseModel):
    model_id: int
    model_version: int | None
    latency_ms: float
    predictions: list[ScoredLabel]


class Evaluation(BaseModel):
    """The model that serves, the one it replaced, and the last decision about them.

    The ``chosen`` .. ``candidate_model_id`` fields describe the last deploy gate; they
    are None when the last decision was not the gate's (an operator's activation)."""

    deployed: LocalModel | None
    previous: LocalModel | None
    decision: str = Field(default="", description="what the last deploy gate decided and why")
    chosen: Literal["candidate", "server_model", "previous"] | None = Field(
        default=None,
        description="the gate's model that serves after it: the fine-tuned candidate, the "
        "server's model as received, or the previously deployed one (kept); None: none",
    )
    scored_on: Literal["validation", "train"] | None = Field(
        default=None,
        description="the split the gate scored on: 'train' (in-sample) when the "
        "validation split is empty; never the test split",
    )
    n_scored: int | None = Field(default=None, description="images the gate scored on")
    validation_accuracy: dict[str, float] | None = Field(
        default=None, description="accuracy of each scored model on the scored split, by name"
    )
    majority_class: str | None = Field(
        default=None, description="the training split's most frequent class"
    )
    majority_accuracy: float | None = Field(
        default=None,
        description="accuracy of always answering the majority class on the scored split: "
        "a model below it is never deployed",
    )
    candidate_model_id: int | None = Field(
        default=None, description="local model id the fine-tuned candidate was recorded as"
    )


__all__ = [
    "AggregatedUpdate",
    "ClassMetrics",
    "Cycle",
    "CycleJobMetrics",
    "CycleJobResult",
    "CycleState",
    "DatasetSummary",
    "EdgeActivity",
    "EdgeCreate",
    "EdgeCreated",
    "EdgeEvaluation",
    "EdgeEvaluationReport",
    "EdgeInfo",
    "EdgeStatus",
    "ErrorResponse",
    "EvalMetrics",
    "Evaluation",
    "FeatureDType",
    "FeatureSpec",
    "FinetuneSummary",
    "GateModel",
    "Job",
    "JobKind",
    "JobState",
    "LocalModel",
    "MajorityFloor",
    "ModelInfo",
    "ModelManifest",
    "Overview",
    "PredictResponse",
    "PrivacyConfig",
    "PrivacyMode",
    "ReportedModel",
    "ScoredLabel",
    "ServerLink",
    "SplitCounts",
    "TensorSubset",
    "TrainedFrom",
    "TrainingProgress",
    "UploadAck",
    "UploadInfo",
    "WeightsDownload",
]
