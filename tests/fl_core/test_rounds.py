"""A federated round's update: packing, every check of unpacking, clipping, the
sample-weighted average, its noise, and applying it to a model."""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch

from fl_core import serialization
from fl_core.errors import IntegrityError, InvalidInput
from fl_core.features import SPEC_HASH_KEY
from fl_core.model import (
    HeadConfig,
    SplitModel,
    build_split_model,
    model_from_bytes,
    model_to_bytes,
)
from fl_core.rounds import (
    BASE_KEY,
    EDGE_KEY,
    ROUND_KEY,
    SAMPLES_KEY,
    SCALE_SUFFIX,
    Update,
    aggregate,
    apply_aggregate,
    apply_update,
    clip,
    decode,
    encode,
    global_norm,
    make_update,
    pack_aggregate,
    pack_update,
    snapshot,
    unpack_update,
    update_names,
)
from fl_core.schemas import RoundPlan

SPEC = "a" * 64


def _model() -> SplitModel:
    return build_split_model(
        ["ok", "defect"], backbone="tiny_cnn", pretrained=False, input_size=32, head=HeadConfig(8)
    )


def _plan(**overrides: Any) -> RoundPlan:
    values: dict[str, Any] = {
        "rounds": 2,
        "train_from": "b1",
        "epochs": 1,
        "clip_norm": 1.0,
        "noise_multiplier": 0.0,
        "dtype": "float16",
        "deadline_s": 60.0,
    }
    values.update(overrides)
    return RoundPlan(**values)


def _shapes(model: SplitModel, plan: RoundPlan) -> dict[str, list[int]]:
    params = dict(model.named_parameters())
    return {n: list(params[n].shape) for n in update_names(model, plan.train_from)}


