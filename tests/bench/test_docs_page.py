"""docs/benchmarks.md is generated from bench/results/*/results.json and cannot drift."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from bench import docs


def test_the_committed_page_is_what_the_results_give() -> None:
    assert docs.main(["--check"]) == 0, "run `python -m bench.docs` and commit the page"


def test_a_changed_figure_changes_the_page_and_fails_the_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    results = tmp_path / "results"
    shutil.copytree(docs.RESULTS, results)
    path = results / "stage2" / "results.json"
    data = json.loads(path.read_text())
    data["seconds"] = 123456.0
    path.write_text(json.dumps(data))

    page = docs.render_page(results)

    assert "123456 s" in page
    assert page != docs.render_page()
    monkeypatch.setattr(docs, "RESULTS", results)
    assert docs.main(["--check"]) == 1


def test_every_results_directory_is_a_section_in_a_fixed_order(tmp_path: Path) -> None:
    results = tmp_path / "results"
    shutil.copytree(docs.RESULTS, results)
    shutil.copytree(results / "stage2", results / "another-stage2")

    page = docs.render_page(results)

    titles = [line for line in page.splitlines() if line.startswith("## ")]
    names = [t.removeprefix("## ").split(":")[0] for t in titles]
    known = [n for n in docs.ORDER if (results / n / "results.json").exists()]
    assert "full" in known and "stage2" in known
    assert names == [*known, "another-stage2"]
    assert "bench/results/reading.md" in page


def test_a_results_file_nothing_can_render_is_named(tmp_path: Path) -> None:
    results = tmp_path / "results"
    (results / "odd").mkdir(parents=True)
    (results / "reading.md").write_text("reading")
    (results / "odd" / "results.json").write_text(json.dumps({"what": 1}))

    with pytest.raises(ValueError, match=r"odd/results.json: no renderer"):
        docs.render_page(results)
