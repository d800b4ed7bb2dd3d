"""Shared fixtures of the hardening tests: a tiny ImageFolder for edges."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.factories import make_image_folder


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 tiny grey PNGs in two classes (dark, bright) at 32 px."""
    return make_image_folder(
        tmp_path_factory.mktemp("hardening-images"),
        per_class=20,
        size=32,
        classes=("dark", "bright"),
    )
