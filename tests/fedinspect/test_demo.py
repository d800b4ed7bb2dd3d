"""``fedinspect demo``: the plan, the table and report, and a whole quick run."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from edge_service.config import Settings as EdgeSettings
from fedinspect.demo import DemoOptions, plan_demo, run_demo, served_metrics
from fedinspect.launcher import child_env, settings_from_env
from fedinspect.report import NOT_DEPLOYED, format_table, write_report
from fl_core.data import load_dataset_spec
from server_service.config import Settings as ServerSettings
from tests.factories import cycle_job_result, eval_metrics, make_image_folder

pytest.importorskip("elpv_dataset")


def _paths(spec: str) -> set[Path]:
    return {r.path for r in load_dataset_spec(spec).records}


def test_default_plan_is_non_iid_and_disjoint() -> None:
    plan = plan_demo(DemoOptions(edges=3))
    parts = [load_dataset_spec(s) for s in plan.edge_specs]
    assert [{r.attr("type") for r in p.records} for p in parts] == [
        {"mono"},
        {"poly"},
        {"mono", "poly"},
    ]
    paths = [{r.path for r in p.records} for p in parts]
    assert sum(map(len, paths)) == len(set().union(*paths)) == 2624
    assert plan.input_size == 300  # elpv's own size
    assert plan_demo(DemoOptions(edges=3, input_size=224)).input_size == 224


@pytest.mark.parametrize(("cores", "edges", "threads"), [(2, 3, 1), (8, 3, 2), (16, 2, 8)])
def test_edges_share_the_machines_cores(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, cores: int, edges: int, threads: int
) -> None:
    monkeypatch.setattr("fedinspect.demo.usable_cores", lambda: cores)
    plan = plan_demo(DemoOptions(edges=edges, quick=True))
    settings = plan.edge_settings(
        0,
        "edge-1",
        "e1",
        ("server-token-0123456789", "edge-admin-token-0123456789"),
        "http://127.0.0.1:1",
        1,
        tmp_path,
    )
    assert settings.threads == threads
    env = child_env(settings)
    assert env["FEDINSPECT_EDGE_THREADS"] == str(threads)
    assert settings_from_env(EdgeSettings, env).threads == threads


def test_quick_plan_is_small_and_disjoint() -> None:
    plan = plan_demo(DemoOptions(edges=3, quick=True))
    paths = [_paths(s) for s in plan.edge_specs]
    assert [len(p) for p in paths] == [120, 120, 60]
    assert len(set().union(*paths)) == 300
    assert plan.input_size == 96


def test_other_edge_counts_and_image_folders(tmp_path: Path) -> None:
    plan = plan_demo(DemoOptions(edges=2, quick=True))
    assert len(plan.edge_specs) == 2
    root = make_image_folder(tmp_path / "imgs", per_class=10)
    plan = plan_demo(DemoOptions(edges=2, dataset=str(root)))
    assert plan.class_names == ["bright", "dark"]
    paths = [_paths(s) for s in plan.edge_specs]
    assert not paths[0] & paths[1] and len(paths[0] | paths[1]) == 20
    assert plan.input_size is None  # an image folder runs at the backbone's own size


def _fake_results() -> dict[str, Any]:
    scores = {"accuracy": 0.8, "macro_f1": 0.75}
    edge = {
        "name": "edge-1",
        "n_train": 10,
        "n_test": 5,
        "majority": 0.6,
        "local_only": scores,
        "base": scores,
        "server_model": scores,
        "federated": {"accuracy": 0.9, "macro_f1": 0.85},
        "federated_confusion": [[3, 0], [1, 1]],
        "bytes": {"uploaded": 5000, "downloaded": 1_000_000, "raw_images": 2_000_000},
        "stage_seconds": {"extract": 1.0, "finetune": 2.0},
    }
    return {
        "dataset": "elpv",
        "quick": True,
        "seed": 0,
        "input_size": 96,
        "backbone": "efficientnet_lite0",
        "class_names": ["functional", "defective"],
        "edges": [edge, edge | {"name": "edge-2"}],
        "centralized": scores,
        "mean_federated_accuracy": 0.9,
        "cycle": {"id": 1, "model_version": 2, "seconds": 12.0},
        "references_seconds": 3.0,
        "total_seconds": 20.0,
    }


def test_table_and_report(tmp_path: Path) -> None:
    results = _fake_results()
    table = format_table(results)
    assert "| edge-1 | 10 | 5 | 60.0 | 80.0 / 75.0 | 80.0 / 75.0 | 80.0 / 75.0 | 90.0 / 85.0 |" in (
        table
    )
    assert "majority: always answering the edge's most frequent training class" in table
    assert "centralized upper bound: accuracy 80.0" in table
    # how many test images each figure rests on, and what one image is worth
    assert "every figure of a row is on that edge's own test images" in table
    assert "One test image is worth 20.0 points on the smallest test split (5 images)" in table
    assert "on 10 test images (all edges' test splits" in table
    report = write_report(results, tmp_path / "report")
    assert table in report.read_text()
    for png in ("accuracy.png", "confusion.png"):
        assert (tmp_path / "report" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_federated_figure_is_the_deployed_models() -> None:
    metrics = {"candidate": eval_metrics(0.1), "deployed": eval_metrics(0.9)}
    served = cycle_job_result(metrics=metrics, chosen="previous")
    assert served_metrics(served) == (eval_metrics(0.9), "previous")
    # nothing serves: the candidate's, marked
    none = cycle_job_result(metrics=metrics | {"deployed": None}, chosen=None)
    assert served_metrics(none) == (eval_metrics(0.1), NOT_DEPLOYED)
    results = _fake_results()
    results["edges"][1] = results["edges"][1] | {"federated_model": NOT_DEPLOYED}
    table = format_table(results)
    row = "| 60.0 | 80.0 / 75.0 | 80.0 / 75.0 | 80.0 / 75.0 | 90.0 / 85.0"
    assert f"| edge-2 | 10 | 5 {row} * |" in table
    assert f"| edge-1 | 10 | 5 {row} |" in table
    assert "* nothing deployed on that edge" in table


@pytest.mark.slow
@pytest.mark.timeout(1800)  # about 3 minutes on 2 idle cores; far longer when they are shared
def test_quick_demo_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "out.json"
    done = subprocess.run(
        [sys.executable, "-m", "fedinspect", "demo", "--edges", "3", "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=1700,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    results = json.loads(out.read_text())
    assert len(results["edges"]) == 3
    for edge in results["edges"]:
        assert {"name", "n_train", "n_test", "local_only", "base", "federated"} <= set(edge)
        for model in ("local_only", "base", "federated"):
            assert 0.0 <= edge[model]["accuracy"] <= 1.0
            assert 0.0 <= edge[model]["macro_f1"] <= 1.0
        assert edge["n_train"] > 0 and edge["n_test"] > 0
    assert set(results["centralized"]) >= {"accuracy", "macro_f1"}
    # the default cycle: the head (version 2), then one version per federated round
    rounds = ServerSettings.model_fields["rounds"].default
    assert results["cycle"]["rounds"] == rounds > 0
    assert results["cycle"]["model_version"] == 2 + rounds and results["cycle"]["seconds"] > 0
    assert all(len(edge["rounds"]) == rounds for edge in results["edges"])
    assert f"federated rounds: {rounds};" in done.stdout
    wire = results["bytes"]
    # the features sent are smaller than the images; the rounds' updates come on top
    sent_in_rounds = sum(rr["bytes_uploaded"] for edge in results["edges"] for rr in edge["rounds"])
    assert 0 < sent_in_rounds < wire["uploaded"]
    assert wire["uploaded"] - sent_in_rounds < wire["raw_images"]
    assert wire["downloaded"] > 0
    assert "centralized upper bound" in done.stdout
    # the logs folder the first line pointed to is still there to read
    kept = re.search(r"process logs kept in (\S+)", done.stderr)
    assert kept is not None, done.stderr[-2000:]
    logs = Path(kept.group(1))
    assert sorted(p.name for p in logs.glob("*.log"))[:1] == ["edge-1.log"]
    assert not [p for p in logs.parent.iterdir() if p.name != "logs"]
    shutil.rmtree(logs.parent)


def test_unknown_reference_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="references must be one of"):
        plan_demo(DemoOptions(edges=3, references="none"))


def _fake_cycle(names: list[str]) -> dict[str, Any]:
    # the gate chose the server's model over the fine-tuned one: it is what serves
    result = cycle_job_result(cycle_id=1)
    return {
        "edges": [{"name": n} for n in names],
        "results": {n: result for n in names},
        "cycle": {
            "id": 1,
            "result_model_version": 2,
            "metrics": None,
            "round": 0,
            "round_versions": [2],
            "reason": None,
        },
        "seconds": 12.0,
    }


def _demo_without_cycle(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **patches: Any
) -> DemoOptions:
    """run_demo's options on a small image folder, its cycle faked (no processes) and
    ``patches`` applied to fedinspect.demo."""
    import fedinspect.demo as demo

    root = make_image_folder(tmp_path / "imgs", per_class=12)
    monkeypatch.setattr(demo, "run_cycle", lambda plan, work, procs: _fake_cycle(["e1", "e2"]))
    for name, value in patches.items():
        monkeypatch.setattr(demo, name, value)
    return DemoOptions(edges=2, dataset=str(root), json_path=tmp_path / "out.json", input_size=32)


def _raises(exc: BaseException) -> Any:
    def fail(*args: Any, **kwargs: Any) -> None:
        raise exc

    return fail


def test_interrupted_references_keep_the_cycles_results(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cycle's table and JSON are written before the (long) references start."""
    options = _demo_without_cycle(
        tmp_path, monkeypatch, train_reference=_raises(KeyboardInterrupt())
    )
    with pytest.raises(KeyboardInterrupt):
        run_demo(options)
    assert options.json_path is not None
    saved = json.loads(options.json_path.read_text())
    assert saved["references"] == "pending" and saved["centralized"] is None
    assert [e["federated"]["accuracy"] for e in saved["edges"]] == [0.75, 0.75]
    assert [e["federated_model"] for e in saved["edges"]] == ["server_model", "server_model"]
    # the fine-tuned model the gate passed over, on the test split, and what it chose on
    assert [e["candidate"]["accuracy"] for e in saved["edges"]] == [0.7, 0.7]
    assert saved["edges"][0]["gate_validation"]["server_model"]["accuracy"] == 0.8
    assert saved["edges"][0]["gate_validation"]["candidate"]["accuracy"] == 0.7
    assert [e["majority"] for e in saved["edges"]] == [0.5, 0.5]  # the edge's own figure
    assert [e["local_only"] for e in saved["edges"]] == [None, None]
    assert saved["edges"][0]["finetune"] == {"epochs_run": 3, "best_epoch": 2}
    assert saved["cycle"]["seconds"] == 12.0 and saved["cycle"]["model_version"] == 2


