"""docs/benchmarks.md and the README's results block are generated from
bench/results/*/results.json and cannot drift."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from bench import docs


def test_the_committed_page_is_what_the_results_give() -> None:
    assert docs.main(["--check"]) == 0, "run `python -m bench.docs` and commit the page"


def _results_with(tmp_path: Path, directory: str, change: Callable[[dict], None]) -> Path:
    """A copy of bench/results whose ``directory``'s results.json went through ``change``."""
    results = tmp_path / "results"
    shutil.copytree(docs.RESULTS, results)
    path = results / directory / "results.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))
    return results


def test_a_changed_figure_changes_the_page_and_fails_the_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    results = _results_with(tmp_path, "stage2", lambda data: data.update(seconds=123456.0))

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


def test_a_changed_full_result_makes_the_readme_check_fail(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    centralized = {"median": 0.9876, "min": 0.9, "max": 0.99}
    results = _results_with(
        tmp_path, "full", lambda data: data["accuracy"]["elpv"].update(centralized=centralized)
    )

    assert "98.8 (90.0-99.0)" in docs.render_readme(docs.README.read_text(), results)
    monkeypatch.setattr(docs, "RESULTS", results)
    monkeypatch.setattr(docs, "PAGE", tmp_path / "benchmarks.md")
    (tmp_path / "benchmarks.md").write_text(docs.render_page(results))
    assert docs.main(["--check"]) == 1
