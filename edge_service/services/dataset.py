"""The edge's local images: the dataset named in settings, split once, deterministically.

Loading only lists files (images are decoded batch by batch later), so it is cheap;
the result is cached for the life of the process.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from edge_service.config import Settings
from fl_core.data import ImageSet, Splits, load_dataset_spec, split
from fl_core.schemas import DatasetSummary, SplitCounts


class LocalData:
    """The train/val/test splits of the local dataset."""

    def __init__(self, settings: Settings) -> None:
        self.spec = settings.dataset
        self._val = settings.val_fraction
        self._test = settings.test_fraction
        self._seed = settings.split_seed
        self._lock = threading.Lock()
        self._splits: Splits | None = None
        self._dataset: ImageSet | None = None

    def splits(self) -> Splits:
        with self._lock:
            if self._splits is None:
                dataset = load_dataset_spec(self.spec)
                self._splits = split(dataset, self._val, self._test, self._seed)
                self._dataset = dataset
            return self._splits

    @property
    def class_names(self) -> list[str]:
        return list(self.splits().train.class_names)

    def aligned(self, class_names: Sequence[str]) -> Splits:
        """The splits labelled by the index of each class in ``class_names`` (the
        server's): classes are matched by name, ours may be a subset of the server's, and
        a class the server does not know raises :class:`InvalidInput` naming it.

        The split itself is made once, on our own classes, so it does not depend on the
        server's order."""
        s = self.splits()
        return Splits(
            s.train.aligned_to(class_names),
            s.val.aligned_to(class_names),
            s.test.aligned_to(class_names),
        )

    def summary(self) -> DatasetSummary:
        s = self.splits()
        return DatasetSummary(
            spec=self.spec,
            class_names=list(s.train.class_names),
            n_images=len(s.train) + len(s.val) + len(s.test),
            counts=SplitCounts(train=s.train.counts(), val=s.val.counts(), test=s.test.counts()),
        )

    def problem(self) -> str | None:
        """Why the dataset cannot be used, in words; None when it loads."""
        try:
            self.splits()
        except Exception as exc:
            detail = getattr(exc, "detail", None) or f"{type(exc).__name__}: {exc}"
            return f"dataset {self.spec!r} cannot be loaded: {detail}"
        return None

    def try_summary(self) -> DatasetSummary | None:
        """The summary, or None when the dataset cannot be loaded (status must not fail)."""
        try:
            return self.summary()
        except Exception:
            return None


__all__ = ["LocalData"]
