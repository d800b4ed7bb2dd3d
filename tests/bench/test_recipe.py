"""bench.recipe's parts: the cached views, one run through the shipped fine-tuning path,
and the summary table; tiny inputs, no dataset."""

from __future__ import annotations

import torch

from bench import recipe
from fedinspect.demo import DemoOptions, _base_model, plan_demo
from fl_core.data import symmetric_view
from fl_core.training import finetune_start


def _tiny() -> tuple[recipe.DemoPlan, dict, dict]:
    plan = plan_demo(DemoOptions(dataset="elpv", edges=3, seed=0, input_size=64))
    model = _base_model(plan)
    start = finetune_start(model)
    gen = torch.Generator().manual_seed(0)

    def split(n: int) -> dict[str, torch.Tensor]:
        images = torch.rand(n, 3, 64, 64, generator=gen)
        y = torch.arange(n) % 2
        images[y == 1] *= 0.2  # a learnable difference
        with torch.inference_mode():
            x = torch.stack(
                [
                    model.run_stages(model.normalize(symmetric_view(images, v)), 0, start)
                    for v in range(4)
                ]
            )
        return {"x": x.half(), "y": y}

    data = {"train": split(24), "val": split(8), "test": split(8)}
    return plan, {"state": model.state_dict(), "start": start}, data


def test_one_run_scores_a_recipe_on_validation_and_test_and_tabulates_it() -> None:
    plan, meta, data = _tiny()
    run = recipe.one_run(plan, meta, data, recipe.Recipe(train_from="b15", views=2, epochs=2))

    assert run["n"] == {"train": 24, "val": 8, "test": 8}
    assert run["image_passes"] == run["epochs_run"] * 2
    assert 0 <= run["best_epoch"] <= run["epochs_run"] <= 2
    for split in ("val", "test", "test_tta"):
        assert 0.0 <= run[split]["accuracy"] <= 1.0
    results = {
        "command": "python -m bench.recipe",
        "machine": "m",
        "options": {"seeds": [0], "input_size": 64},
        "recipes": {"r": {"runs": [run], "summary": recipe.summarise([run])}},
    }
    table = recipe.markdown(results)
    assert f"{100 * run['test']['accuracy']:.1f}" in table
    assert "| r | 1 |" in table


def test_the_recipe_that_ships_is_one_the_bench_measures() -> None:
    """The edges' default recipe is a row of bench.recipe, so its numbers stay on record."""
    from fl_core.backbones import build_backbone
    from fl_core.training import FinetuneConfig

    shipped = FinetuneConfig()
    measured = recipe.Recipe(
        train_from=build_backbone("efficientnet_lite0", False).info.finetune_from,
        views=shipped.views,
        epochs=shipped.epochs,
        backbone_lr_scale=shipped.backbone_lr_scale,
        lr=shipped.lr,
        select=shipped.select,
    )
    assert measured in recipe.RECIPES.values()