def test_pooled_references_skip_fine_tuning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    options = _demo_without_cycle(
        tmp_path, monkeypatch, finetune=_raises(AssertionError("pooled must not fine-tune"))
    )
    options.references = "pooled"
    results = run_demo(options)
    assert options.json_path is not None
    saved = json.loads(options.json_path.read_text())
    assert saved == json.loads(json.dumps(results))
    assert saved["references"] == "pooled"
    assert all(0 <= e["local_only"]["accuracy"] <= 1 for e in saved["edges"])
    assert 0 <= saved["centralized"]["accuracy"] <= 1
    assert saved["references_seconds"] >= 0


def test_references_show_their_progress_stage_by_stage(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Full references take over an hour on all of elpv: each shows where it is."""
    options = _demo_without_cycle(tmp_path, monkeypatch)
    results = run_demo(options)
    assert results["references"] == "full"
    err = capsys.readouterr().err
    for name in ("local-only e1", "local-only e2", "centralized"):
        lines = [ln for ln in err.splitlines() if ln.startswith(f"{name}: ")]
        assert "stage 2: extracting features" in lines[0] and " 0% " in lines[0]
        assert any("stage 3: caching activations" in ln for ln in lines)
        assert any("stage 3: epoch 1/" in ln for ln in lines)
        assert lines[-1].endswith("100% done: done")
    # one line per stage, not one per batch of cached activations
    assert err.count("local-only e1: ") < 20


def test_pooled_references_run_each_image_through_the_lower_part_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Below the cut the base model and every stage-2 reference are one network: the
    base column, the local-only heads and the centralized head share its features."""
    import fedinspect.demo as demo

    seen: list[int] = []
    real = demo.extract_images

    def counted(model: Any, images: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append(len(images))
        return real(model, images, *args, **kwargs)

    options = _demo_without_cycle(tmp_path, monkeypatch, extract_images=counted)
    options.references = "pooled"
    results = run_demo(options)
    plan = demo.plan_demo(options)
    splits = [plan.split(s) for s in plan.edge_specs]
    assert sum(seen) == sum(len(s.train) + len(s.test) for s in splits)
    assert all(0 <= e["base"]["accuracy"] <= 1 for e in results["edges"])
    assert 0 <= results["centralized"]["accuracy"] <= 1
