"""The edge's FINETUNE_* settings are stage 3's recipe, validated where they are read."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from pydantic import ValidationError

from edge_service.config import Settings
from edge_service.services.cycle import finetune_config
from fl_core.training import FinetuneConfig
from tests.edge_service.conftest import make_settings


def test_an_edge_left_at_its_defaults_fine_tunes_with_the_shipped_recipe(tmp_path: Path) -> None:
    given = make_settings(tmp_path, tmp_path).model_dump()
    s = Settings(**{k: v for k, v in given.items() if not k.startswith("finetune_")})
    assert finetune_config(s) == replace(FinetuneConfig(), batch_size=s.batch_size)


def test_each_recipe_setting_reaches_fine_tuning(tmp_path: Path) -> None:
    s = make_settings(
        tmp_path,
        tmp_path,
        finetune_epochs=7,
        finetune_lr=0.02,
        finetune_backbone_lr_scale=0.25,
        finetune_views=6,
        finetune_augment=True,
        finetune_select="val_loss",
        split_seed=5,
    )
    got = finetune_config(s)
    assert (got.epochs, got.lr, got.backbone_lr_scale, got.views) == (7, 0.02, 0.25, 6)
    assert (got.augment, got.select, got.train_from, got.seed) == (True, "val_loss", "b1", 5)


@pytest.mark.parametrize(
    ("key", "value"),
    [("finetune_select", "best"), ("finetune_backbone_lr_scale", 0), ("finetune_views", 0)],
)
def test_a_bad_recipe_setting_is_refused_naming_it(tmp_path: Path, key: str, value: object) -> None:
    with pytest.raises(ValidationError, match=key):
        make_settings(tmp_path, tmp_path, **{key: value})
