"""Bytes on the wire per training image, against the raw image bytes on disk.

Upload: the packed feature upload (privacy transform and wire dtype applied) of real
elpv images, divided by the rows. Download: what one cycle costs an edge in model
weights, computed with the same functions the server and the edge use (tensor digests, subset,
manifest): in the first cycle the edge fetches the base model as a delta from the
ImageNet weights installed beside it (only the head differs) and the retrained one as a
delta from that; a later cycle already holds its base model and downloads only the
delta. What a first cycle would cost without the local weights, and without deltas at
all, is reported beside. The demo's measured ``bytes_downloaded`` is reported beside.
"""

from __future__ import annotations

from typing import Any

import torch

from edge_service.services.weights import pretrained_reference
from fl_core import serialization
from fl_core.data import batches, load_elpv
from fl_core.features import extract_features, make_spec
from fl_core.model import build_split_model, model_to_bytes
from fl_core.privacy import pack_upload
from fl_core.schemas import FeatureDType, PrivacyConfig

DTYPES: tuple[FeatureDType, ...] = ("float32", "float16", "int8")


def _delta_bytes(old: bytes, new: bytes) -> tuple[int, int]:
    """(manifest JSON bytes + subset bytes, changed tensors) to go from old to new."""
    from fl_core.schemas import ModelManifest

    digests = serialization.tensor_digests(new)
    manifest = ModelManifest(
        version=2, sha256=serialization.sha256_bytes(new), tensors=digests
    ).model_dump_json()
    have = serialization.tensor_digests(old)
    changed = sorted(n for n, d in digests.items() if have.get(n) != d)
    return len(manifest) + len(serialization.subset(new, changed)), len(changed)


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
    }


__all__ = ["run"]
