"""Privacy modes on the wire: per-class statistics instead of rows, and what the server
makes of them.

In ``stats`` mode an edge sends, for each class, how many pooled feature rows it has,
their mean and their per-dimension (diagonal) variance, computed after the spec's
clipping and noise, plus the edge's ``factors``: the top principal directions of its
rows about their class means, each scaled by its standard deviation (at most the spec's
``stats_rank`` of them, and at most one for every 32 rows they summarise). No row leaves
the edge. The server trains the part above the cut on *virtual features* drawn from one
Gaussian per edge and class, as CCVR (Luo et al., NeurIPS 2021), FedPFT and FedCOF do:
mean, low-rank covariance from the factors, and the rest of each dimension's variance
on the diagonal. The factors matter: features are strongly correlated, and a diagonal
Gaussian loses most of what separates the classes (``bench/stage2.py`` measures it). A
class with fewer rows at an edge than the spec's ``stats_min_count`` is sent as count 0
(zero mean and variance): the mean of one or two rows describes those images.

A stats upload is a safetensors file with tensors ``counts`` [C] int64, ``means`` [C, D]
float32, ``vars`` [C, D] float32 and ``factors`` [K, D] float32 (C classes, D the pooled
width, K factors, possibly 0) and the same metadata as a row upload (spec hash, edge id,
class names).

:func:`pack_upload`, :func:`unpack_upload` and :func:`training_rows` choose rows or
statistics from the spec's mode, so the services need not.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fl_core import serialization
from fl_core.errors import InvalidInput
from fl_core.features import (
    CLASSES_KEY,
    EDGE_KEY,
    FLOAT32_MAX,
    SPEC_HASH_KEY,
    FeatureBatch,
    apply_privacy,
    pack_features,
    row_norm_bound,
    unpack_features,
    validate_features,
)
from fl_core.schemas import FeatureSpec

STATS_TENSORS = ("counts", "means", "vars", "factors")

#: at most one factor for this many rows they summarise
ROWS_PER_FACTOR = 32


@dataclass
class ClassStats:
    """Per-class statistics of one edge's pooled feature rows."""

    counts: torch.Tensor  # [C] int64
    means: torch.Tensor  # [C, D] float32
    vars: torch.Tensor  # [C, D] float32, unbiased; 0 where a class has fewer than 2 rows
    #: [K, D] float32: principal directions of the rows about their class means, scaled
    #: by their standard deviation (K may be 0)
    factors: torch.Tensor | None = None
    spec_hash: str = ""
    edge_id: str = ""

    @property
    def total(self) -> int:
        return int(self.counts.sum())


Upload = FeatureBatch | ClassStats


