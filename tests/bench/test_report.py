"""``bench.report``: results.md from a results.json (synthetic results)."""

from __future__ import annotations

from typing import Any

from bench import demo_runs, flower
from bench.report import to_markdown
from bench.stats import summary
from tests.bench.synthetic import (
    SEEDS,
    fake_flower_runs,
    fake_flower_seed,
    fake_header,
    fake_old_flower_seed,
    fake_run,
    fake_runs,
)


def test_to_markdown_with_every_section_errored_lists_the_errors() -> None:
    r = fake_header(
        extraction=None,
        wire=None,
        ingest=None,
        accuracy={},
        cycle={},
        errors={"extraction": "RuntimeError: boom", "demo elpv": "ValueError: no data"},
    )
    md = to_markdown(r)
    assert md.startswith("# FedInspect benchmarks (quick)\n")
    assert "Test CPU, 2 cores" in md
    assert "total - s." in md  # no total_seconds yet
    assert "## Sections that failed" in md
    assert "- extraction: RuntimeError: boom" in md
    assert "- demo elpv: ValueError: no data" in md
    for section in ("## 1.", "## 2.", "## 3.", "## 4.", "## 5.", "## 6."):
        assert section not in md


def test_to_markdown_of_the_bare_header_has_no_sections() -> None:
    md = to_markdown(fake_header(notes=["NEU-DET skipped: absent"]))
    assert "- NEU-DET skipped: absent" in md
    assert "## " not in md
    assert md.endswith("\n")


def _extraction_size() -> dict[str, Any]:
    return {
        "input_size": 224,
        "batch_size": 32,
        "threads": 2,
        "images": 64,
        "torch_nchw_img_s": summary([100.0, 110.0, 90.0], 1),
        "torch_img_s": summary([120.0, 125.0, 115.0], 1),
        "onnxruntime_img_s": summary([150.0, 160.0, 140.0], 1),
        "breakdown": {
            "the edge now (overlap only with a spare core)": summary([130.5, 131.0, 129.0], 1),
        },
        "ratio": 0.871,
        "onnx_setup_s": 1.25,
        "onnx_max_abs_diff": 2.5e-6,
    }


def test_to_markdown_shows_the_extraction_numbers() -> None:
    md = to_markdown(fake_header(extraction={"sizes": [_extraction_size()]}, total_seconds=321.5))
    assert "## 1. Extraction against the CPU's limit" in md
    assert "224 px, batch 32, 2 threads, 64 elpv images" in md
    assert "| reference: ONNX Runtime on decoded tensors | 150 (140-160) |" in md
    assert "| edge path: the edge now (overlap only with a spare core) | 130.5 (129-131) |" in md
    assert "**0.871**" in md
    assert "1.25 s (max abs diff 2.5e-06)" in md
    assert "total 321.5 s." in md
    assert "## Sections that failed" not in md


def test_to_markdown_shows_wire_ingest_and_measured_bytes() -> None:
    w = {
        "raw_bytes_per_image": 12345.6,
        "upload_bytes_per_image": {"float16": 2600.0, "int8": 1400.0},
        "ratio": {"float16": 0.2106, "int8": 0.1134},
        "download_bytes_per_cycle": {
            "first_cycle": 630_000,
            "later_cycles": 600_000,
            "base_from_local_weights": 30_000,
            "base_changed_tensors": 0,
            "without_local_weights_first_cycle": 5_600_000,
            "full_model": 5_000_000,
            "delta": 600_000,
            "changed_tensors": 4,
            "total_tensors": 200,
            "without_delta_first_cycle": 10_000_000,
        },
        "measured_in_demo": [
            {"name": "edge-1", "n_train": 100, "uploaded": 1, "downloaded": 2, "raw_images": 3}
        ],
        "per_round_per_edge": {
            "train_from": "b13",
            "dtype": "float16",
            "trained_tensors": 34,
            "trained_parameters": 2_298_370,
            "upload": 4_600_188,
            "download_update": 4_630_587,
            "download_changed_tensors": 9_227_239,
            "changed_tensors": 34,
        },
    }
    row = {
        "edges": 50,
        "uploads": 100,
        "upload_bytes": 4096,
        "uploads_per_s": 77.7,
        "mb_per_s": 0.3,
        "p50_ms": 12.0,
        "p99_ms": 99.0,
        "errors": 0,
        "retries_429_503": 3,
        "peak_rss_mb": 321.0,
    }
    md = to_markdown(fake_header(wire=w, ingest=[row]))
    assert "raw image bytes on disk: 12346 per image" in md
    assert "| int8 | 1400 | 0.1134 |" in md
    assert "4 of 200 tensors" in md
    assert "base 30000 as a delta from the local ImageNet weights" in md
    assert "5600000 without them" in md
    assert "| edge-1 | 100 | 1 | 2 | 3 |" in md
    assert (
        "a federated round, per edge (b13 up and the head, 2,298,370 parameters in 34 "
        "tensors, float16): upload 4600188 bytes; download of the round's model 4630587 "
        "bytes as the averaged update, against 9227239 as the changed tensors." in md
    )
    assert "| 50 | 100 | 4096 | 77.7 | 0.3 | 12.0 | 99.0 | 0 | 3 | 321.0 |" in md


