"""Settings of the training-cycle server: one pydantic-settings class.

Every field is read from the environment with the prefix ``FEDINSPECT_SERVER_``
(``FEDINSPECT_SERVER_ADMIN_TOKEN``, ``FEDINSPECT_SERVER_PRIVACY__DTYPE=float16``, ...).
``create_app(settings)`` keeps them as ``app.state.settings``, which routes reach
through ``SettingsDep``; :func:`get_settings` (cached) is only the default of
``create_app()``. No import-time global, so tests pass their own.
"""

from __future__ import annotations

import socket
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationInfo, field_validator
from pydantic_settings import SettingsConfigDict

from fedinspect import service
from fedinspect.service import ServiceSettings, token_problem
from fl_core.errors import InvalidInput
from fl_core.schemas import PrivacyConfig
from fl_core.training import UpperTrainConfig

ENV_PREFIX = "FEDINSPECT_SERVER_"

#: Clipping and noise that the ``pooled`` mode starts from when it is asked for, chosen
#: from ``fedinspect privacy-eval`` at 160 px (docs/privacy.md): raw pooled rows let a
#: decoder gain about 4 dB PSNR over a mean-image guess and re-identify about 11% of
#: uploaded cells; with these, under 1 dB and about chance. They cost the server's model
#: most of what it learns at larger inputs (bench/stage2.py), which is why the default
#: mode is ``stats``: no rows leave an edge at all.
POOLED_PRIVACY_DEFAULTS: dict[str, float] = {"clip_norm": 24.0, "noise_sigma": 2.0}

#: The default: per-class statistics with low-rank factors, no per-image data, no noise
_DEFAULT_PRIVACY = PrivacyConfig(mode="stats")


