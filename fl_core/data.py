"""Datasets of labelled images, deterministic splits, and partitions across edges.

An :class:`ImageSet` is a list of ``(path, label, attributes)`` records plus class
names; images are decoded only when a batch needs them. Sources: an ImageFolder
directory (``root/<class>/<image>``) and the ``elpv-dataset`` package (solar cells,
default task defective (p >= 0.5) vs functional, the cell type kept as ``type``).

A dataset spec string names a source and a partition, as the edge's settings do:
``/path/to/folder``, ``elpv``, ``elpv:type=mono``, ``elpv:part=2/3:seed=0``,
``elpv:type=poly:limit=120``, ``neu:part=1/3`` style options work on any source.
"""

from __future__ import annotations

import queue
import random
import threading
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from fl_core.errors import ConfigError, InvalidInput

_T = TypeVar("_T")

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
ELPV_CLASSES = ["functional", "defective"]


@dataclass(frozen=True)
class ImageRecord:
    path: Path
    label: int
    attrs: tuple[tuple[str, str], ...] = ()

    def attr(self, key: str) -> str | None:
        return dict(self.attrs).get(key)


@dataclass
class ImageSet:
    records: list[ImageRecord]
    class_names: list[str]
    name: str = ""
    meta: dict[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.records)

    @property
    def labels(self) -> np.ndarray:
        return np.array([r.label for r in self.records], dtype=np.int64)

    def subset(self, indices: Sequence[int], name: str | None = None) -> ImageSet:
        return ImageSet(
            [self.records[i] for i in indices], self.class_names, name or self.name, self.meta
        )

    def counts(self) -> dict[str, int]:
        c = Counter(r.label for r in self.records)
        return {n: c.get(i, 0) for i, n in enumerate(self.class_names)}

    def raw_bytes(self) -> int:
        """Size on disk of the images (what shipping them would cost)."""
        return sum(r.path.stat().st_size for r in self.records)

    def aligned_to(self, class_names: Sequence[str]) -> ImageSet:
        """The same images labelled by their index in ``class_names`` (see
        :func:`align_classes`); classes this set lacks simply have no image."""
        index = align_classes(self.class_names, class_names)
        if index == list(range(len(class_names))):
            return self
        records = [ImageRecord(r.path, index[r.label], r.attrs) for r in self.records]
        return ImageSet(records, list(class_names), self.name, self.meta)


@dataclass
class Splits:
    train: ImageSet
    val: ImageSet
    test: ImageSet


def align_classes(local_names: Sequence[str], server_names: Sequence[str]) -> list[int]:
    """Where each local class sits among the server's: ``index[i]`` is the server's index
    of ``local_names[i]``.

    Classes are matched by name, never by position: an ImageFolder's classes come in
    alphabetical order, which need not be the server's. The local classes may be a subset
    of the server's (label skew: an edge that has never seen a defect type still takes
    part); a local class the server does not know is refused, by name.
    """
    position = {name: i for i, name in enumerate(server_names)}
    unknown = [name for name in local_names if name not in position]
    if unknown:
        raise InvalidInput(
            f"the local dataset has class folders {unknown} that the server does not know; "
            f"the server's classes are {list(server_names)}: rename those folders to one of "
            "the server's classes or remove them"
        )
    return [position[name] for name in local_names]


# --------------------------------------------------------------------------- sources


def load_image_folder(root: Path | str) -> ImageSet:
    """``root/<class>/<image>``; classes sorted by name, images sorted by path."""
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"dataset folder not found: {root}")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        raise ConfigError(f"{root} needs at least two class folders, found {len(classes)}")
    records = [
        ImageRecord(path, label)
        for label, cls in enumerate(classes)
        for path in sorted((root / cls).iterdir())
        if path.suffix.lower() in IMAGE_SUFFIXES
    ]
    if not records:
        raise ConfigError(f"no images under {root}")
    return ImageSet(records, classes, name=root.name)


def elpv_root() -> Path:
    try:
        import elpv_dataset
    except ImportError:
        raise ConfigError(
            "the elpv dataset is not installed: pip install 'fedinspect[demo]' "
            "(elpv-dataset, CC BY-NC-SA 4.0)"
        ) from None
    return Path(elpv_dataset.__file__).parent / "data"


