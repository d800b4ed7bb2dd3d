"""``--report DIR``: report.md with the demo's table and PNG plots."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and in CI
import matplotlib.pyplot as plt

MODELS = (("local_only", "local-only"), ("base", "base"), ("federated", "federated"))


def plot_accuracy(results: Mapping[str, Any], path: Path) -> None:
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
    from fedinspect.demo import format_table

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
