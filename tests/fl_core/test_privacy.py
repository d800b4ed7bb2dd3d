"""Privacy modes: mode against cut, per-class statistics on the wire, virtual features."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from fl_core import serialization
from fl_core.errors import InvalidInput, NotSafetensors
from fl_core.features import SPEC_HASH_KEY, FeatureBatch, make_spec, pack_features, row_norm_bound
from fl_core.model import build_split_model
from fl_core.privacy import (
    ClassStats,
    compute_stats,
    pack_stats,
    pack_upload,
    pool_stats,
    sample_virtual_features,
    training_rows,
    unpack_stats,
    unpack_upload,
    upload_rows,
    validate_upload,
)
from fl_core.schemas import FeatureSpec, PrivacyConfig

CLASSES = ["ok", "bad", "worse"]


def _spec(privacy: PrivacyConfig | None = None, cut: str = "pooled") -> FeatureSpec:
    model = build_split_model(CLASSES, "tiny_cnn", cut, pretrained=False)
    return make_spec(model, 1, "ab" * 32, privacy)


def _rows(n: int = 60, dim: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % len(CLASSES)
    features = torch.randn(n, dim, generator=gen) + labels[:, None].float() * 3.0
    return features, labels


def _stats_body(spec: FeatureSpec, **tensors: torch.Tensor) -> bytes:
    dim = spec.feature_shape[0]
    values = {
        "counts": torch.tensor([20, 20, 20]),
        "means": torch.zeros(3, dim),
        "vars": torch.ones(3, dim),
        "factors": torch.zeros(0, dim),
    } | tensors
    return serialization.dumps(values, {SPEC_HASH_KEY: spec.spec_hash()})


# --------------------------------------------------------------------------- modes


def test_mode_is_inferred_from_the_cut_when_not_given() -> None:
    assert _spec().privacy.mode == "pooled"
    assert _spec(cut="b1").privacy.mode == "spatial"
    assert _spec(PrivacyConfig(dtype="float16"), cut="b1").privacy.mode == "spatial"


def test_a_mode_that_contradicts_the_cut_is_refused() -> None:
    with pytest.raises(InvalidInput, match="cut must be 'pooled'"):
        _spec(PrivacyConfig(mode="stats"), cut="b1")
    with pytest.raises(InvalidInput, match="cut must name a block"):
        _spec(PrivacyConfig(mode="spatial"))
    with pytest.raises(InvalidInput, match="dtype must be float32"):
        _spec(PrivacyConfig(mode="stats", dtype="int8"))


def test_mode_and_noise_are_part_of_the_spec_hash() -> None:
    hashes = {
        _spec(PrivacyConfig(mode="pooled")).spec_hash(),
        _spec(PrivacyConfig(mode="stats")).spec_hash(),
        _spec(PrivacyConfig(mode="stats", noise_sigma=0.1)).spec_hash(),
    }
    assert len(hashes) == 3
    spec = _spec(PrivacyConfig(mode="stats"))
    assert FeatureSpec.model_validate_json(spec.model_dump_json()) == spec


# --------------------------------------------------------------------------- statistics


def test_compute_stats_matches_torch_and_hides_small_classes() -> None:
    features, labels = _rows(n=20)
    labels[-1] = 2  # class 2: 7 rows; class 1: 6
    labels[labels == 2] = torch.tensor([2] * 6 + [1])
    stats = compute_stats(features, labels, 3, min_count=7)
    counts = torch.bincount(labels, minlength=3)
    for c in range(3):
        rows = features[labels == c]
        if len(rows) >= 7:
            assert int(stats.counts[c]) == len(rows)
            assert torch.allclose(stats.means[c], rows.mean(0), atol=1e-5)
            assert torch.allclose(stats.vars[c], rows.var(0), atol=1e-4)
        else:
            assert int(stats.counts[c]) == 0
            assert not stats.means[c].any() and not stats.vars[c].any()
    assert stats.total == int(counts[counts >= 7].sum())


def test_pack_unpack_stats_round_trip_carries_no_rows() -> None:
    spec = _spec(PrivacyConfig(mode="stats", stats_min_count=5))
    features, labels = _rows()
    body = pack_upload(features, labels, spec, "edge-1")
    tensors, _ = serialization.loads(body)
    assert set(tensors) == {"counts", "means", "vars", "factors"}
    assert tensors["means"].shape == (3, 32)
    # the default rank, capped at one factor for every 32 rows: 1 of 60 rows
    assert tensors["factors"].shape == (1, 32)
    stats = unpack_upload(body, spec, max_rows=100)
    assert isinstance(stats, ClassStats)
    assert stats.edge_id == "edge-1" and stats.spec_hash == spec.spec_hash()
    assert stats.counts.tolist() == [20, 20, 20] and upload_rows(stats) == 60
    assert torch.allclose(stats.means[1], features[labels == 1].mean(0), atol=1e-5)


def test_stats_are_computed_after_clipping_and_noise() -> None:
    features, labels = _rows()
    plain = unpack_stats(
        pack_stats(features, labels, _spec(PrivacyConfig(mode="stats")), "e"),
        _spec(PrivacyConfig(mode="stats")),
        100,
    )
    spec = _spec(PrivacyConfig(mode="stats", clip_norm=0.1, noise_sigma=0.5))
    noised = unpack_stats(pack_stats(features, labels, spec, "e", seed=0), spec, 100)
    # rows clipped to norm 0.1 vary by far less than the noise: variance about 0.5**2
    assert 0.2 < float(noised.vars.mean()) < 0.35
    assert not torch.allclose(plain.means, noised.means)


def test_pack_stats_refuses_what_it_cannot_summarise() -> None:
    spec = _spec(PrivacyConfig(mode="stats", stats_min_count=30))
    features, labels = _rows()
    with pytest.raises(InvalidInput, match="no class has 30 or more rows"):
        pack_stats(features, labels, spec, "e")
    with pytest.raises(InvalidInput, match="not 'stats'"):
        pack_stats(features, labels, _spec(), "e")
    with pytest.raises(InvalidInput, match="feature rows have shape"):
        pack_stats(torch.randn(60, 8), labels, spec, "e")


@pytest.mark.parametrize(
    ("tensors", "message"),
    [
        ({"counts": torch.tensor([20, 20])}, r"counts must be int64 of shape \[3\]"),
        ({"counts": torch.tensor([20.0, 20.0, 20.0])}, "counts must be int64"),
        ({"means": torch.zeros(3, 31)}, r"means must be float32 of shape \[3, 32\]"),
        ({"vars": torch.ones(3, 32, dtype=torch.float64)}, "vars must be float32"),
        ({"counts": torch.tensor([20, -1, 20])}, "counts must not be negative"),
        ({"counts": torch.tensor([20, 3, 20])}, "a class count must be 0 or at least 10"),
        ({"counts": torch.tensor([0, 0, 0])}, "upload holds no rows"),
        ({"counts": torch.tensor([200, 0, 0])}, "upload holds 200 rows; the limit is 100"),
        ({"means": torch.full((3, 32), float("nan"))}, "means, vars and factors must be finite"),
        ({"vars": torch.full((3, 32), float("inf"))}, "means, vars and factors must be finite"),
        ({"vars": -torch.ones(3, 32)}, "vars must not be negative"),
        ({"labels": torch.zeros(3, dtype=torch.int64)}, "must hold exactly the tensors"),
    ],
)
def test_unpack_stats_refuses_malformed_uploads(
    tensors: dict[str, torch.Tensor], message: str
) -> None:
    spec = _spec(PrivacyConfig(mode="stats"))
    with pytest.raises(InvalidInput, match=message):
        unpack_stats(_stats_body(spec, **tensors), spec, max_rows=100)


def test_unpack_stats_refuses_another_spec_and_row_uploads() -> None:
    spec = _spec(PrivacyConfig(mode="stats"))
    other = _spec(PrivacyConfig(mode="stats", noise_sigma=1.0))
    with pytest.raises(InvalidInput, match="spec hash"):
        unpack_stats(_stats_body(other), spec, 100)
    features, labels = _rows()
    rows = pack_upload(features, labels, _spec(), "e")
    assert isinstance(unpack_upload(rows, _spec(), 100), FeatureBatch)
    with pytest.raises(InvalidInput):
        unpack_upload(rows, spec, 100)


# --------------------------------------------------------------------------- virtual rows


def test_pool_stats_equals_statistics_of_all_rows() -> None:
    features, labels = _rows(n=90)
    parts = [slice(0, 30), slice(30, 75), slice(75, 90)]
    stats = [compute_stats(features[p], labels[p], 3) for p in parts]
    pooled = pool_stats(stats)
    whole = compute_stats(features, labels, 3)
    assert torch.equal(pooled.counts, whole.counts)
    assert torch.allclose(pooled.means, whole.means, atol=1e-5)
    assert torch.allclose(pooled.vars, whole.vars, atol=1e-4)


def _correlated_rows(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two classes whose rows vary along two shared directions far more than elsewhere:
    the classes differ along a third direction that is small beside those."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    basis = torch.linalg.qr(torch.randn(16, 3, generator=gen))[0].T  # [3, 16] orthonormal
    shared = torch.randn(n, 2, generator=gen) * torch.tensor([5.0, 3.0])
    rows = shared @ basis[:2] + 0.1 * torch.randn(n, 16, generator=gen)
    rows = rows + (labels[:, None].float() - 0.5) * basis[2] + shared[:, :1] * 0.3 * basis[2]
    return rows, labels


def test_factors_carry_the_covariance_that_the_diagonal_loses() -> None:
    rows, labels = _correlated_rows(4000)
    stats = compute_stats(rows, labels, 2, rank=4)
    assert stats.factors is not None and stats.factors.shape == (4, 16)
    x, y = sample_virtual_features([stats], seed=0)
    centred = torch.cat([rows[labels == c] - rows[labels == c].mean(0) for c in (0, 1)])
    virtual = torch.cat([x[y == c] - x[y == c].mean(0) for c in (0, 1)])
    truth = centred.T @ centred / len(centred)
    sampled = virtual.T @ virtual / len(virtual)
    diagonal = stats.vars.mean(0).diag()
    # the low-rank Gaussian recovers the covariance; the diagonal one is far off
    assert (sampled - truth).norm() < 0.1 * truth.norm()
    assert (diagonal - truth).norm() > 0.5 * truth.norm()


def test_stats_upload_bounds_its_factors() -> None:
    spec = _spec(PrivacyConfig(mode="stats", stats_rank=4))
    dim = spec.feature_shape[0]
    with pytest.raises(InvalidInput, match=r"factors must be float32 of shape \[K, 32\]"):
        unpack_stats(_stats_body(spec, factors=torch.zeros(5, dim)), spec, 100)
    with pytest.raises(InvalidInput, match=r"too many factors \(2\) for 40 rows"):
        body = _stats_body(spec, counts=torch.tensor([40, 0, 0]), factors=torch.ones(2, dim))
        unpack_stats(body, spec, 100)
    with pytest.raises(InvalidInput, match="must be finite"):
        bad = torch.full((1, dim), float("nan"))
        unpack_stats(_stats_body(spec, factors=bad), spec, 100)
    # factors explaining no more variance than the classes have (3 * dim of 4 * dim)
    body = _stats_body(
        spec,
        counts=torch.tensor([40, 40, 40]),
        vars=torch.full((3, dim), 4.0),
        factors=torch.ones(3, dim),
    )
    ok = unpack_stats(body, spec, 200)
    assert ok.factors is not None and ok.factors.shape == (3, dim)


def test_virtual_features_follow_the_statistics_and_are_seeded() -> None:
    features, labels = _rows(n=3000)
    stats = compute_stats(features, labels, 3)
    x, y = sample_virtual_features([stats, stats], seed=1)
    assert torch.bincount(y).tolist() == [2000, 2000, 2000]
    for c in range(3):
        assert torch.allclose(x[y == c].mean(0), stats.means[c], atol=0.1)
        assert torch.allclose(x[y == c].var(0), stats.vars[c], atol=0.15)
    again, _ = sample_virtual_features([stats, stats], seed=1)
    other, _ = sample_virtual_features([stats, stats], seed=2)
    assert torch.equal(x, again) and not torch.equal(x, other)


def test_training_rows_take_rows_or_sample_statistics() -> None:
    features, labels = _rows()
    batch = FeatureBatch(features, labels, "h", "e")
    x, y = training_rows([batch, batch], seed=0)
    assert x.shape == (120, 32) and torch.equal(y[:60], labels)
    stats = compute_stats(features, labels, 3)
    x, y = training_rows([stats], seed=0)
    assert x.shape == (60, 32) and torch.bincount(y).tolist() == [20, 20, 20]
    with pytest.raises(InvalidInput, match="mix"):
        training_rows([batch, stats], seed=0)


# ------------------------------------------------------- privacy bounds (issue 24, #7)


def test_honest_clipped_and_noised_uploads_pass_the_bounds() -> None:
    features, labels = _rows(n=300)
    features = features * 50  # far past the clip norm before the edge's transform
    for mode in ("stats", "pooled"):
        for dtype in ("float32", "float16", "int8") if mode == "pooled" else ("float32",):
            privacy = PrivacyConfig(mode=mode, dtype=dtype, clip_norm=4.0, noise_sigma=1.0)
            spec = _spec(privacy)
            for seed in range(3):
                body = pack_upload(features, labels, spec, "e", seed=seed)
                unpack_upload(body, spec, 1000)  # no error: honest edges are never refused


def test_rows_past_the_clip_norm_are_refused() -> None:
    spec = _spec(PrivacyConfig(mode="pooled", clip_norm=4.0, noise_sigma=0.5))
    features, labels = _rows()
    bound = row_norm_bound(spec.privacy, features.shape[1])
    assert bound is not None and 4.0 + 0.5 * 32**0.5 < bound < 4.0 + 0.5 * (32**0.5 + 9)
    # what an edge that skipped its privacy transform sends
    unclipped = serialization.dumps(
        {"features": features * 10, "labels": labels}, {SPEC_HASH_KEY: spec.spec_hash()}
    )
    with pytest.raises(InvalidInput, match=r"the spec's privacy transform .* allows at most"):
        unpack_upload(unclipped, spec, 1000)


def test_rows_too_large_for_float32_are_refused_without_a_clip_norm() -> None:
    spec = _spec(PrivacyConfig(mode="pooled"))
    features, labels = _rows()
    huge = pack_features(torch.full_like(features, 3e38), labels, spec, "e")
    with pytest.raises(InvalidInput, match="too large for float32"):
        unpack_upload(huge, spec, 1000)


def test_stats_past_the_bounds_are_refused() -> None:
    spec = _spec(PrivacyConfig(mode="stats", clip_norm=4.0, noise_sigma=0.0))
    dim = spec.feature_shape[0]
    far = torch.zeros(3, dim)
    far[1, 0] = 100.0  # a mean no rows of norm <= 4 can have
    with pytest.raises(InvalidInput, match="a class mean has norm 100"):
        unpack_stats(_stats_body(spec, means=far), spec, 1000)
    wide = torch.full((3, dim), 10.0)  # variances summing to 10 * dim > 20/19 * 4**2
    with pytest.raises(InvalidInput, match="variances sum past"):
        unpack_stats(_stats_body(spec, vars=wide), spec, 1000)
    unbounded = _spec(PrivacyConfig(mode="stats", stats_rank=4))
    loud = torch.zeros(1, dim)
    loud[0, 0] = 100.0  # 10,000 of variance in a factor; the vars describe 3 * 19 * dim / 57
    with pytest.raises(InvalidInput, match="the factors carry more variance"):
        unpack_stats(_stats_body(unbounded, factors=loud), unbounded, 1000)


def _refusal(
    check: Callable[[bytes, FeatureSpec, int], object], body: bytes, spec: FeatureSpec
) -> tuple[type, str] | None:
    try:
        check(body, spec, 1000)
    except (InvalidInput, NotSafetensors) as exc:
        return type(exc), str(exc)
    return None


def test_the_servers_validation_refuses_what_decoding_refuses() -> None:
    """What the server runs on an upload before storing it (validate_upload, no tensors
    kept) accepts and refuses exactly as decoding it does, with the same message."""
    features, labels = _rows()
    cases = []
    for dtype in ("float32", "float16", "int8"):
        privacy = PrivacyConfig(mode="pooled", dtype=dtype, clip_norm=4.0, noise_sigma=0.5)
        spec = _spec(privacy)
        honest = pack_upload(features, labels, spec, "e", seed=0)
        cases.append((spec, honest))
        tensors, meta = serialization.loads(honest)
        bad_values = {
            "nan": float("nan"),
            "inf": float("inf"),
            "huge": 60000.0 if dtype == "float16" else 3e38,
        }
        for value in bad_values.values():
            changed = {k: v.clone() for k, v in tensors.items()}
            if dtype == "int8":
                changed["scale"][1] = value  # dequantized rows become non-finite or huge
            else:
                changed["features"][1, 0] = value
            cases.append((spec, serialization.dumps(changed, meta)))
        wrong_label = {**tensors, "labels": tensors["labels"].clone()}
        wrong_label["labels"][0] = 7
        cases.append((spec, serialization.dumps(wrong_label, meta)))
    stats_spec = _spec(PrivacyConfig(mode="stats", clip_norm=4.0, noise_sigma=0.0))
    cases.append((stats_spec, pack_upload(features, labels, stats_spec, "e", seed=0)))
    cases.append((_spec(PrivacyConfig(mode="pooled")), b"not safetensors"))
    refused = 0
    for spec, body in cases:
        expected = _refusal(unpack_upload, body, spec)
        assert _refusal(validate_upload, body, spec) == expected
        if expected is None:
            assert validate_upload(body, spec, 1000) == upload_rows(unpack_upload(body, spec, 1000))
        else:
            refused += 1
    assert refused >= 10  # the bad cases were refused, not quietly accepted
