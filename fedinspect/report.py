"""The demo's results as people read them: the per-edge table it prints, and with
``--report DIR`` report.md with that table and PNG plots.

Only reads the results dict ``fedinspect.demo.run_demo`` returns (or its JSON):
nothing here starts, trains or imports the demo. matplotlib (the ``demo`` extra) is
imported by the plots alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

#: ``federated_model`` of an edge where nothing serves: its figure is the candidate's
NOT_DEPLOYED = "candidate, not deployed"

MODELS = (("local_only", "local-only"), ("base", "base"), ("federated", "federated"))


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and in CI
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy(results: Mapping[str, Any], path: Path) -> None:
    plt = _pyplot()
    edges = results["edges"]
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(MODELS)
    for j, (key, label) in enumerate(MODELS):
        xs = [i + (j - 1) * width for i in range(len(edges))]
        ax.bar(xs, [100 * e[key]["accuracy"] for e in edges], width, label=label)
    ax.axhline(100 * results["centralized"]["accuracy"], color="k", ls="--", label="centralized")
    ax.set_xticks(range(len(edges)), [e["name"] for e in edges])
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(loc="lower right")
    ax.set_title("Per-edge test accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_confusions(results: Mapping[str, Any], class_names: list[str], path: Path) -> None:
    plt = _pyplot()
    edges = results["edges"]
    fig, axes = plt.subplots(1, len(edges), figsize=(3.2 * len(edges), 3.2), squeeze=False)
    for ax, e in zip(axes[0], edges, strict=True):
        cm = e["federated_confusion"]
        ax.imshow(cm, cmap="Blues")
        for i, row in enumerate(cm):
            for j, v in enumerate(row):
                ax.text(j, i, str(v), ha="center", va="center")
        ax.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right")
        ax.set_yticks(range(len(class_names)), class_names)
        ax.set_title(f"{e['name']} (federated)")
        ax.set_xlabel("predicted")
    axes[0][0].set_ylabel("true")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(results: Mapping[str, Any], out_dir: Path) -> Path:
    """Write report.md, accuracy.png and confusion.png into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_accuracy(results, out_dir / "accuracy.png")
    class_names = results.get("class_names") or [
        str(i) for i in range(len(results["edges"][0]["federated_confusion"]))
    ]
    plot_confusions(results, class_names, out_dir / "confusion.png")
    text = [
        "# FedInspect demo report",
        "",
        f"Dataset `{results['dataset']}`{' (quick)' if results['quick'] else ''}, "
        f"backbone {results['backbone']} at {results['input_size']} px, seed {results['seed']}.",
        "",
        format_table(results),
        "",
        "![per-edge accuracy](accuracy.png)",
        "",
        "![confusion matrices of the federated models](confusion.png)",
        "",
    ]
    path = out_dir / "report.md"
    path.write_text("\n".join(text))
    return path


def _pct(s: dict[str, float] | None, key: str = "accuracy") -> str:
    return "-" if s is None else f"{100 * s[key]:.1f}"


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f}"


def _mark(row: Mapping[str, Any]) -> str:
    return " *" if row.get("federated_model") == NOT_DEPLOYED else ""


def format_rounds(results: Mapping[str, Any]) -> str:
    """Per federated round, each edge's test accuracy / balanced accuracy / macro F1 of the
    model it trained that round from (round 1: the head's), then of the last round's
    aggregate (the stage 2 column); empty for a one-shot cycle."""
    edges = results["edges"]
    n = max((len(r.get("rounds") or []) for r in edges), default=0)
    if not n:
        return ""
    lines = [
        "| model | " + " | ".join(f"{r['name']} acc / bal / F1" for r in edges) + " |",
        "|---|" + "---:|" * len(edges),
    ]

    def cell(s: dict[str, float] | None) -> str:
        return f"{_pct(s)} / {_pct(s, 'balanced_accuracy')} / {_pct(s, 'macro_f1')}"

    for i in range(n):
        label = "head (round 1 trains it)" if i == 0 else f"after round {i}"
        cells = [cell(r["rounds"][i]["test"]) if i < len(r["rounds"]) else "-" for r in edges]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append(
        f"| after round {n} | " + " | ".join(cell(r["server_model"]) for r in edges) + " |"
    )
    up = sum(rr["bytes_uploaded"] for r in edges for rr in r["rounds"])
    lines.append(
        f"\nfederated rounds: {n}; updates sent {_mb(up)} MB in all; every figure on the "
        "edge's own test split, in %, before its stage 3 fine-tuning"
    )
    return "\n".join(lines)


def format_table(results: Mapping[str, Any]) -> str:
    """The per-edge table, as Markdown (readable in a terminal too)."""
    lines = [
        "| edge | train | test | majority | local-only acc / F1 | base acc / F1 "
        "| stage 2 acc / F1 | federated acc / F1 | up MB | down MB | raw MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results["edges"]:
        b = r["bytes"]
        majority = r.get("majority")
        lines.append(
            f"| {r['name']} | {r['n_train']} | {r['n_test']} "
            f"| {'-' if majority is None else f'{100 * majority:.1f}'} "
            f"| {_pct(r['local_only'])} / {_pct(r['local_only'], 'macro_f1')} "
            f"| {_pct(r['base'])} / {_pct(r['base'], 'macro_f1')} "
            f"| {_pct(r['server_model'])} / {_pct(r['server_model'], 'macro_f1')} "
            f"| {_pct(r['federated'])} / {_pct(r['federated'], 'macro_f1')}{_mark(r)} "
            f"| {_mb(b['uploaded'])} | {_mb(b['downloaded'])} | {_mb(b['raw_images'])} |"
        )
    if any(_mark(r) for r in results["edges"]):
        lines.append(
            "\n* nothing deployed on that edge: its federated figure is the fine-tuned "
            "candidate's, which does not serve"
        )
    n_tests = [r["n_test"] for r in results["edges"]]
    fewest = max(1, min(n_tests))
    lines.append(
        "\nlegend: train / test: images in the edge's splits; every figure of a row is on "
        "that edge's own test images (the test column), in %, accuracy / macro F1.\n"
        "majority: always answering the edge's most frequent training class, on its test "
        "split (the floor); local-only: trained on that edge's images alone; base: the "
        "model before the cycle; stage 2: the server's model; federated: the model the "
        "edge's gate deployed.\n"
        f"One test image is worth {100 / fewest:.1f} points on the smallest test split "
        f"({fewest} images): differences of that order between columns are noise."
    )
    c = results["centralized"]
    lines.append(
        f"\ncentralized upper bound: accuracy {_pct(c)}, macro F1 {_pct(c, 'macro_f1')}"
        f" on {sum(n_tests)} test images (all edges' test splits;"
        f" references: {results.get('references', 'full')})"
    )
    lines.append(f"mean federated accuracy: {100 * results['mean_federated_accuracy']:.1f}")
    cyc = results["cycle"]
    lines.append(
        f"cycle {cyc['id']} -> model v{cyc['model_version']} in {cyc['seconds']:.0f} s; "
        f"references {results['references_seconds'] or 0:.0f} s; "
        f"total {results['total_seconds']:.0f} s"
    )
    rounds = format_rounds(results)
    if rounds:
        lines.append("\n" + rounds)
    stages = results["edges"][0]["stage_seconds"]
    lines.append("stage seconds (edge-1): " + ", ".join(f"{k} {v:.1f}" for k, v in stages.items()))
    return "\n".join(lines)
