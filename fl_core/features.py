"""Feature extraction on the edge, privacy transforms, and packing for the wire.

Extraction streams over a dataset in batches under ``torch.inference_mode()``: it never
holds more than one batch of images. The privacy transform runs after the cut, before
anything leaves the edge: optional L2 clipping of each row, optional Gaussian noise,
then the wire dtype (float32, float16, or int8 with a per-row scale).

A feature upload is a safetensors file with tensors ``features`` [N, ...], ``labels``
[N] int64 and, for int8, ``scale`` [N] float32; its metadata carries the spec hash,
the edge id and the class names.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch

from fl_core import serialization
from fl_core.data import ImageSet, batches, prefetch
from fl_core.errors import InvalidInput
from fl_core.model import SplitModel
from fl_core.onnx_runtime import LowerRunner, torch_runner, torch_threads_beside
from fl_core.schemas import FeatureSpec, PrivacyConfig

Progress = Callable[[int, int], None]
"""``progress(done, total)``: called after every batch."""

SPEC_HASH_KEY = "fedinspect.spec_hash"
EDGE_KEY = "fedinspect.edge_id"
CLASSES_KEY = "fedinspect.class_names"

_WIRE_DTYPES = {"float32": "F32", "float16": "F16", "int8": "I8"}


@dataclass
class FeatureBatch:
    """Decoded features (float32) and labels, as the server trains on them."""

    features: torch.Tensor
    labels: torch.Tensor
    spec_hash: str
    edge_id: str


def make_spec(
    model: SplitModel,
    base_model_version: int,
    base_model_sha256: str,
    privacy: PrivacyConfig | None = None,
) -> FeatureSpec:
    """The spec an edge must follow to extract features with ``model``.

    The privacy mode is checked against the model's cut (see ``PrivacyConfig.for_cut``).
    """
    return FeatureSpec(
        backbone=model.arch.backbone,
        cut=model.arch.cut,
        input_size=model.arch.input_size,
        feature_shape=model.feature_shape(),
        privacy=(privacy or PrivacyConfig()).for_cut(model.arch.cut),
        class_names=model.class_names,
        base_model_version=base_model_version,
        base_model_sha256=base_model_sha256,
    )


def check_model_matches_spec(model: SplitModel, spec: FeatureSpec) -> None:
    if (model.arch.backbone, model.arch.cut, model.arch.input_size) != (
        spec.backbone,
        spec.cut,
        spec.input_size,
    ):
        raise InvalidInput(
            f"model ({model.arch.backbone}/{model.arch.cut}/{model.arch.input_size}px) "
            f"does not match the spec ({spec.backbone}/{spec.cut}/{spec.input_size}px)"
        )


# --------------------------------------------------------------------------- privacy


def apply_privacy(
    features: torch.Tensor, privacy: PrivacyConfig, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Clip each row to an L2 bound, then add Gaussian noise (float32 in, float32 out)."""
    x = features.float()
    if privacy.clip_norm is not None:
        flat = x.reshape(x.shape[0], -1)
        norms = flat.norm(dim=1, keepdim=True).clamp_min(1e-12)
        flat = flat * (privacy.clip_norm / norms).clamp(max=1.0)
        x = flat.reshape(x.shape)
    if privacy.noise_sigma > 0:
        x = x + torch.randn(x.shape, generator=generator) * privacy.noise_sigma
    return x


#: Gaussian noise of std s in D dimensions has a norm above s * (sqrt(D) + NOISE_TAIL)
#: with probability below exp(-NOISE_TAIL**2 / 2), about 1e-14: an honest row never
#: lies past the bound below, whatever the edge's luck.
NOISE_TAIL = 8.0


FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def row_norm_bound(privacy: PrivacyConfig, dim: int) -> float | None:
    """The largest L2 norm a row of ``dim`` values can have after the privacy transform
    (clip, noise, then the wire dtype's rounding), or None when nothing clips rows."""
    if privacy.clip_norm is None:
        return None
    bound = privacy.clip_norm + privacy.noise_sigma * (math.sqrt(dim) + NOISE_TAIL)
    if privacy.dtype == "int8":
        # rounding to a per-row scale of max|x| / 127 moves each value by at most half
        # a step: the row by at most sqrt(dim) * max|x| / 254 <= sqrt(dim) * |x| / 254
        bound *= 1 + math.sqrt(dim) / 254
    return bound * 1.001 + 1e-6  # float16 and float32 rounding


def check_row_norms(features: torch.Tensor, privacy: PrivacyConfig) -> None:
    """Refuse rows no honest edge could send under ``privacy``: norms over
    :func:`row_norm_bound`, or too large for float32 arithmetic at all."""
    if features.shape[0] == 0:
        return
    flat = features.reshape(features.shape[0], -1).double()
    _check_norms(torch.linalg.vector_norm(flat, dim=1).numpy(), flat.shape[1], privacy)


