"""``bench.run``: sections, reruns and resumes of ``python -m bench`` into one
results.json, with every section faked (fixture ``no_heavy_work``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from bench import demo_runs, flower, wire
from bench import run as bench_run
from bench.report import to_markdown
from tests.bench.synthetic import (
    SEEDS,
    fake_flower_runs,
    fake_header,
    fake_run,
    fake_runs,
    recording_demos,
    results_dir_with_header,
)


@pytest.mark.usefixtures("no_heavy_work")
@pytest.mark.parametrize("only", [["nope"], ["wire", "accuracy"], ["demo"]])
def test_run_bench_rejects_unknown_sections_before_running_any(
    tmp_path: Path, only: list[str]
) -> None:
    with pytest.raises(ValueError, match="unknown sections") as err:
        bench_run.run_bench(True, tmp_path / "out", only=only)
    bad = sorted(set(only) - set(bench_run.SECTIONS))
    assert str(bad) in str(err.value)
    assert "extraction" in str(err.value)  # the valid choices are listed
    assert not (tmp_path / "out" / "results.json").exists()
    assert not (tmp_path / "out" / "results.md").exists()


@pytest.mark.usefixtures("no_heavy_work")
def test_run_bench_unknown_section_leaves_existing_results_untouched(tmp_path: Path) -> None:
    before = json.dumps(fake_header(errors={"wire": "OSError: x"})) + "\n"
    (tmp_path / "results.json").write_text(before)
    with pytest.raises(ValueError):
        bench_run.run_bench(True, tmp_path, only=["wire", "bogus"])
    assert (tmp_path / "results.json").read_text() == before


@pytest.mark.usefixtures("no_heavy_work")
def test_run_bench_rerun_replaces_only_the_named_section(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--only wire`` into an existing results.json: the other sections and errors stay."""
    measured = [{"name": "edge-1", "n_train": 1, "uploaded": 2, "downloaded": 3, "raw_images": 4}]
    old = fake_header(
        extraction=None,
        wire={"old": True, "measured_in_demo": measured},
        errors={"extraction": "RuntimeError: boom", "wire": "OSError: old failure"},
    )
    (tmp_path / "results.json").write_text(json.dumps(old))
    new_wire = {
        "raw_bytes_per_image": 100.0,
        "upload_bytes_per_image": {"int8": 10.0},
        "ratio": {"int8": 0.1},
        "download_bytes_per_cycle": {
            "first_cycle": 3,
            "later_cycles": 1,
            "full_model": 2,
            "delta": 1,
            "changed_tensors": 1,
            "total_tensors": 9,
            "without_delta_first_cycle": 4,
        },
    }
    monkeypatch.setattr(wire, "run", lambda quick: dict(new_wire))

    results = bench_run.run_bench(True, tmp_path, only=["wire"])

    assert results["errors"] == {"extraction": "RuntimeError: boom"}
    assert "old" not in results["wire"]
    assert results["wire"]["ratio"] == {"int8": 0.1}
    assert results["wire"]["measured_in_demo"] == measured  # kept from the demo run
    assert [r["sections"] for r in results["reruns"]] == [["wire"]]
    assert "total_seconds" not in results
    assert json.loads((tmp_path / "results.json").read_text()) == results
    md = (tmp_path / "results.md").read_text()
    assert "| int8 | 10 | 0.1000 |" in md
    assert "- extraction: RuntimeError: boom" in md
    assert "old failure" not in md


@pytest.mark.usefixtures("no_heavy_work")
def test_run_bench_rerun_of_demos_clears_their_old_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = fake_header(errors={"demo elpv": "RuntimeError: old", "flower elpv": "RuntimeError: old"})
    (tmp_path / "results.json").write_text(json.dumps(old))
    monkeypatch.setattr(demo_runs, "datasets", lambda: (["elpv"], []))
    monkeypatch.setattr(
        demo_runs, "run_demos", lambda ds, quick, seeds: [fake_run(s) for s in seeds]
    )
    fl = {s: r for s, r in zip(SEEDS, fake_flower_runs(), strict=True)}
    monkeypatch.setattr(flower, "run", lambda quick, ds, seed, target, *_: fl[seed])

    results = bench_run.run_bench(True, tmp_path, only=["demos"], seeds=3)

    assert results["accuracy"]["elpv"]["seeds"] == [0, 1, 2]  # the rerun itself worked
    assert not results.get("errors")


