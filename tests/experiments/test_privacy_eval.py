"""``python -m experiments.privacy_eval``: its metrics, and a quick run on a small elpv subset
that writes results.json (keys and value ranges checked), results.md and a grid."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from experiments.privacy_eval import app, membership_auc, psnr, reid_top1, ssim
from fl_core.privacy import compute_stats

pytest.importorskip("elpv_dataset", reason="the elpv dataset is an optional extra")


def test_ssim_and_psnr_of_known_pairs() -> None:
    gen = torch.Generator().manual_seed(0)
    a = torch.rand(3, 1, 32, 32, generator=gen)
    assert torch.allclose(ssim(a, a), torch.ones(3), atol=1e-6)
    assert float(psnr(a, a).min()) > 100
    noisy = (a + 0.1 * torch.randn(a.shape, generator=gen)).clamp(0, 1)
    s = ssim(a, noisy)
    assert bool(((s > 0) & (s < 1)).all())
    # PSNR of additive noise of std 0.1 on [0, 1] images: about 20 dB
    assert 19 < float(psnr(a, noisy).mean()) < 22
    flat = torch.full_like(a, 0.5)
    assert float(ssim(a, flat).mean()) < 0.1


def test_reid_finds_each_image_among_the_others() -> None:
    gen = torch.Generator().manual_seed(0)
    originals = torch.rand(20, 1, 16, 16, generator=gen)
    close = originals + 0.05 * torch.randn(originals.shape, generator=gen)
    assert reid_top1(close, originals) == 1.0
    assert reid_top1(close.flip(0), originals) == 0.0


def test_membership_auc_sees_training_rows_that_shaped_the_factors() -> None:
    gen = torch.Generator().manual_seed(0)
    # few rows in many dimensions: the factors span the rows themselves
    rows, labels = torch.randn(65, 64, generator=gen), torch.arange(65) % 2
    others, other_labels = torch.randn(200, 64, generator=gen), torch.arange(200) % 2
    shaped = compute_stats(rows, labels, 2, rank=32)
    assert shaped.factors is not None and len(shaped.factors) == 2
    auc = membership_auc([shaped], rows, labels, [range(65)], others, other_labels)
    assert auc is not None and auc > 0.6
    diagonal = compute_stats(rows, labels, 2, rank=0)
    assert membership_auc([diagonal], rows, labels, [range(65)], others, other_labels) is None


@pytest.mark.slow
def test_quick_run_writes_results_in_range(tmp_path: Path) -> None:
    out = tmp_path / "privacy"
    args = ["--quick", "--limit", "400", "--input-size", "64"]
    result = CliRunner().invoke(app, [*args, "--neu-limit", "60", "--out", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads((out / "results.json").read_text())
    assert 0 < data["baseline"]["ssim"] < 1 and 5 < data["baseline"]["psnr"] < 40
    modes = data["modes"]
    assert {m["mode"] for m in modes} >= {"pooled", "spatial", "stats"}
    keys = {"mode", "cut", "noise_sigma", "accuracy", "ssim", "psnr", "psnr_gain_db"}
    for m in modes:
        assert keys | {"reid_top1", "reid_chance", "attacker", "default"} <= set(m)
        assert 0 <= m["accuracy"] <= 1 and -1 <= m["ssim"] <= 1
        assert 0 <= m["reid_top1"] <= 1 and 0 < m["reid_chance"] < 0.05
        assert m["psnr_gain_db"] == pytest.approx(m["psnr"] - data["baseline"]["psnr"])
        assert m["input_size"] == 64
        if m["mode"] == "stats":
            assert m["reid_top1"] == 0 and "impossible" in m["note"]
        if m["mode"] == "stats" and m["stats_rank"] > 0:
            assert 0 <= m["membership_auc"] <= 1
        else:
            assert m["membership_auc"] is None
    default = [m for m in modes if m["default"]]
    assert len(default) == 1
    assert (default[0]["mode"], default[0]["stats_rank"]) == ("stats", 32)
    assert data["server_default_privacy"]["mode"] == "stats"
    assert "| mode |" in (out / "results.md").read_text()
    updates = data["updates"]
    assert (updates["train_from"], updates["clip_norm"], updates["dtype"]) == ("b15", 10, "float16")
    assert updates["norm_before_clip"] > 0 and updates["members"] > 0
    assert [r["noise_multiplier"] for r in updates["rows"]][:2] == [0, 0.001]
    for r in updates["rows"]:
        assert 0 <= r["membership_auc"] <= 1 and 0 <= r["accuracy"] <= 1
    assert "## One round's update" in (out / "results.md").read_text()
    assert (out / "grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