class Settings(ServiceSettings):
    """Configuration of ``fedinspect server`` (with the fields every service has)."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX)

    admin_token: SecretStr = Field(
        description="Bearer token of operators (required, at least 16 characters, 8 of "
        "them different). "
        "Edges get their own tokens from POST /v1/edges.",
    )
    data_dir: Path = Field(
        default=Path("./data/server"),
        description="Folder for the SQLite database and the blob store (weights, uploads).",
    )
    database_url: str | None = Field(
        default=None,
        description="SQLAlchemy URL; default: a SQLite file server.db in DATA_DIR. "
        "PostgreSQL (postgresql+psycopg://user:password@host/db, the `postgres` extra) "
        "lets several replicas share one database.",
    )
    blob_url: str | None = Field(
        default=None,
        description="Where blobs (weights, uploads) live: s3://BUCKET/PREFIX for an "
        "S3-compatible object store (credentials from AWS_ACCESS_KEY_ID / "
        "AWS_SECRET_ACCESS_KEY, the `s3` extra); default: the folder blobs in DATA_DIR.",
    )
    s3_endpoint_url: str | None = Field(
        default=None,
        description="Endpoint of a non-AWS S3-compatible store (MinIO: http://minio:9000).",
    )
    replica_id: str | None = Field(
        default=None,
        max_length=128,
        description="Name of this replica among servers sharing a database (lease owner, "
        "shown by /health); default: host name and port. A replica restarted under the "
        "same name takes its own cycles back at once.",
    )
    lease_ttl_s: float = Field(
        default=15.0,
        gt=0,
        description="Seconds a replica's lease on a training (or on the deadline watcher) "
        "lasts without a heartbeat; another replica takes over after that.",
    )
    allow_new_database: bool = Field(
        default=False,
        description="Create a new, empty database even though the blob store already holds "
        "blobs (refused by default: a deleted or replaced database next to a full store is "
        "usually a mistake, and a new one invalidates every edge's token).",
    )
    backbone: str = Field(
        default="efficientnet_lite0", description="Backbone of the base model (version 1)."
    )
    cut: str = Field(default="pooled", description="Cut point between edge and server parts.")
    input_size: int | None = Field(
        default=None, gt=0, description="Input image size in pixels; default: the backbone's."
    )
    class_names: list[str] = Field(
        default=["functional", "defective"],
        min_length=2,
        description="Class names, in label order (JSON list in the environment); an edge "
        "matches its class folders to them by name, in any order, and may have only some.",
    )
    pretrained: bool = Field(
        default=True,
        description="Start the base model from the backbone's ImageNet weights "
        "(installed packages only, nothing is downloaded).",
    )
    head_hidden: int = Field(
        default=256, ge=0, description="Hidden units of the classifier head; 0: one linear layer."
    )
    privacy: PrivacyConfig = Field(
        default_factory=lambda: _DEFAULT_PRIVACY,
        validate_default=True,
        description="What edges send and the transform they apply to it: PRIVACY__MODE "
        "(stats, the default: per-class counts, means, variances and a few principal "
        "directions, no rows; pooled: a pooled vector per image; spatial: a block's map "
        "per image, the backbone's default block unless CUT names one), PRIVACY__DTYPE, "
        "PRIVACY__CLIP_NORM, PRIVACY__NOISE_SIGMA, PRIVACY__STATS_MIN_COUNT, "
        "PRIVACY__STATS_RANK. The pooled mode clips rows to norm 24 and adds noise of "
        "sigma 2 unless told otherwise (PRIVACY__NOISE_SIGMA=0 turns noise off).",
    )
    min_edges: int = Field(
        default=1, ge=1, description="Uploads needed before a cycle trains (quorum)."
    )
    cycle_deadline_s: float = Field(
        default=600.0,
        gt=0,
        description="Seconds a cycle collects uploads; then it trains with the quorum or fails.",
    )
    deadline_check_interval_s: float = Field(
        default=0.5, gt=0, description="How often the server checks cycle deadlines, in seconds."
    )
    max_upload_bytes: int = Field(
        default=256 * 1024 * 1024, gt=0, description="Largest feature upload body, in bytes."
    )
    max_upload_rows: int = Field(
        default=100_000, gt=0, description="Largest number of rows in one feature upload."
    )
    max_concurrent_uploads: int = Field(
        default=4,
        ge=1,
        description="Feature uploads received at once (each body is held in memory while "
        "it is validated); more get 503 with Retry-After.",
    )
    max_concurrent_uploads_per_edge: int = Field(
        default=1,
        ge=1,
        description="Feature uploads one edge may send at once: one edge cannot hold every "
        "upload slot; its extra uploads get 503 with Retry-After.",
    )
    train_epochs: int = Field(default=60, ge=1, description="Epochs of server-side training.")
    train_lr: float = Field(default=2e-3, gt=0, description="Peak learning rate (AdamW).")
    train_batch_size: int = Field(default=64, ge=2, description="Mini-batch size.")
    train_val_fraction: float = Field(
        default=0.15,
        ge=0,
        lt=1,
        description="Stratified share of the pooled rows held out for validation metrics.",
    )
    train_seed: int = Field(default=0, description="Seed of server-side training.")
    rounds: int = Field(
        default=3,
        ge=0,
        le=50,
        description="Federated fine-tuning rounds a cycle runs after the head (R): each "
        "edge trains the top stages on its images and sends their update; 0: one-shot "
        "(fewer bytes, about half the cycle's time, lower accuracy: docs/benchmarks.md).",
    )
    round_train_from: str | None = Field(
        default=None,
        description="First stage the rounds train (with all above it and the head); "
        "default: the backbone's fine-tuning stage (b15 for efficientnet_lite0).",
    )
    round_epochs: int = Field(
        default=3, ge=1, le=20, description="Local epochs over an edge's views per round."
    )
    round_lr: float = Field(
        default=1e-3,
        gt=0,
        description="Peak learning rate of the head in a round's local training (one-cycle, "
        "AdamW); the blocks train at ROUND_BACKBONE_LR_SCALE of it.",
    )
    round_backbone_lr_scale: float = Field(
        default=0.1,
        gt=0,
        le=1,
        description="Learning rate of the backbone stages a round trains, relative to "
        "ROUND_LR. A tenth: at the full rate the first round knocks the head's accuracy "
        "down (on elpv at 300 px by about 9 points with 1 local epoch, which four rounds "
        "did not win back; from b13 at 224 px to one class).",
    )
    round_clip_norm: float = Field(
        default=10.0,
        gt=0,
        description="L2 bound of one edge's update: edges clip to it, the server refuses "
        "a longer update.",
    )
    round_noise_multiplier: float = Field(
        default=0.0,
        ge=0,
        description="Gaussian noise on the averaged update, in units of the clip bound "
        "times the largest edge weight (DP-FedAvg); 0: none.",
    )
    round_dtype: Literal["float16", "float32", "int8"] = Field(
        default="float16",
        description="dtype of a round's updates on the wire, both ways: 'int8' sends half "
        "float16's bytes (one float32 scale per output row, stochastic rounding: zero-mean "
        "noise of at most one step per value).",
    )
    round_deadline_s: float = Field(
        default=600.0,
        gt=0,
        description="Seconds a round waits for every edge's update; then it aggregates "
        "with the quorum (MIN_EDGES), or the cycle ends with the last round's model.",
    )

    @field_validator("admin_token")
    @classmethod
    def _long_enough(cls, value: SecretStr) -> SecretStr:
        problem = token_problem(value.get_secret_value())
        if problem is not None:
            raise ValueError(problem)
        return value

    @field_validator("privacy", mode="before")
    @classmethod
    def _pooled_defaults(cls, value: object, info: ValidationInfo) -> object:
        # Settings for the pooled mode start from its clipping and noise, so that
        # PRIVACY__MODE=pooled alone does not send raw rows; settings that name no mode
        # keep the default mode, unless they set a wire dtype of rows; the other modes
        # (and a CUT at a block) start from no clipping and no noise: the bound and
        # sigma suit pooled rows.
        cut = info.data.get("cut", "pooled")
        if value is _DEFAULT_PRIVACY and cut != "pooled":
            return PrivacyConfig()
        if isinstance(value, dict):
            if value.get("mode") == "pooled" and cut == "pooled":
                return {**POOLED_PRIVACY_DEFAULTS, **value}
            if "mode" not in value and cut == "pooled":
                # a wire dtype other than float32 is a setting of rows: it asks for rows
                if value.get("dtype", "float32") != "float32":
                    return {"mode": "pooled", **POOLED_PRIVACY_DEFAULTS, **value}
                return {"mode": _DEFAULT_PRIVACY.mode, **value}
        return value

    @field_validator("privacy")
    @classmethod
    def _mode_fits_cut(cls, value: PrivacyConfig, info: ValidationInfo) -> PrivacyConfig:
        cut = info.data.get("cut", "pooled")
        if value.mode == "spatial" and cut == "pooled":
            return value  # the base model is cut at the backbone's default spatial block
        try:
            value.for_cut(cut)
        except InvalidInput as exc:
            raise ValueError(f"{exc.detail} (CUT={cut})") from None
        return value

    @property
    def sqlalchemy_url(self) -> str:
        """The database URL in use (the configured one, or SQLite in DATA_DIR)."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'server.db').resolve()}"

    @property
    def blob_dir(self) -> Path:
        return self.data_dir / "blobs"

    @property
    def replica_name(self) -> str:
        """This replica's name (REPLICA_ID, or host name and port)."""
        return self.replica_id or f"{socket.gethostname()}:{self.port}"

    def upper_train_config(self) -> UpperTrainConfig:
        return UpperTrainConfig(
            epochs=self.train_epochs,
            batch_size=self.train_batch_size,
            lr=self.train_lr,
            val_fraction=self.train_val_fraction,
            seed=self.train_seed,
        )


def load_settings() -> Settings:
    """Settings from the environment; a clear ConfigError when they are incomplete."""
    return service.load_settings(Settings, "server")


@lru_cache
def get_settings() -> Settings:
    """The process's settings, read once from the environment."""
    return load_settings()


__all__ = ["ENV_PREFIX", "POOLED_PRIVACY_DEFAULTS", "Settings", "get_settings", "load_settings"]
