"""``python -m experiments.privacy_eval``'s attack on one federated round's update:
membership inference by the drop in loss, on a tiny model and random images (no elpv)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from experiments.privacy_eval import _auc, update_attack
from fl_core.data import ImageSet, load_image_folder
from fl_core.model import HeadConfig, SplitModel, build_split_model
from fl_core.rounds import NORM_TOLERANCE
from fl_core.schemas import RoundPlan
from fl_core.training import FinetuneConfig


def _images(root: Path, n: int, seed: int) -> ImageSet:
    """``n`` random 32x32 colour images, labels at random: only memorising an image
    lowers its loss more than another's."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        folder = root / ("ok", "defect")[int(rng.integers(2))]
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:03d}.png")
    return load_image_folder(root)


@pytest.fixture(scope="module")
def sets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ImageSet]:
    root = tmp_path_factory.mktemp("updates")
    names = ["mem", "non", "test"]
    return {name: _images(root / name, 48, seed) for seed, name in enumerate(names)}


def _model() -> SplitModel:
    return build_split_model(
        ["defect", "ok"], "tiny_cnn", pretrained=False, input_size=32, head=HeadConfig(64)
    )


def _plan(**overrides: Any) -> RoundPlan:
    values: dict[str, Any] = {
        "rounds": 1,
        "train_from": "b1",
        "epochs": 1,
        "lr": 3e-4,
        "clip_norm": 10.0,
        "noise_multiplier": 0.0,
        "dtype": "float16",
        "deadline_s": 60.0,
    }
    return RoundPlan(**(values | overrides))


def test_update_attack_reports_auc_norm_and_accuracy_per_noise_level(
    sets: dict[str, ImageSet],
) -> None:
    plan = _plan(clip_norm=0.01)
    args = (sets["mem"], sets["non"], sets["test"], plan, (0.5, 1.0))
    result = update_attack(_model(), *args)
    keys = {"norm_before_clip", "norm_sent", "clipped", "accuracy_before", "update_params"}
    assert keys | {"membership_auc_before", "rows", "members", "nonmembers"} <= set(result)
    assert (result["members"], result["nonmembers"], result["views"]) == (48, 48, 4)
    # the update is clipped to the bound, and what the server read is within it
    assert result["norm_before_clip"] > plan.clip_norm and result["clipped"]
    assert result["norm_sent"] <= plan.clip_norm * (1 + NORM_TOLERANCE)
    assert [r["noise_multiplier"] for r in result["rows"]] == [0.0, 0.5, 1.0]
    assert [r["noise_std"] for r in result["rows"]] == [0.0, 0.005, 0.01]
    assert "server" in result["rows"][0]["reader"]
    for r in result["rows"]:
        assert 0 <= r["membership_auc"] <= 1 and 0 <= r["membership_auc_loss"] <= 1
        assert 0 <= r["accuracy"] <= 1
    # seeded: the same round and the same noise give the same numbers
    assert update_attack(_model(), *args) == result


def test_loss_drop_finds_the_members_of_a_large_update_and_noise_hides_them(
    sets: dict[str, ImageSet],
) -> None:
    # from b0 up, many epochs at a high rate, no effective clip: the edge memorises its
    # images' random labels (the loss drop then finds them with an AUC near 0.98)
    plan = _plan(train_from="b0", epochs=20, lr=1e-2, clip_norm=1000.0)
    result = update_attack(
        _model(),
        sets["mem"],
        sets["non"],
        sets["test"],
        plan,
        (1.0,),
        config=FinetuneConfig(batch_size=16),
    )
    clear, noised = result["rows"]
    assert not result["clipped"]
    assert clear["membership_auc"] > 0.9, result
    # noise of std 1,000 per parameter drowns an update of norm about 10
    assert abs(noised["membership_auc"] - 0.5) < 0.15, result


def test_auc_counts_ties_half() -> None:
    assert _auc(np.ones(3), np.ones(5)) == 0.5
    assert _auc(np.array([2.0, 3.0]), np.array([1.0, 2.0])) == 0.875
    assert _auc(np.array([0.0]), np.array([1.0, 2.0])) == 0.0