@pytest.mark.usefixtures("no_heavy_work")
def test_run_bench_flower_alone_compares_with_the_saved_demo_results(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "results.json").write_text(json.dumps(fake_header()))
    monkeypatch.setattr(demo_runs, "datasets", lambda: (["elpv"], []))
    monkeypatch.setattr(
        demo_runs, "run_demos", lambda ds, quick, seeds: [fake_run(s) for s in seeds]
    )
    first = bench_run.run_bench(True, tmp_path, only=["demos"], seeds=3)
    assert "flower" not in first and first["ours"]["seeds"] == [0, 1, 2]
    monkeypatch.setattr(demo_runs, "run_demos", None)  # calling it would fail the test
    asked: list[tuple[int, float]] = []
    fl = {s: r for s, r in zip(SEEDS, fake_flower_runs(), strict=True)}

    def fake_flower(
        quick: bool, ds: str, seed: int, target: float, grids: Any = None, *_: Any
    ) -> dict[str, Any]:
        asked.append((seed, target))
        return fl[seed]

    monkeypatch.setattr(flower, "run", fake_flower)
    results = bench_run.run_bench(True, tmp_path, only=["flower"])
    target = first["ours"]["accuracy"]["mean"]["median"]
    assert asked == [(0, target), (1, target), (2, target)]  # our seeds, our mean
    assert results["flower"]["rounds_to_reach_ours"] == [2, None, 5]
    # and each seed beside our cycle on the same seed, from the stored demo runs
    same = results["same_seed"]
    assert [(row["seed"], row["ours"]["mean"]) for row in same] == [(0, 0.9), (1, 0.5), (2, 0.4)]
    assert [row["flower"]["points_above_ours"] for row in same] == [-10.0, 10.0, 30.0]
    assert results["accuracy"] == first["accuracy"]  # the demos' results are kept
    md = (tmp_path / "results.md").read_text()
    assert (
        "flower: rounds to reach the median of our means (all seeds), per seed: [2, None, 5]" in md
    )


@pytest.mark.usefixtures("no_heavy_work")
def test_run_bench_flower_without_demo_results_says_so_and_runs_nothing(tmp_path: Path) -> None:
    (tmp_path / "results.json").write_text(json.dumps(fake_header()))
    results = bench_run.run_bench(True, tmp_path, only=["flower"])
    assert "run the demos section first" in results["errors"]["flower elpv"]
    assert "flower" not in results


@pytest.mark.usefixtures("no_heavy_work")
def test_an_interrupted_bench_keeps_the_datasets_it_finished(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "results.json").write_text(json.dumps(fake_header()))
    monkeypatch.setattr(demo_runs, "datasets", lambda: (["elpv", "/data/neu-det"], []))

    def demos(ds: str, quick: bool, seeds: list[int]) -> list[dict[str, Any]]:
        if ds != "elpv":
            raise KeyboardInterrupt  # Ctrl-C an hour into the second dataset
        return [fake_run(s) for s in seeds]

    monkeypatch.setattr(demo_runs, "run_demos", demos)
    with pytest.raises(KeyboardInterrupt):
        bench_run.run_bench(False, tmp_path, only=["demos"], seeds=1)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["accuracy"]["elpv"]["seeds"] == [0]
    assert saved["ours"]["seeds"] == [0]


