"""The split model: ``lower(x) -> features`` on the edge, ``upper(features) -> logits``
on the server, and ``forward = upper . lower`` for fine-tuning and serving.

Weights travel as safetensors; the architecture travels in the file's metadata
(``fedinspect.arch``) so that a file alone rebuilds the model without network access.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from fl_core import serialization
from fl_core.backbones import BackboneInfo, Pretrained, build_backbone
from fl_core.errors import InvalidInput, NotSafetensors

ARCH_KEY = "fedinspect.arch"


@dataclass(frozen=True)
class HeadConfig:
    """The classifier on top of the pooled vector."""

    hidden: int = 256  # 0: a single linear layer
    dropout: float = 0.2


@dataclass(frozen=True)
class Arch:
    """Everything needed to rebuild a split model's architecture."""

    backbone: str
    cut: str
    class_names: tuple[str, ...]
    input_size: int
    head: HeadConfig

    def to_json(self) -> str:
        data = asdict(self)
        data["class_names"] = list(self.class_names)
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Arch:
        data = json.loads(text)
        return cls(
            backbone=data["backbone"],
            cut=data["cut"],
            class_names=tuple(data["class_names"]),
            input_size=int(data["input_size"]),
            head=HeadConfig(**data["head"]),
        )


def _make_head(in_dim: int, n_classes: int, cfg: HeadConfig) -> nn.Module:
    if cfg.hidden <= 0:
        return nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(in_dim, n_classes))
    return nn.Sequential(
        nn.Dropout(cfg.dropout),
        nn.Linear(in_dim, cfg.hidden),
        nn.ReLU(),
        nn.Dropout(cfg.dropout),
        nn.Linear(cfg.hidden, n_classes),
    )


