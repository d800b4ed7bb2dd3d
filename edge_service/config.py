"""Settings of the edge agent: one pydantic-settings class, read from the environment.

Every variable is ``FEDINSPECT_EDGE_<FIELD>`` (case-insensitive); each field carries a
description because the settings table (docs/settings.md) is generated from this class.
``create_app(settings)`` keeps them as ``app.state.settings``, which routes reach
through ``SettingsDep``; :func:`get_settings` (cached) is only the default of
``create_app()``, as on the server.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import SettingsConfigDict

from fedinspect import service
from fedinspect.service import LogLevel, ServiceSettings, token_problem
from fl_core.training import FinetuneConfig

#: the fine-tuning recipe's defaults, one place for the edge, the demo and the bench
_RECIPE = FinetuneConfig()


class Settings(ServiceSettings):
    """Everything the edge reads from its environment (with the fields every service
    has)."""

    model_config = SettingsConfigDict(env_prefix="FEDINSPECT_EDGE_")

    # ---------------------------------------------------------------- server link
    server_url: str = Field(
        default="http://127.0.0.1:8000", description="Base URL of the FedInspect server."
    )
    token: SecretStr | None = Field(
        default=None,
        description="This edge's bearer token, issued by the server's POST /v1/edges.",
    )
    edge_id: str | None = Field(
        default=None,
        description="This edge's id on the server (from POST /v1/edges); written into "
        "feature uploads' metadata. Defaults to the edge name.",
    )
    request_timeout_s: float = Field(
        default=30.0, gt=0, description="Timeout of one HTTP request to the server, seconds."
    )
    retry_budget_s: float = Field(
        default=120.0,
        ge=0,
        description="Total time spent retrying one request (timeouts, connection errors, "
        "5xx, 429) before giving up, seconds.",
    )
    retry_base_s: float = Field(
        default=0.5, gt=0, description="First retry delay; doubles each attempt, with jitter."
    )
    retry_max_s: float = Field(
        default=15.0, gt=0, description="Largest delay between two retries of a request."
    )
    poll_interval_s: float = Field(
        default=1.0, gt=0, description="First delay between two polls of a cycle's state."
    )
    poll_max_interval_s: float = Field(
        default=10.0, gt=0, description="Largest delay between two polls of a cycle's state."
    )
    wait_margin_s: float = Field(
        default=1800.0,
        ge=0,
        description="How long after the cycle's deadline the edge keeps waiting for the "
        "server to finish training, seconds.",
    )

    # ---------------------------------------------------------------- identity, auth
    admin_token: SecretStr = Field(
        description="Bearer token of this edge's operators; every route but /health "
        "needs it. Required: the edge refuses to start without it; at least 16 "
        "characters, 8 of them different, and not equal to TOKEN.",
    )
    name: str = Field(default="edge", description="Name of this edge, shown in its status.")

    # ---------------------------------------------------------------- storage, data
    data_dir: Path = Field(
        default=Path("./data/edge"),
        description="Folder of the edge's state: its database and model weights.",
    )
    dataset: str = Field(
        default="elpv",
        description="Local images: an ImageFolder path (root/<class>/<image>), or 'elpv' "
        "with options such as 'elpv:type=mono' or 'elpv:part=2/3:seed=0'.",
    )
    split_seed: int = Field(default=0, description="Seed of the local train/val/test split.")
    val_fraction: float = Field(
        default=0.1, ge=0, lt=1, description="Fraction of local images used for validation."
    )
    test_fraction: float = Field(
        default=0.25, gt=0, lt=1, description="Fraction of local images held out for testing."
    )

    # ---------------------------------------------------------------- HTTP service
    port: int = Field(default=8100, ge=1, le=65535, description="Port the API listens on.")

    # ---------------------------------------------------------------- learning
    batch_size: int = Field(
        default=32, ge=1, description="Images per batch for extraction, training, inference."
    )
    extract_backend: Literal["onnxruntime", "torch"] = Field(
        default="onnxruntime",
        description="Engine of the frozen layers: the lower part during feature extraction "
        "and the stages below the fine-tuned ones in stage 3, and of the deployed model "
        "answering POST /v1/predict (heat maps still take torch's gradients). "
        "'onnxruntime' (exported from the model and checked against torch; falls back to "
        "torch, with the reason logged, when export or check fail) or 'torch'.",
    )
    threads: int | None = Field(
        default=None,
        ge=1,
        description="CPU threads of PyTorch and ONNX Runtime in this edge process; unset: "
        "one per core. Set it when several edges share one machine (the demo does): edges "
        "that each start a thread per core slow each other down several times over.",
    )
    finetune_epochs: int = Field(
        default=_RECIPE.epochs, ge=1, description="Fine-tuning epochs (stage 3)."
    )
    finetune_lr: float = Field(
        default=_RECIPE.lr, gt=0, description="Fine-tuning learning rate of the head."
    )
    finetune_backbone_lr_scale: float = Field(
        default=_RECIPE.backbone_lr_scale,
        gt=0,
        le=1,
        description="Learning rate of the fine-tuned backbone stages, relative to the head's.",
    )
    finetune_train_from: str | None = Field(
        default=_RECIPE.train_from,
        description="First stage fine-tuned: unset for the backbone's default, 'upper' for "
        "the part above the cut only, or a stage name.",
    )
    finetune_views: int = Field(
        default=_RECIPE.views,
        ge=1,
        description="Views cached per training image: the image, its transpose, half turn "
        "and anti-transpose (label-preserving for surface and cell defects), then randomly "
        "augmented copies. Set 1 where a defect's class depends on its orientation.",
    )
    finetune_augment: bool = Field(
        default=_RECIPE.augment,
        description="Train on more than the plain image (see FINETUNE_VIEWS); off: one view.",
    )
    finetune_select: Literal["last", "val_loss"] = Field(
        default=_RECIPE.select,
        description="Epoch kept by fine-tuning: 'last' (a fixed schedule; the validation "
        "split then only serves the deploy gate) or 'val_loss' (the lowest validation "
        "loss, stopping after 3 epochs without a better one).",
    )
    after_rounds: Literal["finetune", "last_round"] = Field(
        default="finetune",
        description="The model an edge offers its deploy gate, beside the server's final "
        "model, after a cycle with federated rounds: 'finetune' fine-tunes the final model "
        "on the local training split (FINETUNE_*); 'last_round' offers the model it trained "
        "locally in the last round (ROUND_* recipe, from the last round's model), with no "
        "further training. A cycle without rounds always fine-tunes.",
    )
    deploy_min_delta: float = Field(
        default=0.0,
        ge=0,
        description="Deploy gate: a new model (fine-tuned, or the server's as received) "
        "replaces the deployed one if its validation accuracy is above the deployed "
        "model's minus this, or equal to it with a higher balanced accuracy (a full tie "
        "keeps the deployed model). No model below always answering the training split's "
        "majority class is ever deployed.",
    )

    # ---------------------------------------------------------------- prediction
    max_predict_bytes: int = Field(
        default=20 * 1024 * 1024,
        ge=1,
        description="Largest POST /v1/predict request body, bytes.",
    )
    max_image_pixels: int = Field(
        default=50_000_000, ge=1, description="Largest image accepted for prediction, pixels."
    )
    max_predict_pixels: int = Field(
        default=100_000_000,
        ge=1,
        description="Most pixels of all images in one POST /v1/predict request together.",
    )
    max_predict_files: int = Field(
        default=16, ge=1, description="Most images in one POST /v1/predict request."
    )
    max_image_aspect: float = Field(
        default=32.0,
        ge=1,
        description="Largest ratio of an image's longer side to its shorter one.",
    )

    # ---------------------------------------------------------------- HTTP limits
    # an edge is a small machine that also trains: half the server's default
    max_concurrent_requests: int = Field(
        default=16,
        ge=1,
        description=ServiceSettings.model_fields["max_concurrent_requests"].description,
    )
    max_concurrent_predictions: int = Field(
        default=2,
        ge=1,
        description="POST /v1/predict requests handled at once (each decodes images); more "
        "wait up to ADMISSION_WAIT_S, then get 503 with Retry-After.",
    )

    @model_validator(mode="after")
    def _check(self) -> Settings:
        admin = self.admin_token.get_secret_value()
        if not admin:
            raise ValueError("admin_token must not be empty")
        problem = token_problem(admin)
        if problem is not None:
            raise ValueError(f"admin_token {problem}")
        if self.token is not None and admin == self.token.get_secret_value():
            raise ValueError(
                "admin_token must differ from token (the edge's server token): whoever "
                "holds one would hold both"
            )
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError("val_fraction + test_fraction must be below 1")
        if self.poll_max_interval_s < self.poll_interval_s:
            raise ValueError("poll_max_interval_s must be >= poll_interval_s")
        return self

    @property
    def effective_edge_id(self) -> str:
        return self.edge_id or self.name

    @property
    def db_path(self) -> Path:
        return self.data_dir / "edge.db"

    @property
    def blob_dir(self) -> Path:
        return self.data_dir / "blobs"

    @property
    def onnx_dir(self) -> Path:
        """Checked ONNX exports of deployed models, named by the weights' sha256."""
        return self.data_dir / "onnx"


def load_settings() -> Settings:
    """Settings from the environment; a clear ConfigError when they are incomplete."""
    return service.load_settings(Settings, "edge")


@lru_cache
def get_settings() -> Settings:
    """The process's settings, read once from the environment."""
    return load_settings()


__all__ = ["LogLevel", "Settings", "get_settings", "load_settings"]