def load_elpv(threshold: float = 0.5) -> ImageSet:
    """All 2,624 elpv cells: defective if the defect probability >= ``threshold``."""
    root = elpv_root()
    records = []
    for line in (root / "labels.csv").read_text().splitlines():
        parts = line.split()
        if len(parts) != 3:
            continue
        rel, prob, cell_type = parts
        label = int(float(prob) >= threshold)
        attrs = (("type", cell_type), ("probability", prob))
        records.append(ImageRecord(root / rel, label, attrs))
    return ImageSet(records, list(ELPV_CLASSES), name="elpv")


# --------------------------------------------------------------------------- splits


def stratified_indices(
    labels: np.ndarray, fractions: Sequence[float], seed: int
) -> list[list[int]]:
    """Split indices into len(fractions) parts, class by class, deterministically."""
    rng = random.Random(seed)
    parts: list[list[int]] = [[] for _ in fractions]
    total = float(sum(fractions))
    for cls in sorted(set(labels.tolist())):
        idx = [i for i, y in enumerate(labels.tolist()) if y == cls]
        rng.shuffle(idx)
        bounds, acc = [], 0.0
        for f in fractions:
            acc += f / total
            bounds.append(round(acc * len(idx)))
        start = 0
        for p, end in enumerate(bounds):
            parts[p].extend(idx[start:end])
            start = end
    return [sorted(p) for p in parts]


def split(ds: ImageSet, val: float = 0.1, test: float = 0.25, seed: int = 0) -> Splits:
    """Seeded stratified train/val/test split."""
    if not 0 <= val < 1 or not 0 < test < 1 or val + test >= 1:
        raise InvalidInput("val and test fractions must be in [0, 1) and sum below 1")
    tr, va, te = stratified_indices(ds.labels, [1 - val - test, val, test], seed)
    return Splits(ds.subset(tr), ds.subset(va), ds.subset(te))


def partition_iid(ds: ImageSet, n: int, seed: int = 0) -> list[ImageSet]:
    parts = stratified_indices(ds.labels, [1.0] * n, seed)
    return [ds.subset(p, f"{ds.name}:part={i + 1}/{n}") for i, p in enumerate(parts)]


def partition_by_attribute(ds: ImageSet, key: str) -> dict[str, ImageSet]:
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(ds.records):
        value = r.attr(key)
        if value is not None:
            groups.setdefault(value, []).append(i)
    if not groups:
        raise InvalidInput(f"no record carries the attribute {key!r}")
    return {v: ds.subset(idx, f"{ds.name}:{key}={v}") for v, idx in sorted(groups.items())}


def dirichlet_indices(labels: np.ndarray, n: int, alpha: float, seed: int = 0) -> list[list[int]]:
    """Label skew: the indices of each class spread over ``n`` parts by proportions
    ~ Dirichlet(alpha), each part sorted."""
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[] for _ in range(n)]
    for cls in sorted(set(labels.tolist())):
        idx = np.flatnonzero(labels == cls)
        rng.shuffle(idx)
        props = rng.dirichlet([alpha] * n)
        cuts = (np.cumsum(props)[:-1] * len(idx)).astype(int)
        for p, chunk in enumerate(np.split(idx, cuts)):
            parts[p].extend(int(i) for i in chunk)
    return [sorted(p) for p in parts]


def partition_dirichlet(ds: ImageSet, n: int, alpha: float, seed: int = 0) -> list[ImageSet]:
    """Label skew: each class is spread over edges by proportions ~ Dirichlet(alpha)."""
    parts = dirichlet_indices(ds.labels, n, alpha, seed)
    return [ds.subset(p, f"{ds.name}:dirichlet={i + 1}/{n}") for i, p in enumerate(parts)]


# --------------------------------------------------------------------------- spec strings


def parse_dataset_spec(spec: str) -> tuple[str, dict[str, str]]:
    source, *opts = spec.split(":")
    options: dict[str, str] = {}
    for opt in opts:
        key, sep, value = opt.partition("=")
        if not sep or not key or not value:
            raise ConfigError(f"dataset option {opt!r} in {spec!r} is not key=value")
        options[key] = value
    return source, options


def _parse_parts(which: str, text: str, spec: str) -> tuple[list[int], int]:
    k_text, _, n_text = text.partition("/")
    try:
        ks, n = [int(k) for k in k_text.split(",")], int(n_text)
    except ValueError:
        raise ConfigError(f"{which} must look like K/N or K1,K2/N in {spec!r}") from None
    if not all(1 <= k <= n for k in ks) or len(set(ks)) != len(ks):
        raise ConfigError(f"{which}={text}: each K must be distinct and between 1 and N")
    return ks, n