class SplitModel(nn.Module):
    """A backbone's stages plus a classifier head, cut after the stage named ``cut``."""

    def __init__(self, arch: Arch, info: BackboneInfo, stages: list[tuple[str, nn.Module]]):
        super().__init__()
        names = [n for n, _ in stages]
        if arch.cut not in names:
            raise InvalidInput(
                f"unknown cut {arch.cut!r} for {arch.backbone}; cut points: {', '.join(names)}"
            )
        if len(arch.class_names) < 2:
            raise InvalidInput("a classifier needs at least two class names")
        self.arch = arch
        self.info = info
        self.stage_names = names
        # channels-last: on CPU the convolutions run 1.6x faster this way (EfficientNet-Lite0
        # at 300 px, 1 or 2 threads); serialisation writes tensors in the usual order
        self.stages = nn.ModuleList([m for _, m in stages]).to(memory_format=torch.channels_last)
        self.cut_index = names.index(arch.cut)
        self.register_buffer("mean", torch.tensor(info.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(info.std).view(1, 3, 1, 1), persistent=False)
        with torch.no_grad():
            probe = torch.zeros(1, 3, arch.input_size, arch.input_size)
            self.stages.eval()
            pooled_dim = self.run_stages(probe, 0, len(names)).shape[1]
        self.head = _make_head(pooled_dim, len(arch.class_names), arch.head)
        # Added to the head's logits at prediction time, never while training: training
        # weighs the classes equally (class_weights), which fits a model for a uniform
        # class prior; adding log(prior) makes it answer for the prior of the data it was
        # trained on (post-hoc logit adjustment, Menon et al., ICLR 2021). Without it a
        # model trained on a skewed edge over-predicts its rare class.
        self.register_buffer("logit_adjustment", torch.zeros(len(arch.class_names)))

    # ----------------------------------------------------------------- structure

    @property
    def class_names(self) -> list[str]:
        return list(self.arch.class_names)

    def stage_index(self, name: str) -> int:
        try:
            return self.stage_names.index(name)
        except ValueError:
            raise InvalidInput(
                f"unknown stage {name!r}; stages: {', '.join(self.stage_names)}"
            ) from None

    @property
    def last_spatial_stage(self) -> int:
        """Index of the last stage whose output is a map (Grad-CAM hooks here)."""
        return len(self.stage_names) - 2

    def feature_shape(self) -> list[int]:
        """Shape of one feature row at the cut, for this model's input size."""
        with torch.no_grad():
            was_training = self.training
            self.eval()
            probe = torch.zeros(1, 3, self.arch.input_size, self.arch.input_size)
            shape = list(self.lower(probe).shape[1:])
            self.train(was_training)
        return shape

    def stages_digest(self, end: int) -> str:
        """sha256 of the architecture and of the weights and statistics of stages
        ``0 .. end-1``: two models with the same digest compute the same activations at
        ``end`` (on the same inputs)."""
        digest = hashlib.sha256(f"{self.arch.to_json()}|{end}".encode())
        for stage in self.stages[:end]:
            for name, tensor in stage.state_dict().items():
                digest.update(name.encode())
                digest.update(tensor.detach().contiguous().cpu().numpy().tobytes())
        return digest.hexdigest()

    def lower_parameters(self) -> list[nn.Parameter]:
        return [p for m in self.stages[: self.cut_index + 1] for p in m.parameters()]

    def upper_parameters(self) -> list[nn.Parameter]:
        params = [p for m in self.stages[self.cut_index + 1 :] for p in m.parameters()]
        return params + list(self.head.parameters())

    # ----------------------------------------------------------------- compute

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Map [0, 1] images (grey or RGB) to the backbone's input distribution."""
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        mean: torch.Tensor = self.mean  # type: ignore[assignment]
        std: torch.Tensor = self.std  # type: ignore[assignment]
        return (x - mean) / std

    def run_stages(self, x: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """Run stages ``start .. end-1`` on ``x`` (already normalised or intermediate)."""
        if x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        for stage in self.stages[start:end]:
            x = stage(x)
        return x

    def lower(self, x: torch.Tensor) -> torch.Tensor:
        """[0, 1] images -> features at the cut."""
        return self.run_stages(self.normalize(x), 0, self.cut_index + 1)

    def classify(self, pooled: torch.Tensor) -> torch.Tensor:
        """Pooled vectors -> logits, with the class prior the model was fitted for."""
        adjustment: torch.Tensor = self.logit_adjustment  # type: ignore[assignment]
        return self.head(pooled) + adjustment

    def set_class_prior(self, counts: torch.Tensor | None) -> None:
        """Answer for the class frequencies ``counts`` (None: a uniform prior).

        Add-one smoothed, so that a class absent from the counts stays possible.
        """
        adjustment: torch.Tensor = self.logit_adjustment  # type: ignore[assignment]
        if counts is None:
            adjustment.zero_()
            return
        c = counts.double() + 1.0
        prior = (c / c.sum()).log()
        adjustment.copy_((prior - prior.mean()).float())

    def upper(self, features: torch.Tensor) -> torch.Tensor:
        """Features at the cut -> logits."""
        return self.classify(self.run_stages(features, self.cut_index + 1, len(self.stages)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.upper(self.lower(x))


def build_split_model(
    class_names: Sequence[str],
    backbone: str = "efficientnet_lite0",
    cut: str = "pooled",
    input_size: int | None = None,
    head: HeadConfig | None = None,
    pretrained: Pretrained = True,
    seed: int = 0,
) -> SplitModel:
    """Build a split model; whatever is not pretrained is initialised from ``seed``."""
    # Seeded so that the same arguments give the same weights (random parts included).
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        bb = build_backbone(backbone, pretrained)
        arch = Arch(
            backbone=backbone,
            cut=cut,
            class_names=tuple(class_names),
            input_size=input_size or bb.info.input_size,
            head=head or HeadConfig(),
        )
        model = SplitModel(arch, bb.info, bb.stages)
    model.eval()
    return model


def model_to_bytes(model: SplitModel, extra: dict[str, str] | None = None) -> bytes:
    """Weights as safetensors, with the architecture in the metadata."""
    meta = {ARCH_KEY: model.arch.to_json(), **(extra or {})}
    return serialization.dumps(model.state_dict(), meta)


def model_from_bytes(data: bytes) -> SplitModel:
    """Rebuild a split model from :func:`model_to_bytes` output (no network, no pickle)."""
    tensors, meta = serialization.loads(data)
    if ARCH_KEY not in meta:
        raise NotSafetensors("weights carry no architecture metadata (fedinspect.arch)")
    try:
        arch = Arch.from_json(meta[ARCH_KEY])
    except (ValueError, KeyError, TypeError) as exc:
        raise NotSafetensors(f"malformed architecture metadata: {exc}") from None
    bb = build_backbone(arch.backbone, pretrained=False)
    model = SplitModel(arch, bb.info, bb.stages)
    # weights saved before models carried a logit adjustment answer for a uniform prior
    tensors.setdefault("logit_adjustment", torch.zeros(len(arch.class_names)))
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        raise InvalidInput(f"weights do not fit the architecture: {exc}") from None
    model.eval()
    return model


def model_arch(data: bytes) -> Arch:
    """Read only the architecture of a weights file."""
    meta = serialization.read_metadata(data)
    if ARCH_KEY not in meta:
        raise NotSafetensors("weights carry no architecture metadata (fedinspect.arch)")
    return Arch.from_json(meta[ARCH_KEY])


__all__ = [
    "ARCH_KEY",
    "Arch",
    "HeadConfig",
    "SplitModel",
    "build_split_model",
    "model_arch",
    "model_from_bytes",
    "model_to_bytes",
]
