"""bench.limit: FLOPs counted from layer shapes, work per edge, and the report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from bench import docs, limit


def test_a_convolution_counts_two_flops_per_multiply_add() -> None:
    conv = nn.Conv2d(6, 8, 3, stride=2, padding=1, groups=2)
    # output 8 x 8 x 8 per image, each from (6 / 2) * 3 * 3 multiply-adds
    assert limit.shape_flops(conv, torch.zeros(4, 6, 16, 16)) == 2 * 4 * 8 * 8 * 8 * 3 * 9


def test_a_linear_layer_counts_two_flops_per_weight_and_row() -> None:
    assert limit.shape_flops(nn.Linear(10, 4), torch.zeros(5, 10)) == 2 * 10 * 4 * 5


def test_a_module_counts_the_sum_of_its_layers() -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 2 * 2, 3))
    expected = 2 * 4 * 2 * 2 * 3 + 2 * 16 * 3
    assert limit.shape_flops(net, torch.zeros(1, 3, 2, 2)) == expected


FLOPS = {
    "frozen_forward": 100,
    "trained_forward": 10,
    "trained_step": 30,
    "lower_forward": 120,
    "full_forward": 110,
}


def test_stage_3_work_scales_with_views_times_epochs() -> None:
    one = limit.edge_work(FLOPS, n_train=50, n_val=5, n_test=10, views=1, epochs=1)
    more = limit.edge_work(FLOPS, n_train=50, n_val=5, n_test=10, views=4, epochs=3)
    assert one["stage3_steps"] == 50 * 30
    assert more["stage3_steps"] == 12 * one["stage3_steps"]
    # the cache is one frozen pass per view, whatever the epochs
    assert more["stage3_cache"] == 4 * one["stage3_cache"] == 4 * 50 * 100
    assert more["extraction"] == one["extraction"] == 50 * 120
    assert more["evaluation_frozen"] == 15 * 100


def test_a_part_at_one_rate_is_that_rate_over_the_peak() -> None:
    per_edge = {"a": limit.edge_work(FLOPS, 50, 5, 10, 4, 4)}
    rates = {"stage3_cache": 20.0, "stage3_step": 20.0}
    s = limit.part_summary("stage3", per_edge, rates, peak=80.0)
    assert s["achieved_over_peak"] == 0.25
    assert s["flops_per_edge"]["a"] == per_edge["a"]["stage3_cache"] + per_edge["a"]["stage3_steps"]


def test_accuracy_per_work_counts_each_recipe_from_its_first_trained_stage() -> None:
    per_stage = {"stem": 5, "b0": 7, "b1": 11, "pooled": 0, "classifier": 1}
    summary = {
        "image_passes": {"median": 8},
        "seeds": [0],
        "test": {"accuracy": {"median": 0.9}},
        "test_tta": {"accuracy": {"median": 0.8}},
    }
    results = {
        "options": {"input_size": 32},
        "recipes": {
            "from b1": {
                "recipe": {"train_from": "b1", "views": 2, "epochs": 4},
                "runs": [{"n": {"train": 10}}],
                "summary": summary,
            }
        },
    }
    (row,) = limit.recipe_work(results, lambda _size: per_stage)
    cache = 10 * 2 * (5 + 7)
    steps = 10 * 8 * 3 * (11 + 1)
    assert row["train_tflop"] == round((cache + steps) / 1e12, 2)
    assert row["accuracy_per_tflop"] == round(0.9 / ((cache + steps) / 1e12), 4)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("limit")
    limit.main(["--out", str(out), "--input-size", "64", "--threads", "1", "--repeats", "1"])
    return {"out": out, "results": json.loads((out / "results.json").read_text())}


def test_the_run_writes_the_judged_keys(tiny_run: dict[str, Any]) -> None:
    r = tiny_run["results"]
    stage3 = r["stage3"]
    assert stage3["achieved_over_peak"] > 0
    assert set(stage3["flops_per_edge"]) == {"edge-1", "edge-2", "edge-3"}
    assert all(v > 0 for v in stage3["flops_per_edge"].values())
    for part in ("extraction", "evaluation"):
        assert r[part]["achieved_over_peak"] > 0
    shapes = r["flops_per_image"]["shapes"]
    assert shapes["trained_step"] == 3 * shapes["trained_forward"]
    # the forward counts agree with torch's counter on these shapes
    assert r["flops_per_image"]["counter_over_shapes"]["full_forward"] == 1.0


def test_the_report_renders_and_joins_the_benchmarks_page(tiny_run: dict[str, Any]) -> None:
    out: Path = tiny_run["out"]
    text = (out / "results.md").read_text()
    assert text.startswith("# The limit")
    assert "| edge-1 |" in text
    assert docs._renderer(tiny_run["results"]) is limit.markdown