def _delta(shapes: dict[str, list[int]], norm: float, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors of ``shapes`` with global L2 norm ``norm``."""
    gen = torch.Generator().manual_seed(seed)
    raw = {n: torch.randn(s, generator=gen) for n, s in shapes.items()}
    scale = norm / global_norm(raw)
    return {n: t * scale for n, t in raw.items()}


def _pack(delta: dict[str, torch.Tensor], plan: RoundPlan, **overrides: Any) -> bytes:
    values: dict[str, Any] = {
        "spec_hash": SPEC,
        "edge_id": "edge-a",
        "round_number": 1,
        "base_version": 2,
        "samples": 10,
    }
    values.update(overrides)
    return pack_update(delta, plan, **values)


def _unpack(data: bytes, shapes: dict[str, list[int]], plan: RoundPlan, **overrides: Any) -> Update:
    values: dict[str, Any] = {
        "expected": shapes,
        "plan": plan,
        "spec_hash": SPEC,
        "round_number": 1,
        "base_version": 2,
        "max_samples": 1000,
    }
    values.update(overrides)
    return unpack_update(data, **values)


@pytest.fixture
def model() -> SplitModel:
    return _model()


def test_update_names_are_the_trained_stages_and_the_head(model: SplitModel) -> None:
    # tiny_cnn: stem, b0, b1, pooled; from b1 up: stage 2 (b1) and the head, no buffers
    assert update_names(model, "b1") == [
        "stages.2.0.weight",
        "stages.2.1.weight",
        "stages.2.1.bias",
        "head.1.weight",
        "head.1.bias",
        "head.4.weight",
        "head.4.bias",
    ]
    assert update_names(model, None) == update_names(model, model.info.finetune_from)
    everything = update_names(model, "stem")
    assert everything == [n for n, _ in model.named_parameters()]
    with pytest.raises(InvalidInput):
        update_names(model, "no-such-stage")


def test_pack_unpack_round_trip_in_float16(model: SplitModel) -> None:
    plan = _plan()
    shapes = _shapes(model, plan)
    delta = _delta(shapes, 0.9)
    data = _pack(delta, plan, samples=37)
    header, meta = serialization.inspect_header(data)
    assert {info["dtype"] for info in header.values()} == {"F16"}
    assert meta == {
        SPEC_HASH_KEY: SPEC,
        EDGE_KEY: "edge-a",
        ROUND_KEY: "1",
        BASE_KEY: "2",
        SAMPLES_KEY: "37",
    }
    update = _unpack(data, shapes, plan)
    assert update.samples == 37
    assert set(update.tensors) == set(shapes)
    for name, t in update.tensors.items():
        assert t.dtype == torch.float32
        assert list(t.shape) == shapes[name]
        # float16 keeps ~3 decimal digits
        torch.testing.assert_close(t, delta[name], rtol=1e-3, atol=1e-4)
    assert update.norm == pytest.approx(0.9, rel=1e-3)
    # packing is deterministic: the same update gives the same bytes (idempotent PUT)
    assert _pack(delta, plan, samples=37) == data


def test_float32_plan_round_trips_exactly(model: SplitModel) -> None:
    plan = _plan(dtype="float32")
    shapes = _shapes(model, plan)
    delta = _delta(shapes, 0.5)
    update = _unpack(_pack(delta, plan), shapes, plan)
    for name, t in update.tensors.items():
        assert torch.equal(t, delta[name])


def _payload(header: dict[str, dict[str, Any]]) -> int:
    return sum(i["data_offsets"][1] - i["data_offsets"][0] for i in header.values())


def test_int8_plan_halves_float16_and_decodes_within_a_step(model: SplitModel) -> None:
    plan = _plan(dtype="int8")
    shapes = _shapes(model, plan)
    delta = _delta(shapes, 0.9)
    data = _pack(delta, plan)
    header, _ = serialization.inspect_header(data)
    values = {n: i for n, i in header.items() if not n.endswith(SCALE_SUFFIX)}
    assert set(values) == set(shapes)
    assert {i["dtype"] for i in values.values()} == {"I8"}
    # one float32 scale per output row, one per vector
    for name, shape in shapes.items():
        scales = header[name + SCALE_SUFFIX]
        assert scales["dtype"] == "F32"
        assert scales["shape"] == [shape[0] if len(shape) >= 2 else 1]
    # the values take half float16's bytes (the tiny model's header is most of the file)
    f16, _ = serialization.inspect_header(_pack(delta, _plan(dtype="float16")))
    assert _payload(values) * 2 == _payload(f16)
    update = _unpack(data, shapes, plan)
    for name, t in update.tensors.items():
        rows = t.reshape(shapes[name][0], -1) if len(shapes[name]) >= 2 else t.reshape(1, -1)
        step = delta[name].reshape(rows.shape).abs().amax(1, keepdim=True) / 127
        error = (rows - delta[name].reshape(rows.shape)).abs()
        assert bool((error <= step * (1 + 1e-5)).all()), name
    assert update.norm == pytest.approx(0.9, rel=0.01)


def test_int8_rounding_is_unbiased() -> None:
    """Stochastic rounding: the mean of many encodings is the value, where rounding to
    the nearest step would be off by up to half a step every time."""
    t = {"w": torch.tensor([[1.0, 0.3, -0.55, 0.004]])}  # step 1/127: off-grid values
    gen = torch.Generator().manual_seed(0)
    decoded = torch.stack([decode(encode(t, "int8", gen))["w"] for _ in range(4000)])
    torch.testing.assert_close(decoded.mean(0), t["w"], rtol=0, atol=3e-4)
    assert len({tuple(d.flatten().tolist()) for d in decoded[:50]}) > 1


def test_an_int8_update_with_bad_scales_is_refused(model: SplitModel) -> None:
    plan = _plan(dtype="int8")
    shapes = _shapes(model, plan)
    wire = encode(_delta(shapes, 0.5), "int8")
    meta = {SPEC_HASH_KEY: SPEC, ROUND_KEY: "1", BASE_KEY: "2", SAMPLES_KEY: "10"}
    name = next(iter(shapes))
    without = {n: t for n, t in wire.items() if n != name + SCALE_SUFFIX}
    with pytest.raises(InvalidInput, match="1 missing"):
        _unpack(serialization.dumps(without, meta), shapes, plan)
    for bad, message in [
        (-wire[name + SCALE_SUFFIX], "negative scale"),
        (wire[name + SCALE_SUFFIX].double(), "its scales are float32"),
        (torch.full_like(wire[name + SCALE_SUFFIX], math.inf), "NaN or Inf"),
        (torch.ones(7), "has shape"),
    ]:
        with pytest.raises(InvalidInput, match=message):
            _unpack(serialization.dumps({**wire, name + SCALE_SUFFIX: bad}, meta), shapes, plan)
    # float16 values where the round sends int8
    f16 = {**wire, name: wire[name].to(torch.float16)}
    with pytest.raises(InvalidInput, match="the round sends int8"):
        _unpack(serialization.dumps(f16, meta), shapes, plan)
    # huge scales: a norm over the bound is refused like any other
    big = {**wire, name + SCALE_SUFFIX: wire[name + SCALE_SUFFIX] * 100}
    with pytest.raises(InvalidInput, match="over the round's clip bound"):
        _unpack(serialization.dumps(big, meta), shapes, plan)


@pytest.mark.parametrize(
    ("pack", "unpack", "message"),
    [
        ({"spec_hash": "b" * 64}, {}, "another feature spec"),
        ({"round_number": 2}, {}, "the update is for round '2'; this route takes round 1"),
        ({}, {"round_number": 3}, "the update is for round '1'; this route takes round 3"),
        ({"base_version": 5}, {}, "trained from model '5'; round 1 trains model 2"),
        ({"samples": 0}, {}, "fedinspect.samples must be between 1 and 1000"),
        ({"samples": -4}, {}, "fedinspect.samples must be between 1 and 1000"),
        ({"samples": 1001}, {}, "fedinspect.samples must be between 1 and 1000"),
    ],
)
def test_metadata_refusals(
    model: SplitModel, pack: dict[str, Any], unpack: dict[str, Any], message: str
) -> None:
    plan = _plan()
    shapes = _shapes(model, plan)
    data = _pack(_delta(shapes, 0.5), plan, **pack)
    with pytest.raises(InvalidInput) as err:
        _unpack(data, shapes, plan, **unpack)
    assert message in err.value.detail


def _raw(tensors: dict[str, torch.Tensor], **meta: str) -> bytes:
    values = {
        SPEC_HASH_KEY: SPEC,
        EDGE_KEY: "edge-a",
        ROUND_KEY: "1",
        BASE_KEY: "2",
        SAMPLES_KEY: "10",
    }
    values.update(meta)
    return serialization.dumps(tensors, values)


def test_samples_that_are_not_an_integer_are_refused(model: SplitModel) -> None:
    plan = _plan()
    shapes = _shapes(model, plan)
    delta = {n: t.half() for n, t in _delta(shapes, 0.5).items()}
    for bad in ("ten", "1.5", ""):
        with pytest.raises(InvalidInput) as err:
            _unpack(_raw(delta, **{SAMPLES_KEY: bad}), shapes, plan)
        assert err.value.detail == "metadata fedinspect.samples must be an integer"
    no_meta = serialization.dumps(delta, {SPEC_HASH_KEY: SPEC, ROUND_KEY: "1", BASE_KEY: "2"})
    with pytest.raises(InvalidInput):
        _unpack(no_meta, shapes, plan)


def test_missing_and_extra_tensors_are_refused(model: SplitModel) -> None:
    plan = _plan()
    shapes = _shapes(model, plan)
    delta = _delta(shapes, 0.5)
    missing = dict(delta)
    del missing["head.4.bias"]
    with pytest.raises(InvalidInput) as err:
        _unpack(_pack(missing, plan), shapes, plan)
    assert err.value.detail == (
        "the update must carry exactly the tensors the round trains: "
        "1 missing (first 'head.4.bias')"
    )
    # a frozen stage's weights are not the round's to change
    extra = {**delta, "stages.0.0.weight": torch.zeros(8, 3, 3, 3)}
    with pytest.raises(InvalidInput) as err:
        _unpack(_pack(extra, plan), shapes, plan)
    assert err.value.detail == (
        "the update must carry exactly the tensors the round trains: "
        "1 unexpected (first 'stages.0.0.weight')"
    )
    # a batch-norm statistic is not a parameter: it never travels
    stats = {**delta, "stages.2.1.running_mean": torch.zeros(32)}
    with pytest.raises(InvalidInput, match="1 unexpected"):
        _unpack(_pack(stats, plan), shapes, plan)


def test_wrong_dtype_is_refused(model: SplitModel) -> None:
    plan = _plan()  # float16 on the wire
    shapes = _shapes(model, plan)
    delta = _delta(shapes, 0.5)
    as_f32 = _pack(delta, _plan(dtype="float32"))
    with pytest.raises(InvalidInput) as err:
        _unpack(as_f32, shapes, plan)
    assert "is F32; the round sends float16" in err.value.detail
    mixed = {n: (t.double() if n == "head.1.bias" else t.half()) for n, t in delta.items()}
    with pytest.raises(InvalidInput) as err:
        _unpack(_raw(mixed), shapes, plan)
    assert err.value.detail == "tensor 'head.1.bias' is F64; the round sends float16"


def test_wrong_shape_is_refused(model: SplitModel) -> None:
    plan = _plan()
    shapes = _shapes(model, plan)
    delta = _delta(shapes, 0.5)
    delta["head.4.weight"] = delta["head.4.weight"].reshape(8, 2)  # same size, other shape
    with pytest.raises(InvalidInput) as err:
        _unpack(_pack(delta, plan), shapes, plan)
    assert err.value.detail == ("tensor 'head.4.weight' has shape [8, 2]; the model's is [2, 8]")


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nan_and_inf_are_refused(model: SplitModel, bad: float) -> None:
    plan = _plan()
    shapes = _shapes(model, plan)
    delta = _delta(shapes, 0.5)
    delta["head.1.weight"][3, 4] = bad
    with pytest.raises(InvalidInput) as err:
        _unpack(_pack(delta, plan), shapes, plan)
    assert err.value.detail == "tensor 'head.1.weight' holds NaN or Inf"


def test_an_update_over_the_norm_bound_is_refused(model: SplitModel) -> None:
    plan = _plan(clip_norm=1.0)
    shapes = _shapes(model, plan)
    with pytest.raises(InvalidInput) as err:
        _unpack(_pack(_delta(shapes, 1.5), plan), shapes, plan)
    assert err.value.detail == (
        "the update's L2 norm 1.5 is over the round's clip bound 1: clip it on the edge"
    )
    # just over the bound, beyond float16's rounding: refused too
    with pytest.raises(InvalidInput):
        _unpack(_pack(_delta(shapes, 1.02), plan), shapes, plan)
    # at the bound: accepted, whatever float16 rounding did to its length
    for seed in range(5):
        clipped, _ = clip(_delta(shapes, 7.0, seed=seed), plan.clip_norm)
        assert _unpack(_pack(clipped, plan), shapes, plan).norm <= 1.0 * 1.01


def test_clip_scales_a_long_update_down_to_the_bound() -> None:
    delta = {"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([[4.0]])}
    clipped, norm = clip(delta, 1.0)
    assert norm == pytest.approx(5.0)
    assert global_norm(clipped) == pytest.approx(1.0)
    torch.testing.assert_close(clipped["a"], torch.tensor([0.6, 0.0]))
    torch.testing.assert_close(clipped["b"], torch.tensor([[0.8]]))


def test_clip_leaves_a_short_update_alone() -> None:
    delta = {"a": torch.tensor([0.3, 0.0]), "b": torch.tensor([[0.4]])}
    clipped, norm = clip(delta, 1.0)
    assert norm == pytest.approx(0.5)
    for name in delta:
        assert torch.equal(clipped[name], delta[name])
    zero, norm = clip({"a": torch.zeros(3)}, 1.0)
    assert norm == 0.0 and torch.equal(zero["a"], torch.zeros(3))


def test_make_update_is_trained_minus_before_clipped(model: SplitModel) -> None:
    plan = _plan(clip_norm=1.0)
    names = update_names(model, plan.train_from)
    before = snapshot(model, names)
    with torch.no_grad():
        dict(model.named_parameters())["head.4.bias"].add_(torch.tensor([0.3, -0.4]))
    delta, norm = make_update(model, before, plan)
    assert set(delta) == set(names)
    assert norm == pytest.approx(0.5)
    torch.testing.assert_close(delta["head.4.bias"], torch.tensor([0.3, -0.4]))
    assert all(float(t.abs().sum()) == 0 for n, t in delta.items() if n != "head.4.bias")
    # the snapshot is a copy: training the model did not move it
    assert not torch.equal(before["head.4.bias"], model.state_dict()["head.4.bias"])
    with torch.no_grad():
        dict(model.named_parameters())["head.4.bias"].add_(torch.tensor([3.0, -4.0]))
    long, norm = make_update(model, before, plan)
    assert norm == pytest.approx(5.5)
    assert global_norm(long) == pytest.approx(1.0)


def test_aggregate_is_the_sample_weighted_mean() -> None:
    plan = _plan()
    a = Update(tensors={"w": torch.tensor([1.0, 0.0]), "b": torch.tensor(2.0)}, samples=30, norm=0)
    b = Update(tensors={"w": torch.tensor([0.0, 1.0]), "b": torch.tensor(-2.0)}, samples=10, norm=0)
    mean = aggregate([a, b], plan)
    torch.testing.assert_close(mean["w"], torch.tensor([0.75, 0.25]))
    torch.testing.assert_close(mean["b"], torch.tensor(1.0))
    assert all(t.dtype == torch.float32 for t in mean.values())
    # one update is its own mean
    torch.testing.assert_close(aggregate([b], plan)["w"], b.tensors["w"])
    with pytest.raises(InvalidInput):
        aggregate([], plan)


def test_noise_has_the_stated_standard_deviation() -> None:
    plan = _plan(clip_norm=2.0, noise_multiplier=0.5)
    n = 20_000
    a = Update(tensors={"w": torch.zeros(n)}, samples=30, norm=0)
    b = Update(tensors={"w": torch.zeros(n)}, samples=10, norm=0)
    noisy = aggregate([a, b], plan, torch.Generator().manual_seed(0))["w"]
    # noise_multiplier x clip_norm x the largest weight (30 / 40)
    expected = 0.5 * 2.0 * 0.75
    assert float(noisy.std()) == pytest.approx(expected, rel=0.05)
    assert abs(float(noisy.mean())) < 0.05
    again = aggregate([a, b], plan, torch.Generator().manual_seed(0))["w"]
    assert torch.equal(noisy, again)  # the generator decides the noise
    quiet = aggregate([a, b], _plan(noise_multiplier=0.0))["w"]
    assert torch.equal(quiet, torch.zeros(n))


def test_apply_update_adds_to_the_parameters(model: SplitModel) -> None:
    before = copy.deepcopy(model.state_dict())
    delta = {"head.4.bias": torch.tensor([0.5, -1.0]), "stages.2.1.weight": torch.ones(32)}
    apply_update(model, delta)
    after = model.state_dict()
    torch.testing.assert_close(after["head.4.bias"], before["head.4.bias"] + delta["head.4.bias"])
    torch.testing.assert_close(after["stages.2.1.weight"], before["stages.2.1.weight"] + 1)
    for name in before:
        if name not in delta:
            assert torch.equal(after[name], before[name]), name


def test_an_edge_rebuilds_the_servers_weights_from_the_averaged_update(
    model: SplitModel,
) -> None:
    plan = _plan()
    parent = model_to_bytes(model)
    mean = aggregate([Update(_delta(_shapes(model, plan), 0.7), 10, 0.7)], plan)
    wire, file = pack_aggregate(mean, "float16", serialization.sha256_bytes(parent))
    assert all(t.dtype == torch.float16 for t in wire.values())
    # the server: its copy of the parent plus the rounded mean
    server = model_from_bytes(parent)
    apply_update(server, wire)
    rebuilt = apply_aggregate(parent, file)
    assert rebuilt == model_to_bytes(server)
    assert rebuilt != parent
    # half the bytes of the float32 tensors it changes
    changed = serialization.subset(rebuilt, list(wire))
    assert len(file) < 0.6 * len(changed)


def test_an_edge_rebuilds_the_servers_weights_from_an_int8_averaged_update(
    model: SplitModel,
) -> None:
    plan = _plan(dtype="int8")
    parent = model_to_bytes(model)
    mean = aggregate([Update(_delta(_shapes(model, plan), 0.7), 10, 0.7)], plan)
    gen = torch.Generator().manual_seed(3)
    added, file = pack_aggregate(mean, "int8", serialization.sha256_bytes(parent), gen)
    assert all(t.dtype == torch.float32 for t in added.values()) and set(added) == set(mean)
    server = model_from_bytes(parent)
    apply_update(server, added)
    rebuilt = apply_aggregate(parent, file)
    assert rebuilt == model_to_bytes(server) and rebuilt != parent
    # scales that do not fit their codes
    wire, meta = serialization.loads(file)
    name = next(iter(mean))
    wire[name + SCALE_SUFFIX] = torch.ones(99)
    with pytest.raises(IntegrityError, match="do not fit their scales"):
        apply_aggregate(parent, serialization.dumps(wire, meta))


def test_an_averaged_update_for_other_weights_or_another_model_is_refused(
    model: SplitModel,
) -> None:
    plan = _plan()
    parent = model_to_bytes(model)
    mean = aggregate([Update(_delta(_shapes(model, plan), 0.7), 10, 0.7)], plan)
    _, for_other = pack_aggregate(mean, "float16", "0" * 64)
    with pytest.raises(IntegrityError, match="other weights"):
        apply_aggregate(parent, for_other)
    wrong = {"head.4.bias": torch.zeros(5)}
    _, misfit = pack_aggregate(wrong, "float16", serialization.sha256_bytes(parent))
    with pytest.raises(IntegrityError, match=r"'head\.4\.bias' does not fit"):
        apply_aggregate(parent, misfit)
    _, unknown = pack_aggregate(
        {"nope": torch.zeros(2)}, "float16", serialization.sha256_bytes(parent)
    )
    with pytest.raises(IntegrityError, match="'nope' does not fit"):
        apply_aggregate(parent, unknown)
