"""Federated fine-tuning rounds: what an edge's block update is, on the wire and on the
server.

After the one-shot head, a cycle may run R rounds. In each, every edge that uploaded
features trains the trainable part of the round's model (stages from the plan's
``train_from`` up, and the head) on its own images, and sends only the *update* of those
tensors: trained minus received, clipped to the plan's L2 bound, in the plan's dtype
(float16 by default), as safetensors with the spec hash, the round, the model it was
trained from and its number of training images in the metadata. The server checks all
of it (:func:`unpack_update`), averages the updates weighted by those numbers, adds the
plan's Gaussian noise to the average when the plan asks for it (the DP-FedAvg pattern:
each edge's contribution is bounded by the clip, the noise hides it), and registers the
round's model (:func:`aggregate`, :func:`apply_update`). The average is rounded to the
plan's dtype before it is added, and kept as a file of its own
(:func:`pack_aggregate`): an edge holding the round's parent downloads that instead of
the changed tensors and rebuilds the new weights to the bit (:func:`apply_aggregate`).

Only parameters travel: batch-norm statistics stay frozen while fine-tuning
(:func:`fl_core.training._train_mode`), so their update would always be zero.

The ``int8`` dtype halves float16's bytes: each tensor travels as int8 codes with one
float32 scale per output row (per tensor for a vector) under ``<name>#scale``, the codes
stochastically rounded, so the decoded update is the true one plus zero-mean noise of at
most one step per value (:func:`encode`, :func:`decode`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from fl_core import serialization
from fl_core.data import ImageSet
from fl_core.errors import IntegrityError, InvalidInput
from fl_core.features import SPEC_HASH_KEY
from fl_core.model import SplitModel, model_from_bytes, model_to_bytes
from fl_core.schemas import RoundPlan
from fl_core.training import (
    FinetuneConfig,
    Progress,
    finetune_activations,
    finetune_start,
    train_activations,
)

EDGE_KEY = "fedinspect.edge_id"
ROUND_KEY = "fedinspect.round"
BASE_KEY = "fedinspect.base_model_version"
SAMPLES_KEY = "fedinspect.samples"
PARENT_SHA_KEY = "fedinspect.parent_sha256"

#: how far over the clip bound an update may be: the edge clips in float32, then
#: rounds to float16, which can lengthen the vector by about 2**-11 relative
NORM_TOLERANCE = 1e-2

_WIRE_DTYPES = {"float16": torch.float16, "float32": torch.float32}
_HEADER_DTYPES = {"float16": "F16", "float32": "F32", "int8": "I8"}

#: the name of an int8 tensor's scales on the wire: ``<name>#scale``
SCALE_SUFFIX = "#scale"
_INT8_MAX = 127


def _n_rows(shape: Sequence[int]) -> int:
    """Rows of int8 scales for a tensor of ``shape``: one per output channel, one for a
    vector."""
    return int(shape[0]) if len(shape) >= 2 else 1


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a matrix with one row per scale (:func:`_n_rows`)."""
    return t.reshape(_n_rows(t.shape), -1)