def test_to_markdown_shows_accuracy_cycle_and_flower_from_the_aggregates() -> None:
    runs = fake_runs()
    fl = fake_flower_runs()
    stages = demo_runs.cycle_stages(runs)
    r = fake_header(
        accuracy={"elpv": demo_runs.accuracy_table(runs)},
        cycle={"quick_s": stages["cycle_s"], "full_s": None, "stages": stages["stages"]},
        ours=demo_runs.ours_for_flower(runs),
        flower=flower.summarize(fl, "flower"),
        flower_head=flower.summarize(fl, "flower_head"),
        engine="flwr FedAvg",
    )
    md = to_markdown(r)
    assert "quick demo cycle: 20 s (12-30); full demo cycle: -" in md
    assert "| extract | 4 (2-6) |" in md
    assert "### elpv (quick, 224 px, seeds [0, 1, 2])" in md
    assert (
        "| edge-1 | 50.0 (40.0-60.0) | 50.0 (50.0-50.0) | 55.0 (55.0-55.0) | 70.0 (50.0-90.0) |"
        in md
    )
    assert "centralized upper bound: 90.0 (85.0-95.0)" in md
    assert "## 6. Against Flower (elpv)" in md
    ours_row = next(line for line in md.splitlines() if line.startswith("| ours (1 cycle)"))
    assert "| 50.0 (40.0-90.0) |" in ours_row  # mean federated accuracy
    assert "0.0 MB (0.0-0.0)" in ours_row  # 13 kB
    assert "| 19.7 (15.7-23.7) | 20 (12-30) |" in ours_row
    fl_row = next(line for line in md.splitlines() if line.startswith("| Flower FedAvg, b11+"))
    assert "| 70.0 (60.0-80.0) |" in fl_row
    assert "| 5 (4-6) |" in fl_row
    assert (
        "flower: rounds to reach the median of our means (all seeds), per seed: [2, None, 5]" in md
    )
    assert "engine: flwr FedAvg" in md
    assert "Grid points" not in md  # grids stored as bare (epochs, lr) pairs: nothing to list
    assert "Same seed" not in md  # no per-seed comparison stored: no table


def test_to_markdown_sets_each_flower_seed_beside_ours_on_the_same_seed() -> None:
    fl = fake_flower_runs()
    fl[0]["flower"] |= {"history_mean": [0.5, 0.8], "best_round": 2, "bytes_per_round": 2_000_000}
    fl[0]["flower"]["accuracy"]["mean"] = 0.95
    fl[0]["flower"] |= {"bytes": 4_000_000}
    ours = {0: {"mean": 0.8, "per_edge": [0.8], "bytes": 1_000_000, "wall": 10.0}}
    r = fake_header(
        ours=demo_runs.ours_for_flower(fake_runs()),
        flower=flower.summarize(fl, "flower"),
        flower_head=flower.summarize(fl, "flower_head"),
        same_seed=flower.same_seed(fl, ours),
    )
    md = to_markdown(r)
    assert "Same seed, same splits" in md
    # wall to best 20 s with 1 s frozen: round 2 of 2 costs 1 + 19 = 20 s
    row = "| 0 | 80.0 | 95.0 (+15.0) | 4x, 2x | 2 (4.0 MB, 20 s) | 60.0 (-20.0) | 0x, 2x | never |"
    assert row in md.splitlines()


def test_to_markdown_lists_every_point_of_a_searched_flower_grid() -> None:
    """The grid search is part of the comparison's fairness: each point's best round,
    its cost and when it reached ours stay in the report once the seed is done."""
    fl = fake_flower_runs()
    collapsed = fake_flower_seed(0, 0.684, None) | {"local_epochs": 1, "best_round": 2}
    collapsed |= {"rounds_run": 6, "bytes": 145_300_000}
    fl[0]["flower"]["grid"] = [collapsed, dict(fl[0]["flower"], rounds_run=16)]
    r = fake_header(
        ours=demo_runs.ours_for_flower(fake_runs()),
        flower=flower.summarize(fl, "flower"),
        flower_head=flower.summarize(fl, "flower_head"),
    )
    md = to_markdown(r)
    rows = [line for line in md.splitlines() if line.startswith("| flower")]
    assert rows == [
        "| flower, seed 0 | 1, 0.001 | 68.4 | 2 (6) | 145.3 MB | 20 | never |",
        "| flower, seed 0 | 3, 0.001 | 80.0 | 4 (16) | 0.0 MB | 20 | 2 |",
    ]