def load_dataset_spec(spec: str) -> ImageSet:
    """Resolve a dataset spec string (see the module docstring) to an ImageSet.

    Options: ``type=VALUE`` (attribute filter; ``attr.KEY=VALUE`` for other keys),
    ``part=K/N`` (K-th of N stratified iid parts; ``K1,K2/N`` for a union of parts),
    ``dirichlet=K/N`` with ``alpha`` (label skew), ``within=ATTR`` (take the parts
    inside each group of that attribute), ``seed=S`` (default 0), ``limit=M`` (M
    images, stratified, seeded).
    """
    source, options = parse_dataset_spec(spec)
    ds = load_elpv() if source == "elpv" else load_image_folder(source)
    seed = int(options.pop("seed", "0"))
    for key in list(options):
        if key == "type" or key.startswith("attr."):
            attr = "type" if key == "type" else key[5:]
            wanted = options.pop(key)
            idx = [i for i, r in enumerate(ds.records) if r.attr(attr) == wanted]
            if not idx:
                raise ConfigError(f"no image in {source} has {attr}={wanted}")
            ds = ds.subset(idx)
    if "part" in options or "dirichlet" in options:
        which = "part" if "part" in options else "dirichlet"
        ks, n = _parse_parts(which, options.pop(which), spec)
        within = options.pop("within", None)
        alpha = float(options.pop("alpha", "0.5"))

        def pick(group: ImageSet) -> list[ImageRecord]:
            if which == "part":
                parts = partition_iid(group, n, seed)
            else:
                parts = partition_dirichlet(group, n, alpha, seed)
            return [r for k in ks for r in parts[k - 1].records]

        if within is None:
            records = pick(ds)
        else:
            # the same K/N taken inside each attribute group: a filtered spec such as
            # type=mono:part=1,2,3/4 and part=4/4:within=type never share an image
            groups = partition_by_attribute(ds, within)
            records = [r for g in groups.values() for r in pick(g)]
        ds = ImageSet(records, ds.class_names, ds.name, ds.meta)
    if "limit" in options:
        limit = int(options.pop("limit"))
        if limit < len(ds):
            keep, _ = stratified_indices(ds.labels, [limit, len(ds) - limit], seed)
            ds = ds.subset(keep)
    if options:
        raise ConfigError(f"unknown dataset options {sorted(options)} in {spec!r}")
    ds.name = spec
    return ds


# --------------------------------------------------------------------------- tensors


def load_image(path: Path) -> Image.Image:
    """Decode an image file as RGB (grey images get three equal channels)."""
    with Image.open(path) as img:
        return img.convert("RGB")


def load_model_image(path: Path) -> Image.Image:
    """Decode an image file for the model: grey images stay one-channel ("L").

    ``image_transform`` resizes them in that mode and repeats the channel only at the
    end, a third of the work of resizing three equal channels (most inspection images,
    elpv's among them, are grey).
    """
    with Image.open(path) as img:
        return img.copy() if img.mode == "L" else img.convert("RGB")


#: the label-preserving views fine-tuning caches first, as (quarter turns, mirrored
#: first): the image, its transpose, its half turn and its anti-transpose. A defect seen
#: mirrored along a diagonal or turned upside down is the same defect, for surface and
#: cell images alike; an edge whose classes depend on orientation sets its views to 1.
SYMMETRIES: tuple[tuple[int, bool], ...] = ((0, False), (1, True), (2, False), (3, True))


def symmetric_view(x: torch.Tensor, view: int) -> torch.Tensor:
    """View ``view`` (see :data:`SYMMETRIES`) of a square image batch [..., S, S]."""
    turns, mirrored = SYMMETRIES[view]
    return torch.rot90(x.flip(-1) if mirrored else x, turns, dims=(-2, -1))


def _three_channels(x: torch.Tensor) -> torch.Tensor:
    return x.expand(3, -1, -1) if x.shape[-3] == 1 else x


