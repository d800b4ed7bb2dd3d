"""Factories for tiny images, datasets and models shared by the test packages."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

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
