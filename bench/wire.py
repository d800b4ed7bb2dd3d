"""Bytes on the wire per training image, against the raw image bytes on disk.

Upload: the packed feature upload (privacy transform and wire dtype applied) of real
elpv images, divided by the rows. Download: what one cycle costs an edge in model
weights, computed with the same functions the server and the edge use (tensor digests, subset,
manifest): in the first cycle the edge fetches the base model as a delta from the
ImageNet weights installed beside it (only the head differs) and the retrained one as a
delta from that; a later cycle already holds its base model and downloads only the
delta. What a first cycle would cost without the local weights, and without deltas at
all, is reported beside. The demo's measured ``bytes_downloaded`` is reported beside.

A federated round, per edge, with the server's default round plan (its first trained
stage, float16): the update the edge uploads, and the download of the round's model
as the changed float32 tensors against the averaged update the edge now fetches.
"""

from __future__ import annotations

from typing import Any

import torch

from edge_service.services.weights import pretrained_reference
from fl_core import serialization
from fl_core.data import batches, load_elpv
from fl_core.features import extract_features, make_spec
from fl_core.model import SplitModel, build_split_model, model_to_bytes
from fl_core.privacy import pack_upload
from fl_core.rounds import apply_aggregate, pack_aggregate, pack_update, update_names
from fl_core.schemas import (
    AggregatedUpdate,
    FeatureDType,
    ModelManifest,
    PrivacyConfig,
)
from server_service.config import Settings as ServerSettings
from server_service.services.models import round_plan

DTYPES: tuple[FeatureDType, ...] = ("float32", "float16", "int8")


def _delta_bytes(old: bytes, new: bytes) -> tuple[int, int]:
    """(manifest JSON bytes + subset bytes, changed tensors) to go from old to new."""
    digests = serialization.tensor_digests(new)
    manifest = ModelManifest(
        version=2, sha256=serialization.sha256_bytes(new), tensors=digests
    ).model_dump_json()
    have = serialization.tensor_digests(old)
    changed = sorted(n for n, d in digests.items() if have.get(n) != d)
    return len(manifest) + len(serialization.subset(new, changed)), len(changed)


def _round_bytes(model: SplitModel, parent: bytes) -> dict[str, Any]:
    """One round for one edge at the server's default plan: upload, and the download of
    the round's model both ways (the parent held)."""
    # the defaults of the ROUND_* settings (no token needed to read them)
    plan = round_plan(ServerSettings.model_construct(), model)
    names = update_names(model, plan.train_from)
    params = dict(model.named_parameters())
    gen = torch.Generator().manual_seed(0)
    delta = {n: torch.randn(params[n].shape, generator=gen) * 1e-3 for n in names}
    upload = pack_update(
        delta,
        plan,
        spec_hash="0" * 64,
        edge_id="edge-1",
        round_number=1,
        base_version=2,
        samples=100,
    )
    parent_sha = serialization.sha256_bytes(parent)
    _, file = pack_aggregate(delta, plan.dtype, parent_sha)
    new = apply_aggregate(parent, file)  # the edge's rebuild, the server's arithmetic
    changed, n_changed = _delta_bytes(parent, new)
    manifest = ModelManifest(
        version=3,
        sha256=serialization.sha256_bytes(new),
        tensors=serialization.tensor_digests(new),
        update=AggregatedUpdate(
            parent=2,
            parent_sha256=parent_sha,
            sha256=serialization.sha256_bytes(file),
            size=len(file),
            dtype=plan.dtype,
        ),
    ).model_dump_json()
    return {
        "train_from": plan.train_from,
        "dtype": plan.dtype,
        "trained_tensors": len(names),
        "trained_parameters": sum(params[n].numel() for n in names),
        "upload": len(upload),
        "download_changed_tensors": changed,
        "download_update": len(manifest) + len(file),
        "changed_tensors": n_changed,
    }


def run(quick: bool, input_size: int = 224) -> dict[str, Any]:
    n = 64 if quick else 256
    elpv = load_elpv()
    images = elpv.subset(list(range(0, len(elpv), max(1, len(elpv) // n)))[:n])
    raw = images.raw_bytes() / len(images)
    model = build_split_model(["functional", "defective"], input_size=input_size)
    feats, labels = extract_features(model, batches(images, input_size, 16))
    upload: dict[str, float] = {}
    for dtype in DTYPES:
        spec = make_spec(model, 1, "0" * 64, PrivacyConfig(dtype=dtype))
        upload[dtype] = round(len(pack_upload(feats, labels, spec, "edge-1")) / len(labels), 1)
    full = model_to_bytes(model)
    reference = pretrained_reference(model.arch.backbone)
    assert reference is not None, "the backbone's ImageNet weights are not installed"
    first, first_changed = _delta_bytes(reference, full)
    with torch.no_grad():  # what a cycle changes: the part above the cut
        for p in model.head.parameters():
            p.add_(0.01)
    retrained = model_to_bytes(model)
    delta, changed = _delta_bytes(full, retrained)
    per_round = _round_bytes(model, retrained)
    return {
        "images": len(images),
        "input_size": input_size,
        "raw_bytes_per_image": round(raw, 1),
        "upload_bytes_per_image": upload,
        "download_bytes_per_cycle": {
            "first_cycle": first + delta,
            "later_cycles": delta,
            "base_from_local_weights": first,
            "base_changed_tensors": first_changed,
            "full_model": len(full),
            "delta": delta,
            "changed_tensors": changed,
            "total_tensors": len(serialization.tensor_digests(full)),
            "without_local_weights_first_cycle": len(full) + delta,
            "without_delta_first_cycle": 2 * len(full),
        },
        "ratio": {d: round(upload[d] / raw, 4) for d in DTYPES},
        "per_round_per_edge": per_round,
    }


__all__ = ["run"]