def _quantize(
    t: torch.Tensor, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes of ``t`` and their per-row float32 scales, stochastically rounded
    (unbiased: the decoded value's expectation is ``t``)."""
    rows = _rows(t.detach().to(torch.float32))
    scale = rows.abs().amax(dim=1) / _INT8_MAX
    steps = rows / torch.where(scale > 0, scale, torch.ones_like(scale))[:, None]
    noise = torch.rand(steps.shape, generator=generator)
    codes = torch.floor(steps + noise).clamp_(-_INT8_MAX, _INT8_MAX)
    return codes.to(torch.int8).reshape(t.shape), scale


def _dequantize(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (_rows(codes).to(torch.float32) * scale[:, None]).reshape(codes.shape)


def encode(
    delta: Mapping[str, torch.Tensor], dtype: str, generator: torch.Generator | None = None
) -> dict[str, torch.Tensor]:
    """``delta`` as its tensors travel in ``dtype``: float16 or float32 as they are, or
    int8 codes beside their ``<name>#scale`` (``generator`` draws the rounding)."""
    if dtype != "int8":
        return {n: t.to(_WIRE_DTYPES[dtype]) for n, t in delta.items()}
    out: dict[str, torch.Tensor] = {}
    for name, t in delta.items():
        out[name], out[name + SCALE_SUFFIX] = _quantize(t, generator)
    return out


def decode(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The float32 update that :func:`encode`'s tensors stand for (int8 codes decoded
    with their scales), in the order the values came."""
    return {
        name: _dequantize(t, tensors[name + SCALE_SUFFIX])
        if name + SCALE_SUFFIX in tensors
        else t.to(torch.float32)
        for name, t in tensors.items()
        if not name.endswith(SCALE_SUFFIX)
    }


def wire_shapes(expected: Mapping[str, Sequence[int]], dtype: str) -> dict[str, list[int]]:
    """Every tensor an update in ``dtype`` carries, with its shape: ``expected`` (a
    round's trained tensors), and in int8 the scales of each, one per row."""
    out = {n: list(shape) for n, shape in expected.items()}
    if dtype == "int8":
        for n, shape in expected.items():
            out[n + SCALE_SUFFIX] = [_n_rows(shape)]
    return out


def update_names(model: SplitModel, train_from: str | None) -> list[str]:
    """The tensors a round trains and an update carries: the parameters of the stages
    from ``train_from`` up and of the head, in state-dict order."""
    start = finetune_start(model, train_from)
    names = []
    for name, _ in model.named_parameters():
        if name.startswith("head.") or (
            name.startswith("stages.") and int(name.split(".", 2)[1]) >= start
        ):
            names.append(name)
    return names


def snapshot(model: SplitModel, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """Copies of ``names`` (what a round started from, to take the update against)."""
    state = model.state_dict()
    return {n: state[n].detach().clone() for n in names}


def global_norm(tensors: Mapping[str, torch.Tensor]) -> float:
    """L2 norm of all tensors as one vector (accumulated in float64)."""
    total = 0.0
    for t in tensors.values():
        total += float(t.detach().to(torch.float64).pow(2).sum())
    return math.sqrt(total)


def clip(
    delta: Mapping[str, torch.Tensor], max_norm: float
) -> tuple[dict[str, torch.Tensor], float]:
    """``delta`` scaled to L2 norm at most ``max_norm``; also its norm before clipping."""
    norm = global_norm(delta)
    scale = 1.0 if norm <= max_norm or norm == 0 else max_norm / norm
    return {n: (t * scale).to(torch.float32) for n, t in delta.items()}, norm


def make_update(
    model: SplitModel, before: Mapping[str, torch.Tensor], plan: RoundPlan
) -> tuple[dict[str, torch.Tensor], float]:
    """The clipped update (trained ``model`` minus ``before``) and its norm before clipping."""
    state = model.state_dict()
    delta = {n: state[n].detach().float() - t.float() for n, t in before.items()}
    return clip(delta, plan.clip_norm)


def train_round(
    model: SplitModel,
    train: ImageSet,
    plan: RoundPlan,
    config: FinetuneConfig | None = None,
    progress: Progress | None = None,
) -> tuple[dict[str, torch.Tensor], float]:
    """One round's local training, in place: ``config`` (default: the fine-tuning
    recipe) for ``plan.epochs`` epochs at ``plan.lr`` from ``plan.train_from`` up;
    returns the clipped update and its norm before clipping. (The edge caches the frozen
    stages' activations across rounds instead: :func:`fl_core.training.train_activations`.)
    """
    cfg = dataclasses.replace(
        config or FinetuneConfig(),
        train_from=plan.train_from,
        epochs=plan.epochs,
        lr=plan.lr,
        backbone_lr_scale=plan.backbone_lr_scale,
    )
    start, x, y = train_activations(model, train, cfg)
    before = snapshot(model, update_names(model, plan.train_from))
    finetune_activations(model, start, x, y, config=cfg, progress=progress)
    return make_update(model, before, plan)


def pack_update(
    delta: Mapping[str, torch.Tensor],
    plan: RoundPlan,
    *,
    spec_hash: str,
    edge_id: str,
    round_number: int,
    base_version: int,
    samples: int,
    generator: torch.Generator | None = None,
) -> bytes:
    """An update as it travels: the plan's dtype (:func:`encode`), the round's identity
    in the metadata."""
    return serialization.dumps(
        encode(delta, plan.dtype, generator),
        {
            SPEC_HASH_KEY: spec_hash,
            EDGE_KEY: edge_id,
            ROUND_KEY: str(round_number),
            BASE_KEY: str(base_version),
            SAMPLES_KEY: str(samples),
        },
    )


@dataclass(frozen=True)
class Update:
    """One edge's checked update of one round."""

    tensors: dict[str, torch.Tensor]  # float32
    samples: int
    norm: float


def unpack_update(
    data: bytes,
    *,
    expected: Mapping[str, Sequence[int]],
    plan: RoundPlan,
    spec_hash: str,
    round_number: int,
    base_version: int,
    max_samples: int,
) -> Update:
    """Check an update against the round it claims to belong to, then load it.

    ``expected`` maps each tensor the round trains to its shape. Refused
    (:class:`InvalidInput`): another spec, round or base model; missing, extra or
    reshaped tensors; another dtype than the plan's; a sample count out of
    ``1..max_samples``; NaN or Inf; an L2 norm over the plan's clip bound.
    """
    header, meta = serialization.inspect_header(data)
    if meta.get(SPEC_HASH_KEY) != spec_hash:
        raise InvalidInput("the update was made for another feature spec (spec hash differs)")
    if meta.get(ROUND_KEY) != str(round_number):
        raise InvalidInput(
            f"the update is for round {meta.get(ROUND_KEY)!r}; this route takes round "
            f"{round_number}"
        )
    if meta.get(BASE_KEY) != str(base_version):
        raise InvalidInput(
            f"the update was trained from model {meta.get(BASE_KEY)!r}; round {round_number} "
            f"trains model {base_version}"
        )
    try:
        samples = int(meta.get(SAMPLES_KEY, ""))
    except ValueError:
        raise InvalidInput(f"metadata {SAMPLES_KEY} must be an integer") from None
    if not 1 <= samples <= max_samples:
        raise InvalidInput(f"{SAMPLES_KEY} must be between 1 and {max_samples}")
    wire = wire_shapes(expected, plan.dtype)
    missing = sorted(set(wire) - set(header))
    extra = sorted(set(header) - set(wire))
    if missing or extra:
        what = []
        if missing:
            what.append(f"{len(missing)} missing (first {missing[0]!r})")
        if extra:
            what.append(f"{len(extra)} unexpected (first {extra[0][:80]!r})")
        raise InvalidInput(
            "the update must carry exactly the tensors the round trains: " + ", ".join(what)
        )
    for name, info in header.items():
        scales = name.endswith(SCALE_SUFFIX)
        want = "F32" if scales else _HEADER_DTYPES[plan.dtype]
        if info["dtype"] != want:
            sends = "its scales are float32" if scales else f"the round sends {plan.dtype}"
            raise InvalidInput(f"tensor {name!r} is {info['dtype']}; {sends}")
        if list(info["shape"]) != wire[name]:  # type: ignore[call-overload]
            raise InvalidInput(
                f"tensor {name!r} has shape {info['shape']}; the model's is {wire[name]}"
            )
    tensors, _ = serialization.loads(data)
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise InvalidInput(f"tensor {name!r} holds NaN or Inf")
        if name.endswith(SCALE_SUFFIX) and bool((t < 0).any()):
            raise InvalidInput(f"tensor {name!r} holds a negative scale")
    decoded = decode(tensors)
    # in the model's order: seeded noise lands on the same tensors
    out = {name: decoded[name] for name in expected}
    norm = global_norm(out)
    if norm > plan.clip_norm * (1 + NORM_TOLERANCE):
        raise InvalidInput(
            f"the update's L2 norm {norm:.4g} is over the round's clip bound "
            f"{plan.clip_norm:.4g}: clip it on the edge"
        )
    return Update(tensors=out, samples=samples, norm=norm)


def aggregate(
    updates: Sequence[Update], plan: RoundPlan, generator: torch.Generator | None = None
) -> dict[str, torch.Tensor]:
    """The sample-weighted mean of the updates, with the plan's Gaussian noise.

    One edge moves the weighted mean by at most ``w_max * clip_norm`` (``w_max``: the
    largest weight); the noise's standard deviation is ``noise_multiplier`` times that.
    """
    if not updates:
        raise InvalidInput("a round needs at least one update to aggregate")
    total = sum(u.samples for u in updates)
    weights = [u.samples / total for u in updates]
    names = list(updates[0].tensors)
    mean = {
        n: torch.stack([w * u.tensors[n] for w, u in zip(weights, updates, strict=True)]).sum(0)
        for n in names
    }
    if plan.noise_multiplier > 0:
        std = plan.noise_multiplier * plan.clip_norm * max(weights)
        mean = {n: t + torch.randn(t.shape, generator=generator) * std for n, t in mean.items()}
    return {n: t.to(torch.float32) for n, t in mean.items()}


def apply_update(model: SplitModel, delta: Mapping[str, torch.Tensor]) -> None:
    """Add ``delta`` to the model's tensors, in place."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, t in delta.items():
            params[name].add_(t.to(params[name].dtype))


def pack_aggregate(
    delta: Mapping[str, torch.Tensor],
    dtype: str,
    parent_sha256: str,
    generator: torch.Generator | None = None,
) -> tuple[dict[str, torch.Tensor], bytes]:
    """A round's averaged update rounded to the wire ``dtype``: the tensors the server adds
    to the parent (decoded, as :func:`apply_aggregate` decodes them), and the file edges
    download (the parent's sha256 in its metadata)."""
    wire = encode(delta, dtype, generator)
    added = decode(wire) if dtype == "int8" else wire
    return added, serialization.dumps(wire, {PARENT_SHA_KEY: parent_sha256})


def apply_aggregate(parent: bytes, data: bytes) -> bytes:
    """The weights of a round's model, from its parent's and its averaged update: the
    server's own arithmetic (:func:`apply_update` on the parent's model), so the bytes and
    their sha256 are the server's. IntegrityError when the update is not for ``parent``
    or does not fit its model."""
    wire, metadata = serialization.loads(data)
    if metadata.get(PARENT_SHA_KEY) != serialization.sha256_bytes(parent):
        raise IntegrityError("the averaged update was made for other weights than the ones held")
    try:
        tensors = decode(wire)
    except (RuntimeError, IndexError):
        raise IntegrityError("the averaged update's int8 tensors do not fit their scales") from None
    model = model_from_bytes(parent)
    params = dict(model.named_parameters())
    for name, t in tensors.items():
        if name not in params or params[name].shape != t.shape:
            raise IntegrityError(f"the averaged update's tensor {name!r} does not fit the model")
    apply_update(model, tensors)
    return model_to_bytes(model)


__all__ = [
    "BASE_KEY",
    "EDGE_KEY",
    "NORM_TOLERANCE",
    "PARENT_SHA_KEY",
    "ROUND_KEY",
    "SAMPLES_KEY",
    "SCALE_SUFFIX",
    "Update",
    "aggregate",
    "apply_aggregate",
    "apply_update",
    "clip",
    "decode",
    "encode",
    "global_norm",
    "make_update",
    "pack_aggregate",
    "pack_update",
    "snapshot",
    "train_round",
    "unpack_update",
    "update_names",
    "wire_shapes",
]