def image_transform(input_size: int, augment: bool) -> v2.Transform:
    """PIL image (RGB or L) to a [3, S, S] float tensor in [0, 1].

    Resized first, by PIL (antialiased): augmenting the small image costs a fraction
    of the full-size one.
    """
    steps: list[v2.Transform] = [v2.Resize((input_size, input_size), antialias=True)]
    if augment:
        steps += [
            v2.RandomHorizontalFlip(),
            v2.RandomVerticalFlip(),
            v2.RandomAffine(degrees=8, translate=(0.04, 0.04), scale=(0.92, 1.08)),
            v2.ColorJitter(brightness=0.2, contrast=0.2),
        ]
    steps += [
        v2.PILToTensor(),
        v2.Lambda(_three_channels),
        v2.ToDtype(torch.float32, scale=True),
    ]
    return v2.Compose(steps)


def image_array(img: Image.Image, input_size: int, out: np.ndarray | None = None) -> np.ndarray:
    """``image_transform(input_size, augment=False)`` in NumPy: the same [3, S, S]
    float32 values, bit for bit, without torch's intra-op thread pool; written into
    ``out`` (a [3, S, S] float32 view, e.g. one row of a batch) when given.

    Serving decodes on cores that ONNX Runtime keeps busy; there torch's few parallel
    element-wise ops per image cost more in thread hand-offs than the whole conversion
    (measured 16 ms an image with two torch threads on a loaded 2-core machine, against
    0.6 ms on one).
    """
    small = img.resize((input_size, input_size), Image.Resampling.BILINEAR)
    pixels = np.asarray(small, dtype=np.uint8)
    if out is None:
        out = np.empty((3, input_size, input_size), dtype=np.float32)
    # as ToDtype(scale=True): to float32, then times 1/255 in float32
    scale = np.float32(1.0 / 255)
    if pixels.ndim == 2:  # grey: one channel computed, repeated as _three_channels does
        np.multiply(pixels, scale, out=out[0], dtype=np.float32)
        out[1] = out[0]
        out[2] = out[0]
    else:
        np.multiply(pixels.transpose(2, 0, 1), scale, out=out, dtype=np.float32)
    return out


class ImageDataset(Dataset[tuple[torch.Tensor, int]]):
    """Decodes one record at a time: [3, S, S] float in [0, 1], and its label."""

    def __init__(self, images: ImageSet, input_size: int, augment: bool = False) -> None:
        self.images = images
        self.transform = image_transform(input_size, augment)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        rec = self.images.records[index]
        return self.transform(load_model_image(rec.path)), rec.label


def batches(
    images: ImageSet,
    input_size: int,
    batch_size: int = 32,
    augment: bool = False,
    shuffle: bool = False,
    seed: int = 0,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Stream ``(images, labels)`` batches; only one batch is decoded at a time."""
    ds = ImageDataset(images, input_size, augment)
    gen = torch.Generator().manual_seed(seed)
    loader = DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=gen)
    yield from loader


def prefetch(items: Iterable[_T], depth: int = 2) -> Iterator[_T]:
    """Iterate ``items`` on a background thread, ``depth`` items ahead of the consumer.

    Decoding the next batch then overlaps with whatever the consumer does with this one
    (image decoding and ONNX Runtime both release the GIL). An exception in the
    producer is raised in the consumer; a consumer that stops early stops the producer.
    """
    slots: queue.Queue[tuple[str, object]] = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def put(item: tuple[str, object]) -> bool:
        while not stop.is_set():
            try:
                slots.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(("item", item)):
                    return
        except BaseException as exc:
            put(("error", exc))
        else:
            put(("end", None))

    worker = threading.Thread(target=produce, name="fedinspect-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            kind, value = slots.get()
            if kind == "end":
                return
            if kind == "error":
                assert isinstance(value, BaseException)
                raise value
            yield value  # type: ignore[misc]
    finally:
        stop.set()
        worker.join(timeout=5)


__all__ = [
    "ELPV_CLASSES",
    "ImageDataset",
    "ImageRecord",
    "ImageSet",
    "Splits",
    "align_classes",
    "batches",
    "dirichlet_indices",
    "elpv_root",
    "image_array",
    "image_transform",
    "load_dataset_spec",
    "load_elpv",
    "load_image",
    "load_image_folder",
    "load_model_image",
    "parse_dataset_spec",
    "partition_by_attribute",
    "partition_dirichlet",
    "partition_iid",
    "prefetch",
    "split",
    "stratified_indices",
]
