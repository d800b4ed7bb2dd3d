"""The README's results block: medians of the full bench, rewritten by ``bench.docs``."""

from __future__ import annotations

import pytest

from bench import demo_runs, flower, readme
from tests.bench.synthetic import fake_flower_runs, fake_header, fake_runs


def _results(with_flower: bool = True) -> dict:
    runs = fake_runs()
    for r in runs:
        r["bench_commit"] = "abc1234"
    fl = fake_flower_runs()
    extra = (
        {
            "flower": flower.summarize(fl, "flower"),
            "flower_head": flower.summarize(fl, "flower_head"),
        }
        if with_flower
        else {}
    )
    return fake_header(
        accuracy={"elpv": demo_runs.accuracy_table(runs)},
        ours=demo_runs.ours_for_flower(runs),
        cycle=demo_runs.cycle_stages(runs) | {"full_s": {"median": 20.0}},
        **extra,
    )


def test_the_block_leads_with_the_medians_of_every_reference() -> None:
    text = readme.block(_results())
    assert text.startswith(readme.BEGIN) and text.endswith(readme.END)
    assert "median (min-max) over seeds 0, 1, 2" in text
    assert "the defaults of commit abc1234" in text
    rows = {line.split(" | ")[0].strip("| "): line for line in text.splitlines() if "|" in line}
    # the runs' cycles had 3, 3 and 0 rounds
    fed = rows["federated: one cycle of 3 federated rounds, the model each edge deployed"]
    assert fed.split(" | ")[1:] == ["50.0 (40.0-90.0)", "40.0 (30.0-80.0)", "45.0 (35.0-85.0) |"]
    assert (
        "| 90.0 (85.0-95.0) |"
        in rows["centralized: every training image in one place, same recipe"]
    )
    assert "| 70.0 (70.0-70.0) |" in rows["always the edge's most frequent class"]
    assert "takes 20 s (median)" in text
    assert "its round chosen on validation: 70.0 (60.0-80.0)" in text


@pytest.mark.parametrize("rounds", [{"median": 0, "min": 0, "max": 0, "runs": 3}, 1])
def test_one_shot_runs_are_labelled_so(rounds: object) -> None:
    """Runs without rounds (1: from before the bench kept them) show a one-shot cycle and
    the server's stage-2 model."""
    results = _results()
    results["ours"]["rounds"] = rounds
    rows = [line.split(" | ")[0].strip("| ") for line in readme.block(results).splitlines()]
    assert "federated: a one-shot cycle, the model each edge deployed" in rows
    assert "the server's stage-2 model" in rows
    assert "the server's model after the last round" not in rows


def test_without_flower_runs_the_block_says_so() -> None:
    text = readme.block(_results(with_flower=False))
    assert "Flower's FedAvg has not been run against these runs yet." in text


def test_a_flower_grid_on_fewer_seeds_than_ours_is_shown_per_seed() -> None:
    """No median of one seed: the block names the seeds Flower has, beside ours there."""
    results = _results()
    results["demo_runs"] = {"elpv": fake_runs()}
    results["same_seed"] = [
        {"seed": 0, "ours": {"mean": 0.887}, "flower": {"mean": 0.8967}},
    ]
    text = readme.block(results)
    assert "so far on seed 0 only: 89.7 against ours' 88.7 there" in text
    results["same_seed"] *= 3
    assert "so far on seed" not in readme.block(results)


def test_without_a_full_bench_the_block_gives_the_command() -> None:
    assert "python -m bench --out bench/results/full" in readme.block({})


def test_replace_keeps_the_rest_of_the_readme_and_needs_the_markers() -> None:
    page = f"# Title\n\nintro\n\n{readme.BEGIN}\nold numbers\n{readme.END}\n\n## Next\n"
    out = readme.replace(page, readme.block({}))
    assert out.startswith("# Title\n\nintro\n\n" + readme.BEGIN)
    assert out.endswith(readme.END + "\n\n## Next\n")
    assert "old numbers" not in out
    with pytest.raises(ValueError, match="no results block"):
        readme.replace("# no block here\n", readme.block({}))


def test_the_fine_tuned_model_gets_a_row_where_the_runs_kept_it() -> None:
    runs = fake_runs()
    for r in runs:
        for e in r["edges"]:
            e["candidate"] = {"accuracy": 0.8}
    text = readme.block(fake_header(accuracy={"elpv": demo_runs.accuracy_table(runs)}))
    assert "| each edge's fine-tuned model, deployed or not | 80.0 (80.0-80.0) |" in text
    assert "deployed or not" not in readme.block(_results())
