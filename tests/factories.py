"""Factories for tiny images, datasets and models shared by the test packages."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from fl_core.schemas import ClassMetrics, CycleJobResult, EvalMetrics

NEU_DET = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "neu-det"


def make_image_folder(
    root: Path, per_class: int = 12, size: int = 40, classes: tuple[str, ...] = ("dark", "bright")
) -> Path:
    """An ImageFolder whose classes differ by brightness (learnable by a tiny CNN)."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(classes):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        base = 50 + 150 * c / max(1, len(classes) - 1)
        for i in range(per_class):
            pixels = np.clip(rng.normal(base, 25, (size, size)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{name}_{i:03d}.png")
    return root


def eval_metrics(
    accuracy: float = 0.75, class_names: Sequence[str] = ("bright", "dark"), n: int = 10
) -> EvalMetrics:
    """Metrics of a two-class model right ``accuracy`` of the time on ``n`` images."""
    per_class = [
        ClassMetrics(name=c, precision=accuracy, recall=accuracy, f1=accuracy, support=n // 2)
        for c in class_names
    ]
    right = round(accuracy * n / 2)
    return EvalMetrics(
        n=n,
        accuracy=accuracy,
        balanced_accuracy=accuracy,
        macro_f1=accuracy,
        per_class=per_class,
        confusion_matrix=[[right, n // 2 - right], [n // 2 - right, right]],
    )


def cycle_job_result(**overrides: Any) -> CycleJobResult:
    """A done cycle job's result, as an edge reports it: the gate chose the server's model
    over the fine-tuned one. ``overrides`` replace top-level fields and are validated."""
    values: dict[str, Any] = {
        "cycle_id": 1,
        "base_model_version": 1,
        "model_version": 2,
        "n_train": 6,
        "n_val": 2,
        "n_test": 4,
        "rows_uploaded": 6,
        "upload_sha256": "0" * 64,
        "bytes_uploaded": 100,
        "bytes_downloaded": 1000,
        "downloads": ["full", "delta"],
        "raw_train_bytes": 5000,
        "extract_backend": "torch",
        "metrics": {
            "server_model": eval_metrics(0.75),
            "candidate": eval_metrics(0.7),
            "previous": None,
            "deployed": eval_metrics(0.75),
            "validation": {"server_model": eval_metrics(0.8), "candidate": eval_metrics(0.7)},
        },
        "majority": {
            "class_name": "bright",
            "validation_accuracy": 0.5,
            "test_accuracy": 0.5,
            "n_scored": 2,
            "scored_on": "validation",
        },
        "finetune": {"epochs_run": 3, "best_epoch": 2},
        "chosen": "server_model",
        "deployed": True,
        "decision": "deployed the server model",
        "local_model_id": 1,
        "previous_model_id": None,
        "deployed_model_id": 2,
        "stage_seconds": {"extract": 1.0, "finetune": 2.0},
    }
    return CycleJobResult.model_validate(values | overrides)
