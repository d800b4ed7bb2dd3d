"""Datasets, deterministic splits, partitions and dataset spec strings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fl_core.data import (
    SYMMETRIES,
    align_classes,
    batches,
    image_array,
    image_transform,
    load_dataset_spec,
    load_elpv,
    load_image_folder,
    partition_by_attribute,
    partition_dirichlet,
    partition_iid,
    split,
    symmetric_view,
)
from fl_core.errors import ConfigError, InvalidInput
from tests.factories import NEU_DET, make_image_folder


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "imgs", per_class=20)


def test_image_folder_classes_and_records(folder: Path) -> None:
    ds = load_image_folder(folder)
    assert ds.class_names == ["bright", "dark"]
    assert len(ds) == 40 and ds.counts() == {"bright": 20, "dark": 20}
    assert ds.raw_bytes() > 0


def test_classes_are_aligned_by_name_not_position() -> None:
    assert align_classes(["defective", "functional"], ["functional", "defective"]) == [1, 0]
    assert align_classes(["a", "b"], ["a", "b"]) == [0, 1]
    # label skew: an edge with some of the server's classes keeps the server's indices
    assert align_classes(["crack", "functional"], ["functional", "scratch", "crack"]) == [2, 0]


def test_a_class_the_server_does_not_know_is_refused_by_name() -> None:
    with pytest.raises(InvalidInput) as err:
        align_classes(["defective", "dusty", "functional"], ["functional", "defective"])
    assert "['dusty']" in err.value.detail
    assert "['functional', 'defective']" in err.value.detail


def test_an_image_folder_relabelled_for_the_server(folder: Path) -> None:
    ds = load_image_folder(folder)  # bright, dark: alphabetical
    server = ["dark", "grey", "bright"]
    aligned = ds.aligned_to(server)
    assert aligned.class_names == server
    assert [r.path for r in aligned.records] == [r.path for r in ds.records]
    by_path = {r.path: ds.class_names[r.label] for r in ds.records}
    assert all(server[r.label] == by_path[r.path] for r in aligned.records)
    assert aligned.counts() == {"dark": 20, "grey": 0, "bright": 20}
    assert ds.aligned_to(["bright", "dark"]) is ds


def test_image_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_image_folder(tmp_path / "nope")
    (tmp_path / "one").mkdir()
    with pytest.raises(ConfigError, match="at least two class folders"):
        load_image_folder(tmp_path)


def test_split_is_deterministic_disjoint_and_stratified(folder: Path) -> None:
    ds = load_image_folder(folder)
    a, b = split(ds, 0.1, 0.25, seed=3), split(ds, 0.1, 0.25, seed=3)
    assert [r.path for r in a.test.records] == [r.path for r in b.test.records]
    paths = [set(r.path for r in s.records) for s in (a.train, a.val, a.test)]
    assert not (paths[0] & paths[1] or paths[0] & paths[2] or paths[1] & paths[2])
    assert sum(map(len, paths)) == 40
    assert a.test.counts() == {"bright": 5, "dark": 5}
    c = split(ds, 0.1, 0.25, seed=4)
    assert [r.path for r in c.test.records] != [r.path for r in a.test.records]
    with pytest.raises(InvalidInput):
        split(ds, 0.5, 0.6)


def test_partitions_cover_everything_once(folder: Path) -> None:
    ds = load_image_folder(folder)
    parts = partition_iid(ds, 3, seed=0)
    assert sorted(r.path for p in parts for r in p.records) == sorted(r.path for r in ds.records)
    skew = partition_dirichlet(ds, 3, alpha=0.3, seed=1)
    assert sum(len(p) for p in skew) == len(ds)


def test_batches_yield_unit_range_tensors(folder: Path) -> None:
    ds = load_image_folder(folder)
    x, y = next(batches(ds, 24, batch_size=8))
    assert x.shape == (8, 3, 24, 24) and x.dtype == torch.float32
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert y.dtype == torch.int64


def test_elpv_adapter() -> None:
    ds = load_elpv()
    assert len(ds) == 2624
    assert ds.class_names == ["functional", "defective"]
    by_type = partition_by_attribute(ds, "type")
    assert set(by_type) == {"mono", "poly"}
    assert len(by_type["mono"]) + len(by_type["poly"]) == 2624
    probs = {float(r.attr("probability") or 0) for r in ds.records if r.label == 1}
    assert min(probs) >= 0.5


def test_dataset_specs() -> None:
    mono = load_dataset_spec("elpv:type=mono")
    assert {r.attr("type") for r in mono.records} == {"mono"}
    parts = [load_dataset_spec(f"elpv:part={k}/3:seed=0") for k in (1, 2, 3)]
    assert sum(map(len, parts)) == 2624
    assert not {r.path for r in parts[0].records} & {r.path for r in parts[1].records}
    small = load_dataset_spec("elpv:type=poly:limit=40")
    assert len(small) == 40 and set(small.counts().values()) != {0}
    # the demo's non-iid scheme: mono only, poly only, and a mixed edge, disjoint
    edges = [
        load_dataset_spec("elpv:type=mono:part=1,2,3/4"),
        load_dataset_spec("elpv:type=poly:part=1,2,3/4"),
        load_dataset_spec("elpv:part=4/4:within=type"),
    ]
    paths = [{r.path for r in e.records} for e in edges]
    assert sum(map(len, paths)) == 2624 == len(set().union(*paths))
    assert {r.attr("type") for r in edges[2].records} == {"mono", "poly"}
    for bad in (
        "elpv:part=4/3",
        "elpv:part=1,1/3",
        "elpv:part=x/3",
        "elpv:colour=red",
        "elpv:part",
        "elpv:type=steel",
    ):
        with pytest.raises(ConfigError):
            load_dataset_spec(bad)


@pytest.mark.skipif(not NEU_DET.is_dir(), reason=f"NEU-DET not present at {NEU_DET}")
def test_neu_det_as_image_folder() -> None:
    ds = load_image_folder(NEU_DET)
    assert len(ds.class_names) == 6 and len(ds) == 1800


def test_the_symmetric_views_are_distinct_and_closed_under_composition() -> None:
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    views = [symmetric_view(x, v) for v in range(len(SYMMETRIES))]
    assert len({tuple(v.flatten().tolist()) for v in views}) == 4
    assert torch.equal(views[1], x.transpose(-2, -1))  # the transpose
    for a in range(4):
        for b in range(4):
            twice = symmetric_view(symmetric_view(x, a), b)
            assert any(torch.equal(twice, v) for v in views)


@pytest.mark.parametrize(
    ("mode", "shape"),
    [("L", (37, 53)), ("RGB", (300, 301, 3)), ("L", (32, 32)), ("RGB", (9, 90, 3))],
)
def test_image_array_is_the_model_transform_bit_for_bit(mode: str, shape: tuple[int, ...]) -> None:
    pixels = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    img = Image.fromarray(pixels, mode)
    for size in (32, 224):
        got = image_array(img, size)
        assert got.dtype == np.float32 and got.shape == (3, size, size)
        assert np.array_equal(got, image_transform(size, augment=False)(img).numpy())
