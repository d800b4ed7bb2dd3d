"""The split model: lower then upper equals the whole network; weights round-trip."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fl_core.backbones import BACKBONES, build_backbone
from fl_core.errors import ConfigError, InvalidInput, NotSafetensors
from fl_core.model import (
    HeadConfig,
    build_split_model,
    model_arch,
    model_from_bytes,
    model_to_bytes,
)

CLASSES = ["functional", "defective"]


@pytest.mark.parametrize(
    ("backbone", "cut", "size"),
    [
        ("tiny_cnn", "pooled", 32),
        ("tiny_cnn", "b0", 32),
        ("efficientnet_lite0", "pooled", 64),
        ("efficientnet_lite0", "b10", 64),
        ("resnet18", "layer3", 64),
        ("mobilenet_v3_small", "pooled", 64),
    ],
)
def test_lower_then_upper_equals_forward(backbone: str, cut: str, size: int) -> None:
    pretrained = backbone == "efficientnet_lite0"
    model = build_split_model(CLASSES, backbone, cut, size, pretrained=pretrained or "auto")
    x = torch.rand(2, 3, size, size)
    with torch.no_grad():
        whole = model(x)
        split = model.upper(model.lower(x))
    assert whole.shape == (2, 2)
    assert torch.equal(whole, split)
    assert list(model.lower(x).shape[1:]) == model.feature_shape()


def test_efficientnet_cut_points_and_shapes() -> None:
    model = build_split_model(CLASSES, input_size=224)
    assert model.feature_shape() == [1280]
    assert "pooled" in model.stage_names and "b10" in model.stage_names
    spatial = build_split_model(CLASSES, cut="b10", input_size=224)
    assert spatial.feature_shape() == [112, 14, 14]


def test_efficientnet_imagenet_weights_come_from_the_package() -> None:
    loaded = build_backbone("efficientnet_lite0", pretrained=True)
    random = build_backbone("efficientnet_lite0", pretrained=False)
    assert loaded.pretrained and not random.pretrained
    w_loaded = dict(loaded.stages)["stem"].conv.weight  # type: ignore[union-attr]
    w_random = dict(random.stages)["stem"].conv.weight  # type: ignore[union-attr]
    assert not torch.equal(w_loaded, w_random)


def test_grey_images_are_accepted() -> None:
    model = build_split_model(CLASSES, "tiny_cnn", pretrained=False)
    grey = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(grey), model(grey.expand(-1, 3, -1, -1)))


def test_weights_round_trip_exactly(tmp_path: Path) -> None:
    model = build_split_model(CLASSES, "tiny_cnn", "b0", pretrained=False, head=HeadConfig(8))
    data = model_to_bytes(model, {"note": "x"})
    again = model_from_bytes(data)
    assert again.arch == model.arch
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    assert model_arch(data).cut == "b0"
    assert model_to_bytes(again, {"note": "x"}) == data


def test_convolutions_run_channels_last_and_serialise_in_the_usual_order() -> None:
    """Channels-last is the fast layout on CPU; the wire format must not notice it."""
    model = build_split_model(CLASSES, input_size=64)
    conv = model.stages[0].conv.weight  # type: ignore[union-attr]
    assert conv.is_contiguous(memory_format=torch.channels_last)
    assert not conv.is_contiguous()
    x = torch.rand(2, 3, 64, 64)  # callers pass the usual NCHW tensors
    with torch.no_grad():
        out = model.run_stages(model.normalize(x), 0, 3)
        reference = model.stages[2](model.stages[1](model.stages[0](model.normalize(x))))
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(out, reference, atol=1e-5)
    again = model_from_bytes(model_to_bytes(model))
    assert again.stages[0].conv.weight.is_contiguous(memory_format=torch.channels_last)  # type: ignore[union-attr]
    assert torch.equal(again.stages[0].conv.weight, conv)  # type: ignore[union-attr]
    assert model_to_bytes(again) == model_to_bytes(model)


def test_weights_without_architecture_are_refused() -> None:
    from fl_core import serialization

    with pytest.raises(NotSafetensors, match="architecture"):
        model_from_bytes(serialization.dumps({"w": torch.ones(1)}))


def test_unknown_names_fail_clearly() -> None:
    with pytest.raises(InvalidInput, match="unknown backbone 'vgg'"):
        build_split_model(CLASSES, "vgg")
    with pytest.raises(InvalidInput, match="unknown cut 'nope'"):
        build_split_model(CLASSES, "tiny_cnn", "nope", pretrained=False)
    with pytest.raises(InvalidInput, match="two class names"):
        build_split_model(["only"], "tiny_cnn", pretrained=False)


def test_torchvision_weights_missing_is_a_clear_error(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(ConfigError, match="no ImageNet weights for resnet18"):
        build_backbone("resnet18", pretrained=True)
    with pytest.raises(ConfigError, match="not found"):
        build_backbone("resnet18", pretrained=tmp_path / "missing.pth")
    assert not build_backbone("resnet18", pretrained="auto").pretrained


def test_torchvision_weights_from_a_local_file(tmp_path: Path) -> None:
    from torchvision.models import resnet18

    path = tmp_path / "r18.pth"
    torch.save(resnet18(weights=None).state_dict(), path)
    assert build_backbone("resnet18", pretrained=path).pretrained


def test_registry_lists_the_documented_backbones() -> None:
    assert set(BACKBONES) == {"efficientnet_lite0", "resnet18", "mobilenet_v3_small", "tiny_cnn"}