def _check_norms(norms: np.ndarray, dim: int, privacy: PrivacyConfig) -> None:
    worst = int(norms.argmax())
    largest = float(norms[worst])
    if largest > FLOAT32_MAX:
        raise InvalidInput(
            f"feature row {worst} has a norm of {largest:.3g}: too large for float32"
        )
    bound = row_norm_bound(privacy, dim)
    if bound is not None and largest > bound:
        raise InvalidInput(
            f"feature row {worst} has norm {largest:.4g}; the spec's privacy transform "
            f"(clip norm {privacy.clip_norm:g}, noise sigma {privacy.noise_sigma:g}) allows "
            f"at most {bound:.4g}: rows must be clipped and noised as the spec says"
        )


def quantize(features: torch.Tensor, dtype: str) -> dict[str, torch.Tensor]:
    """Encode float32 rows in the wire dtype; int8 carries a per-row scale."""
    if dtype == "float32":
        return {"features": features.float()}
    if dtype == "float16":
        return {"features": features.half()}
    if dtype == "int8":
        flat = features.reshape(features.shape[0], -1)
        scale = flat.abs().amax(dim=1).clamp_min(1e-12) / 127.0
        q = torch.round(flat / scale[:, None]).clamp(-127, 127).to(torch.int8)
        return {"features": q.reshape(features.shape), "scale": scale.float()}
    raise InvalidInput(f"unknown feature dtype {dtype!r}")