def max_factors(rows: int, rank: int) -> int:
    """How many factors statistics of ``rows`` rows may carry at ``rank``."""
    return max(0, min(rank, (rows - 1) // ROWS_PER_FACTOR))


def compute_stats(
    features: torch.Tensor,
    labels: torch.Tensor,
    n_classes: int,
    min_count: int = 1,
    rank: int = 0,
) -> ClassStats:
    """Count, mean and variance of the rows of each class; classes with fewer than
    ``min_count`` rows are reported as count 0 with zero mean and variance. With
    ``rank`` > 0, also the top principal directions of the counted rows about their class
    means (:func:`max_factors` of them), scaled by their standard deviation."""
    if features.dim() != 2:
        raise InvalidInput(f"statistics need [N, D] rows, got shape {list(features.shape)}")
    if features.shape[0] != labels.shape[0]:
        raise InvalidInput("features and labels differ in length")
    x = features.double()
    dim = x.shape[1]
    counts = torch.zeros(n_classes, dtype=torch.int64)
    means = torch.zeros(n_classes, dim, dtype=torch.float64)
    variances = torch.zeros(n_classes, dim, dtype=torch.float64)
    centred: list[torch.Tensor] = []
    for c in range(n_classes):
        rows = x[labels == c]
        n = rows.shape[0]
        if n == 0 or n < min_count:
            continue
        counts[c] = n
        means[c] = rows.mean(0)
        centred.append(rows - means[c])
        if n > 1:
            variances[c] = rows.var(0, unbiased=True)
    factors = torch.zeros(0, dim, dtype=torch.float64)
    k = max_factors(int(counts.sum()), rank)
    if k > 0:
        within = torch.cat(centred)
        _, sv, vh = torch.linalg.svd(within, full_matrices=False)
        dof = max(1, within.shape[0] - len(centred))
        factors = vh[:k] * (sv[:k, None] / dof**0.5)
    return ClassStats(counts, means.float(), variances.float(), factors.float())


def _check_stats_spec(spec: FeatureSpec) -> int:
    if spec.privacy.mode != "stats":
        raise InvalidInput(f"the spec's privacy mode is {spec.privacy.mode!r}, not 'stats'")
    if len(spec.feature_shape) != 1:
        raise InvalidInput(f"stats need pooled rows; the spec's rows are {spec.feature_shape}")
    return int(spec.feature_shape[0])


def pack_stats(
    features: torch.Tensor,
    labels: torch.Tensor,
    spec: FeatureSpec,
    edge_id: str,
    seed: int | None = None,
) -> bytes:
    """Clip and noise the rows as the spec says, then serialise their class statistics."""
    dim = _check_stats_spec(spec)
    if list(features.shape[1:]) != [dim]:
        raise InvalidInput(
            f"feature rows have shape {list(features.shape[1:])}, spec says {spec.feature_shape}"
        )
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    private = apply_privacy(features, spec.privacy, gen)
    stats = compute_stats(
        private,
        labels.long(),
        len(spec.class_names),
        spec.privacy.stats_min_count,
        spec.privacy.stats_rank,
    )
    if stats.total == 0:
        raise InvalidInput(
            f"no class has {spec.privacy.stats_min_count} or more rows: no statistics to send"
        )
    meta = {
        SPEC_HASH_KEY: spec.spec_hash(),
        EDGE_KEY: edge_id,
        CLASSES_KEY: json.dumps(spec.class_names),
    }
    assert stats.factors is not None
    tensors = {
        "counts": stats.counts,
        "means": stats.means,
        "vars": stats.vars,
        "factors": stats.factors,
    }
    return serialization.dumps(tensors, meta)


def validate_stats_header(data: bytes, spec: FeatureSpec) -> None:
    """Check a stats upload's header against the spec without building tensors."""
    dim = _check_stats_spec(spec)
    header, meta = serialization.inspect_header(data)
    if meta.get(SPEC_HASH_KEY) != spec.spec_hash():
        raise InvalidInput("spec hash does not match this cycle's feature spec")
    if set(header) != set(STATS_TENSORS):
        raise InvalidInput(f"a stats upload must hold exactly the tensors {sorted(STATS_TENSORS)}")
    n_classes = len(spec.class_names)
    expected = {
        "counts": ("I64", [n_classes]),
        "means": ("F32", [n_classes, dim]),
        "vars": ("F32", [n_classes, dim]),
    }
    for name, (dtype, shape) in expected.items():
        if header[name]["dtype"] != dtype or header[name]["shape"] != shape:
            kind = {"I64": "int64", "F32": "float32"}[dtype]
            raise InvalidInput(f"{name} must be {kind} of shape {shape}")
    factors = header["factors"]
    rank = spec.privacy.stats_rank
    k_dim = factors["shape"]
    assert isinstance(k_dim, list)  # inspect_header checks it
    if factors["dtype"] != "F32" or len(k_dim) != 2 or k_dim[1] != dim or not 0 <= k_dim[0] <= rank:
        raise InvalidInput(f"factors must be float32 of shape [K, {dim}] with K <= {rank}")


def unpack_stats(data: bytes, spec: FeatureSpec, max_rows: int) -> ClassStats:
    """Validate a stats upload fully (header, counts, finite values) and decode it."""
    validate_stats_header(data, spec)
    tensors, meta = serialization.loads(data)
    counts, means, variances, factors = (tensors[k] for k in STATS_TENSORS)
    min_count = spec.privacy.stats_min_count
    if bool((counts < 0).any()):
        raise InvalidInput("counts must not be negative")
    if bool(((counts > 0) & (counts < min_count)).any()):
        raise InvalidInput(f"a class count must be 0 or at least {min_count}")
    total = int(counts.sum())
    if total < 1:
        raise InvalidInput("upload holds no rows")
    if total > max_rows:
        raise InvalidInput(f"upload holds {total} rows; the limit is {max_rows}")
    if factors.shape[0] > max_factors(total, spec.privacy.stats_rank):
        raise InvalidInput(
            f"too many factors ({factors.shape[0]}) for {total} rows: at most one for "
            f"every {ROWS_PER_FACTOR} rows"
        )
    finite = torch.isfinite(means).all() and torch.isfinite(variances).all()
    if not bool(finite and torch.isfinite(factors).all()):
        raise InvalidInput("means, vars and factors must be finite")
    if bool((variances < 0).any()):
        raise InvalidInput("vars must not be negative")
    check_stats_bounds(counts, means, variances, factors, spec)
    return ClassStats(
        counts=counts,
        means=means,
        vars=variances,
        factors=factors,
        spec_hash=meta.get(SPEC_HASH_KEY, ""),
        edge_id=meta.get(EDGE_KEY, ""),
    )


def check_stats_bounds(
    counts: torch.Tensor,
    means: torch.Tensor,
    variances: torch.Tensor,
    factors: torch.Tensor,
    spec: FeatureSpec,
) -> None:
    """Refuse statistics no honest edge could compute under the spec's privacy transform.

    With a clip norm, every row the statistics summarise has a norm of at most
    B = :func:`row_norm_bound`, so each class mean has norm <= B and the sum of a
    class's (unbiased) variances is <= n / (n - 1) * B^2. In every mode the factors'
    total energy cannot exceed the within-class scatter the variances describe; and
    nothing may be too large for float32 arithmetic.
    """
    dim = means.shape[1]
    n = counts.double()
    mean_norms = torch.linalg.vector_norm(means.double(), dim=1)
    spread = variances.double().sum(1)  # trace of each class's covariance
    if float(mean_norms.max()) > FLOAT32_MAX or float(spread.max()) > FLOAT32_MAX:
        raise InvalidInput("means or vars too large for float32")
    bound = row_norm_bound(spec.privacy, dim)
    if bound is not None:
        counted = counts > 0
        worst = float((mean_norms * counted).max())
        if worst > bound:
            raise InvalidInput(
                f"a class mean has norm {worst:.4g}; rows clipped to norm "
                f"{spec.privacy.clip_norm:g} and noised with sigma "
                f"{spec.privacy.noise_sigma:g} allow at most {bound:.4g}: statistics must "
                "be computed from rows clipped and noised as the spec says"
            )
        several = counts > 1
        allowed = n / (n - 1).clamp_min(1) * bound**2
        if bool(((spread > allowed) & several).any()):
            raise InvalidInput(
                f"a class's variances sum past what rows of norm <= {bound:.4g} allow: "
                "statistics must be computed from rows clipped and noised as the spec says"
            )
    dof = max(1, int(counts.sum()) - int((counts > 0).sum()))
    scatter = float(((n - 1).clamp_min(0) * spread).sum()) / dof
    energy = float((factors.double() ** 2).sum())
    if energy > scatter * 1.001 + 1e-6:
        raise InvalidInput(
            f"the factors carry more variance ({energy:.4g}) than the class variances "
            f"describe ({scatter:.4g})"
        )


def pool_stats(stats: Sequence[ClassStats]) -> ClassStats:
    """The statistics of all edges' rows together (law of total variance)."""
    if not stats:
        raise InvalidInput("no statistics to pool")
    counts = torch.stack([s.counts for s in stats]).double()  # [E, C]
    means = torch.stack([s.means for s in stats]).double()  # [E, C, D]
    variances = torch.stack([s.vars for s in stats]).double()
    n = counts.sum(0)  # [C]
    w = counts / n.clamp_min(1)
    mean = (w[..., None] * means).sum(0)
    # sum of squares about each edge's mean, plus each edge's offset from the pool's
    within = ((counts - 1).clamp_min(0)[..., None] * variances).sum(0)
    between = (counts[..., None] * (means - mean) ** 2).sum(0)
    var = (within + between) / (n - 1).clamp_min(1)[:, None]
    return ClassStats(n.long(), mean.float(), var.float())


def sample_virtual_features(
    stats: Sequence[ClassStats], seed: int, rows_per_row: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Virtual feature rows and labels: for each edge and class, ``count * rows_per_row``
    draws from a Gaussian with that class's mean, the edge's factors as low-rank
    covariance and the rest of the class's variance on the diagonal (seeded)."""
    gen = torch.Generator().manual_seed(seed)
    feats: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    for s in stats:
        dim = s.means.shape[1]
        factors = s.factors if s.factors is not None else torch.zeros(0, dim)
        explained = (factors**2).sum(0)
        for c, count in enumerate(s.counts.tolist()):
            if count <= 0:
                continue
            n = max(1, round(count * rows_per_row))
            rest = (s.vars[c] - explained).clamp_min(0).sqrt()
            noise = torch.randn((n, dim), generator=gen) * rest
            if len(factors):
                noise = noise + torch.randn((n, len(factors)), generator=gen) @ factors
            feats.append(s.means[c] + noise)
            labels.append(torch.full((n,), c, dtype=torch.int64))
    if not feats:
        raise InvalidInput("the statistics hold no rows to sample from")
    return torch.cat(feats), torch.cat(labels)


# --------------------------------------------------------------------------- by mode


def pack_upload(
    features: torch.Tensor,
    labels: torch.Tensor,
    spec: FeatureSpec,
    edge_id: str,
    seed: int | None = None,
) -> bytes:
    """What the edge uploads in the spec's privacy mode: statistics or rows."""
    if spec.privacy.mode == "stats":
        return pack_stats(features, labels, spec, edge_id, seed)
    return pack_features(features, labels, spec, edge_id, seed)


def unpack_upload(data: bytes, spec: FeatureSpec, max_rows: int) -> Upload:
    """Validate and decode an upload in the spec's privacy mode."""
    if spec.privacy.mode == "stats":
        return unpack_stats(data, spec, max_rows)
    return unpack_features(data, spec, max_rows)


def validate_upload(data: bytes, spec: FeatureSpec, max_rows: int) -> int:
    """Validate an upload in the spec's privacy mode as fully as :func:`unpack_upload`,
    keeping nothing; returns the rows it stands for (as :func:`upload_rows`)."""
    if spec.privacy.mode == "stats":
        return upload_rows(unpack_stats(data, spec, max_rows))
    return validate_features(data, spec, max_rows)


def upload_rows(upload: Upload) -> int:
    """Rows an upload stands for (for statistics: the rows they were computed from)."""
    if isinstance(upload, ClassStats):
        return upload.total
    return int(upload.labels.shape[0])


def training_rows(uploads: Sequence[Upload], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows the server trains on: uploaded rows, or virtual rows sampled from
    uploaded statistics (one Gaussian per edge and class, seeded)."""
    if not uploads:
        raise InvalidInput("no uploads to train on")
    stats = [u for u in uploads if isinstance(u, ClassStats)]
    rows = [u for u in uploads if isinstance(u, FeatureBatch)]
    if stats and rows:
        raise InvalidInput("uploads mix statistics and rows")
    if stats:
        return sample_virtual_features(stats, seed)
    return torch.cat([u.features for u in rows]), torch.cat([u.labels for u in rows])


__all__ = [
    "ROWS_PER_FACTOR",
    "STATS_TENSORS",
    "ClassStats",
    "Upload",
    "check_stats_bounds",
    "compute_stats",
    "max_factors",
    "pack_stats",
    "pack_upload",
    "pool_stats",
    "sample_virtual_features",
    "training_rows",
    "unpack_stats",
    "unpack_upload",
    "upload_rows",
    "validate_stats_header",
    "validate_upload",
]