def _flower_markdown(fl: list[dict[str, Any]]) -> str:
    """results.md of a bench whose Flower section holds the runs ``fl``."""
    r = fake_header(
        ours=demo_runs.ours_for_flower(fake_runs()),
        flower=flower.summarize(fl, "flower"),
        flower_head=flower.summarize(fl, "flower_head"),
    )
    return to_markdown(r)


def test_to_markdown_says_flower_chose_on_validation_and_shows_the_peek_apart() -> None:
    md = _flower_markdown(fake_flower_runs())
    assert "the best mean accuracy on the clients' validation splits" in md
    assert "best on the test split, which favours Flower" not in md
    assert (
        "flower: chosen on validation; at that round, test balanced accuracy 60.0 (50.0-70.0), "
        "macro F1 50.0 (40.0-60.0), validation accuracy 75.0 (65.0-85.0)" in md
    )
    assert (
        "flower, test-selected for reference only (favours Flower): mean acc 80.0 (70.0-90.0) "
        "at rounds [6, 7, 8]" in md
    )


def test_to_markdown_of_results_stored_by_the_earlier_protocol_says_they_chose_on_test() -> None:
    fl = [
        {
            "flower": fake_old_flower_seed(s, 0.7),
            "flower_head": fake_old_flower_seed(s, 0.5),
            "seed": s,
        }
        for s in SEEDS
    ]
    md = _flower_markdown(fl)
    assert "is the best on the test split, which favours Flower" in md
    assert "test-selected" not in md and "balanced accuracy" not in md


def test_to_markdown_flower_block_without_flower_results_shows_only_ours() -> None:
    """The Flower section failed: the block has ``ours`` alone (as ``_demos`` leaves it)."""
    r = fake_header(
        ours=demo_runs.ours_for_flower(fake_runs()),
        neu_det_flower={"ours": demo_runs.ours_for_flower([fake_run(0)])},
        errors={"flower elpv": "RuntimeError: flwr is not installed"},
    )
    md = to_markdown(r)
    assert "## 6. Against Flower (elpv)" in md
    assert "## 6. Against Flower (NEU-DET)" in md
    assert "Flower FedAvg" not in md
    assert "rounds to reach" not in md
    assert "- flower elpv: RuntimeError: flwr is not installed" in md


def test_to_markdown_lists_reruns() -> None:
    rerun = {
        "sections": ["wire"],
        "at": "2024-01-02T00:00:00+00:00",
        "machine": {"load_average_at_start": [1.5, 1.0, 0.5]},
    }
    md = to_markdown(fake_header(reruns=[rerun]))
    assert "- sections ['wire'] rerun at 2024-01-02T00:00:00+00:00 (load average then [1.5" in md


def test_to_markdown_shows_the_grid_points_of_an_unfinished_flower_seed() -> None:
    point = {"accuracy": {"mean": 0.8123}, "best_round": 7, "rounds_run": 11}
    point["selection"] = "validation"
    old = {"accuracy": {"mean": 0.7}, "best_round": 2, "rounds_run": 6}  # earlier protocol
    points = {"1:0.001": point, "3:0.001": old}
    md = to_markdown(fake_header(flower_partial={"elpv": {"0": {"flower": points}}}))
    assert "## Flower, seeds still running (resume with --only flower --resume)" in md
    assert (
        "- elpv seed 0, flower, (local epochs, lr) 1:0.001: mean test accuracy 81.2% at "
        "round 7 of 11, chosen on validation" in md
    )
    assert (
        "(local epochs, lr) 3:0.001: mean test accuracy 70.0% at round 2 of 6, chosen on test" in md
    )


def test_to_markdown_names_the_blocks_flower_trained() -> None:
    fl = fake_flower_runs()
    for run in fl:
        run["flower"]["trained_from"] = "b15"
    md = _flower_markdown(fl)
    assert any(line.startswith("| Flower FedAvg, b15+ and head |") for line in md.splitlines())
    assert "b11+" not in md


def test_to_markdown_shows_majority_balanced_accuracy_and_macro_f1_beside_accuracy() -> None:
    md = to_markdown(fake_header(accuracy={"elpv": demo_runs.accuracy_table(fake_runs())}))
    assert "always answering each edge's most frequent class (mean): 70.0 (70.0-70.0)" in md
    assert "| balanced accuracy | 35.0 (20.0-35.0) | 45.0 (45.0-45.0) | 40.0 (30.0-80.0) | " in md
    assert "| macro F1 | 40.0 (25.0-40.0) |" in md