def dequantize(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    feats = tensors["features"]
    if feats.dtype == torch.int8:
        scale = tensors["scale"]
        shape = [feats.shape[0]] + [1] * (feats.dim() - 1)
        return feats.float() * scale.reshape(shape)
    return feats.float()


# --------------------------------------------------------------------------- extraction


def extract_features(
    model: SplitModel,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    total: int | None = None,
    progress: Progress | None = None,
    lower: LowerRunner | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the lower part over ``(images, labels)`` batches; returns float32 features.

    Images are float tensors in [0, 1], [B, 1 or 3, H, W]. Only features are kept.
    ``lower`` runs the lower part (default: ``model.lower`` in eager PyTorch,
    channels-last).
    """
    run = lower if lower is not None else torch_runner(model)
    if run.end != model.cut_index + 1:
        raise ValueError(f"the runner stops before stage {run.end}, not after the cut")
    feats: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    done = 0
    with torch.inference_mode():
        for images, y in batches:
            feats.append(run(images).float())
            labels.append(y.long())
            done += images.shape[0]
            if progress is not None:
                progress(done, total if total is not None else done)
    if not feats:
        raise InvalidInput("no images to extract features from")
    return torch.cat(feats), torch.cat(labels)


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, which containers narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def overlaps_decoding(run: LowerRunner) -> bool:
    """Whether decoding on a worker thread can run beside ``run``: only when this process
    may use a core that the lower part's threads leave free (see :func:`extract_images`)."""
    return usable_cores() > (run.threads or torch.get_num_threads())


def extract_images(
    model: SplitModel,
    images: ImageSet,
    batch_size: int = 32,
    lower: LowerRunner | None = None,
    overlap: bool | None = None,
    progress: Progress | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The edge's extraction path: decode and resize ``images``, run the lower part.

    With ``overlap`` the next batch is decoded on a background thread while the lower
    part runs on this one. By default it overlaps only when this process may use a core
    that the lower part's threads leave free: when they fill every core, decoding beside
    them can only take turns with them. On 2 cores with ONNX Runtime on both, overlapping
    bought nothing measurable (full bench, 5 x 192 images: 35.2 img/s overlapped against
    37.3 serial at 224 px, 64.5 against 64.2 at 160).

    When ONNX Runtime runs the lower part (its own thread pool), torch only decodes and
    resizes, on one thread (:func:`~fl_core.onnx_runtime.torch_threads_beside`).
    """
    run = lower if lower is not None else torch_runner(model)
    source: Iterable[tuple[torch.Tensor, torch.Tensor]] = batches(
        images, model.arch.input_size, batch_size
    )
    if overlap is None:
        overlap = overlaps_decoding(run)
    if overlap:
        source = prefetch(source, depth=2)
    with torch_threads_beside(run):
        return extract_features(model, source, len(images), progress, run)


# --------------------------------------------------------------------------- wire format


def pack_features(
    features: torch.Tensor,
    labels: torch.Tensor,
    spec: FeatureSpec,
    edge_id: str,
    seed: int | None = None,
) -> bytes:
    """Apply the spec's privacy transform and serialise an upload."""
    if features.shape[0] != labels.shape[0]:
        raise InvalidInput("features and labels differ in length")
    if list(features.shape[1:]) != list(spec.feature_shape):
        raise InvalidInput(
            f"feature rows have shape {list(features.shape[1:])}, spec says {spec.feature_shape}"
        )
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    private = apply_privacy(features, spec.privacy, gen)
    tensors = quantize(private, spec.privacy.dtype)
    tensors["labels"] = labels.long()
    meta = {
        SPEC_HASH_KEY: spec.spec_hash(),
        EDGE_KEY: edge_id,
        CLASSES_KEY: json.dumps(spec.class_names),
    }
    return serialization.dumps(tensors, meta)


def validate_upload_header(data: bytes, spec: FeatureSpec, max_rows: int) -> int:
    """Check an upload's header against the spec without building tensors.

    Returns the row count. Raises InvalidInput / NotSafetensors with a clear message.
    """
    header, meta = serialization.inspect_header(data)
    if meta.get(SPEC_HASH_KEY) != spec.spec_hash():
        raise InvalidInput("spec hash does not match this cycle's feature spec")
    expected = {"features", "labels"} | ({"scale"} if spec.privacy.dtype == "int8" else set())
    if set(header) != expected:
        raise InvalidInput(f"upload must hold exactly the tensors {sorted(expected)}")
    feats, labels = header["features"], header["labels"]
    f_shape = feats["shape"]
    assert isinstance(f_shape, list)
    if feats["dtype"] != _WIRE_DTYPES[spec.privacy.dtype]:
        raise InvalidInput(
            f"features dtype {feats['dtype']} does not match the spec's {spec.privacy.dtype}"
        )
    if f_shape[1:] != list(spec.feature_shape):
        raise InvalidInput(
            f"feature rows have shape {f_shape[1:]}, the spec says {spec.feature_shape}"
        )
    rows = f_shape[0]
    if labels["dtype"] != "I64" or labels["shape"] != [rows]:
        raise InvalidInput(f"labels must be int64 of shape [{rows}]")
    if "scale" in header and (
        header["scale"]["dtype"] != "F32" or header["scale"]["shape"] != [rows]
    ):
        raise InvalidInput(f"scale must be float32 of shape [{rows}]")
    if rows < 1:
        raise InvalidInput("upload holds no rows")
    if rows > max_rows:
        raise InvalidInput(f"upload holds {rows} rows; the limit is {max_rows}")
    return int(rows)


def _decode_checked(
    data: bytes, spec: FeatureSpec, max_rows: int
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The upload's tensors and metadata, every check of :func:`validate_features` done.

    The values are checked through numpy views of the tensors (no copy but the float64
    rows of the norms), on the calling thread alone: torch's kernels split across the
    intra-op pool, which on a busy machine waited tens of milliseconds for its other
    threads per 1.5 MB upload, where this takes about one.
    """
    rows = validate_upload_header(data, spec, max_rows)
    tensors, meta = serialization.loads(data)  # safetensors' own checks, too
    stored = tensors["features"].numpy().reshape(rows, -1)
    with np.errstate(over="ignore", invalid="ignore"):
        if stored.dtype == np.int8:  # as dequantize: float32 values times the row scale
            values = stored.astype(np.float32) * tensors["scale"].numpy()[:, None]
        else:
            values = stored
        if not bool(np.isfinite(values).all()):
            raise InvalidInput("features contain NaN or Inf")
    wide = values.astype(np.float64)
    _check_norms(np.sqrt(np.einsum("ij,ij->i", wide, wide)), wide.shape[1], spec.privacy)
    labels = tensors["labels"].numpy()
    n_classes = len(spec.class_names)
    if int(labels.min()) < 0 or int(labels.max()) >= n_classes:
        raise InvalidInput(f"labels must lie in [0, {n_classes - 1}]")
    return tensors, meta


def validate_features(data: bytes, spec: FeatureSpec, max_rows: int) -> int:
    """Validate an upload fully (header, finite values, row norms, label range) without
    keeping its tensors; returns the row count."""
    tensors, _meta = _decode_checked(data, spec, max_rows)
    return int(tensors["labels"].shape[0])


def unpack_features(data: bytes, spec: FeatureSpec, max_rows: int) -> FeatureBatch:
    """Validate an upload fully (as :func:`validate_features`) and decode it."""
    tensors, meta = _decode_checked(data, spec, max_rows)
    return FeatureBatch(
        features=dequantize(tensors),
        labels=tensors["labels"],
        spec_hash=meta.get(SPEC_HASH_KEY, ""),
        edge_id=meta.get(EDGE_KEY, ""),
    )


__all__ = [
    "CLASSES_KEY",
    "EDGE_KEY",
    "SPEC_HASH_KEY",
    "FeatureBatch",
    "Progress",
    "apply_privacy",
    "check_model_matches_spec",
    "check_row_norms",
    "dequantize",
    "extract_features",
    "extract_images",
    "make_spec",
    "overlaps_decoding",
    "pack_features",
    "quantize",
    "row_norm_bound",
    "unpack_features",
    "usable_cores",
    "validate_features",
    "validate_upload_header",
]