@pytest.mark.usefixtures("no_heavy_work")
def test_resume_runs_only_the_missing_seeds_and_tables_cover_them_all(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    results_dir_with_header(tmp_path, monkeypatch)
    asked = recording_demos(monkeypatch)
    bench_run.run_bench(True, tmp_path, only=["demos"], seeds=1)
    assert asked == [("elpv", 0)]

    results = bench_run.run_bench(True, tmp_path, only=["demos"], seeds=3, resume=True)

    assert asked == [("elpv", 0), ("elpv", 1), ("elpv", 2)]  # seed 0 was not run again
    assert [r["seed"] for r in results["demo_runs"]["elpv"]] == [0, 1, 2]
    assert results["accuracy"]["elpv"]["seeds"] == [0, 1, 2]
    # each run remembers the commit it ran at (the header's, as _machine is stubbed)
    assert [r["bench_commit"] for r in results["demo_runs"]["elpv"]] == ["abc123"] * 3
    with_commit = [r | {"bench_commit": "abc123"} for r in fake_runs()]
    assert results["accuracy"]["elpv"] == demo_runs.accuracy_table(with_commit)
    assert results["ours"]["seeds"] == [0, 1, 2]
    assert results["reruns"][-1]["resume"] is True


@pytest.mark.usefixtures("no_heavy_work")
def test_each_finished_seed_is_saved_before_the_next_one_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    results_dir_with_header(tmp_path, monkeypatch)
    recording_demos(monkeypatch, fail_on=2)
    with pytest.raises(KeyboardInterrupt):
        bench_run.run_bench(False, tmp_path, only=["demos"], seeds=3)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [r["seed"] for r in saved["demo_runs"]["elpv"]] == [0, 1]
    assert saved["accuracy"]["elpv"]["seeds"] == [0, 1]

    asked = recording_demos(monkeypatch)
    done = bench_run.run_bench(False, tmp_path, only=["demos"], seeds=3, resume=True)
    assert asked == [("elpv", 2), ("elpv", 0)]  # the missing seed, then the quick cycle demo
    assert done["accuracy"]["elpv"]["seeds"] == [0, 1, 2]


@pytest.mark.usefixtures("no_heavy_work")
def test_without_resume_a_demos_rerun_replaces_the_old_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = fake_run(0) | {"marker": "old"}
    results_dir_with_header(tmp_path, monkeypatch, demo_runs={"elpv": [old]})
    asked = recording_demos(monkeypatch)
    results = bench_run.run_bench(True, tmp_path, only=["demos"], seeds=1)
    assert asked == [("elpv", 0)]
    assert [r.get("marker") for r in results["demo_runs"]["elpv"]] == [None]


@pytest.mark.usefixtures("no_heavy_work")
def test_dataset_choice_leaves_the_other_datasets_results_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    results_dir_with_header(tmp_path, monkeypatch, ("elpv", "/data/neu-det"))
    asked = recording_demos(monkeypatch)
    first = bench_run.run_bench(True, tmp_path, only=["demos"], seeds=1)
    assert asked == [("elpv", 0), ("/data/neu-det", 0)]

    results = bench_run.run_bench(True, tmp_path, only=["demos"], seeds=2, datasets=["neu-det"])

    assert asked[2:] == [("/data/neu-det", 0), ("/data/neu-det", 1)]
    assert results["demo_runs"]["elpv"] == first["demo_runs"]["elpv"]
    assert results["accuracy"]["elpv"] == first["accuracy"]["elpv"]
    assert results["ours"] == first["ours"]
    assert results["accuracy"]["neu-det"]["seeds"] == [0, 1]
    assert results["neu_det_flower"]["ours"]["seeds"] == [0, 1]
    assert results["reruns"][-1]["datasets"] == ["neu-det"]


@pytest.mark.usefixtures("no_heavy_work")
def test_new_runs_of_ours_drop_the_stale_flower_comparison(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    results_dir_with_header(tmp_path, monkeypatch)
    recording_demos(monkeypatch)
    bench_run.run_bench(True, tmp_path, only=["demos"], seeds=1)
    fl = {s: r for s, r in zip(SEEDS, fake_flower_runs(), strict=True)}
    monkeypatch.setattr(flower, "run", lambda quick, ds, seed, target, *_: fl[seed])
    assert "flower" in bench_run.run_bench(True, tmp_path, only=["flower"])

    again = bench_run.run_bench(True, tmp_path, only=["demos"], seeds=1, resume=True)
    assert "flower" in again  # nothing new ran: the comparison still holds
    more = bench_run.run_bench(True, tmp_path, only=["demos"], seeds=2, resume=True)
    assert "flower" not in more and "flower_head" not in more


@pytest.mark.usefixtures("no_heavy_work")
def test_flower_runs_on_todays_plan_outlive_a_rerun_of_our_demos(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A seed of Flower takes hours and does not depend on our cycle's settings: a rerun
    of our demos keeps Flower's runs made on today's plan, compares them with the new
    runs, and drops the ones made on another plan."""
    results_dir_with_header(tmp_path, monkeypatch)
    asked = recording_demos(monkeypatch)
    bench_run.run_bench(True, tmp_path, only=["demos"], seeds=3)
    monkeypatch.setattr(flower, "seed_plan", lambda quick, ds, seed: f"plan of seed {seed}")
    monkeypatch.setattr(flower, "plan_tag", lambda plan: plan)
    runs = fake_flower_runs()
    for run, plan in zip(runs, ["plan of seed 0", "plan of seed 1", "an older plan"], strict=True):
        run["plan"] = plan
    fl = {r["seed"]: r for r in runs}
    monkeypatch.setattr(flower, "run", lambda quick, ds, seed, target, *_: fl[seed])
    before = bench_run.run_bench(True, tmp_path, only=["flower"])
    assert before["flower"]["rounds_to_reach_ours"] == [2, None, 5]
    monkeypatch.setattr(flower, "run", None)  # calling it would fail the test

    again = bench_run.run_bench(True, tmp_path, only=["demos"], seeds=3)

    assert asked == [("elpv", s) for s in (0, 1, 2)] * 2  # ours ran again, not resumed
    assert [r["seed"] for r in again["flower_runs"]["elpv"]] == [0, 1]
    assert again["flower"]["accuracy"]["mean"]["runs"] == 2
    assert [row["seed"] for row in again["same_seed"]] == [0, 1]
    # reached again against our new median (0.5): each one's first round, 0.8 and 0.6
    assert again["flower"]["rounds_to_reach_ours"] == [1, 1]


@pytest.mark.usefixtures("no_heavy_work")
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"datasets": ["mnist"]}, "unknown datasets ['mnist']"),
        ({"resume": True}, "use it with --only demos or --only flower"),
        ({"resume": True, "only": ["wire"]}, "use it with --only demos or --only flower"),
    ],
)
def test_run_bench_rejects_bad_dataset_and_resume_choices(
    tmp_path: Path, kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError) as err:
        bench_run.run_bench(True, tmp_path, **kwargs)
    assert message in str(err.value)
    assert not (tmp_path / "results.json").exists()


def test_accuracy_table_says_how_references_were_trained_and_at_which_commits() -> None:
    runs = [fake_run(0) | {"references": "full", "bench_commit": "b2"}, fake_run(1)]
    runs[1] |= {"references": "pooled", "bench_commit": "a1"}
    table = demo_runs.accuracy_table(runs)
    assert table["references"] == ["full", "pooled"]
    assert table["commits"] == ["a1", "b2"]
    md = to_markdown(fake_header(accuracy={"elpv": table}))
    assert "references trained full, pooled; runs at commits a1, b2" in md


@pytest.mark.usefixtures("no_heavy_work")
def test_a_dataset_asked_for_by_name_but_absent_fails_before_anything_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(demo_runs, "datasets", lambda: (["elpv"], ["NEU-DET skipped: /x absent"]))
    before = json.dumps(fake_header()) + "\n"
    (tmp_path / "results.json").write_text(before)
    with pytest.raises(ValueError, match=r"\['neu-det'\] are not available: NEU-DET skipped"):
        bench_run.run_bench(False, tmp_path, only=["demos"], datasets=["neu-det"], resume=True)
    assert (tmp_path / "results.json").read_text() == before


@pytest.mark.usefixtures("no_heavy_work")
def test_an_absent_dataset_that_was_not_asked_for_is_not_noted_as_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    results_dir_with_header(tmp_path, monkeypatch)
    skipped = "NEU-DET skipped: /x absent"
    monkeypatch.setattr(demo_runs, "datasets", lambda: (["elpv"], [skipped]))
    recording_demos(monkeypatch)
    chosen = bench_run.run_bench(True, tmp_path, only=["demos"], seeds=1, datasets=["elpv"])
    assert skipped not in chosen["notes"]
    every = bench_run.run_bench(True, tmp_path, only=["demos"], seeds=1)
    assert skipped in every["notes"]


@pytest.mark.usefixtures("no_heavy_work")
def test_the_limit_is_a_section_of_the_bench_and_of_its_page(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``python -m bench --only limit`` keeps bench.limit's results under ``limit`` (where
    ``stage3.achieved_over_peak`` is judged) and renders them on the bench's page."""
    from bench import limit

    measured = json.loads((limit.RESULTS / "results.json").read_text())
    monkeypatch.setattr(limit, "section", lambda quick: measured)
    (tmp_path / "results.json").write_text(json.dumps(fake_header()))

    results = bench_run.run_bench(False, tmp_path, only=["limit"])

    saved = json.loads((tmp_path / "results.json").read_text())
    assert (
        saved["limit"]["stage3"]["achieved_over_peak"] == measured["stage3"]["achieved_over_peak"]
    )
    assert results["limit"] == measured
    assert "## The limit" in (tmp_path / "results.md").read_text()
