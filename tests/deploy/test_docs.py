"""The generated settings table (docs/settings.md) is current."""

from __future__ import annotations

from pathlib import Path

from fedinspect.settings_doc import BEGIN, END, render

ROOT = Path(__file__).resolve().parents[2]


def test_settings_table_matches_the_settings_classes() -> None:
    text = (ROOT / "docs" / "settings.md").read_text()
    block = text[text.index(BEGIN) : text.index(END) + len(END)]
    assert block == render(), "run: python -m fedinspect.settings_doc --write docs/settings.md"


def test_every_setting_is_described() -> None:
    for line in render().splitlines():
        if line.startswith("| `FEDINSPECT_"):
            assert not line.rstrip().endswith("|  |"), line
