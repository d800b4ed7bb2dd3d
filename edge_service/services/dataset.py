"""The edge's local images: the dataset named in settings, split once, deterministically.

Loading only lists files (images are decoded batch by batch later), so it is cheap;
the result is cached for the life of the process.
"""

from __future__ import annotations

import threading

from edge_service.config import Settings
from fl_core.data import ImageSet, Splits, load_dataset_spec, split
from fl_core.errors import InvalidInput
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

    def check_classes(self, expected: list[str]) -> None:
        """The cycle's classes must be ours, in the same order (labels are indices)."""
        ours = self.class_names
        if ours != list(expected):
            raise InvalidInput(
                f"the local dataset's classes {ours} differ from the cycle's class names "
                f"{list(expected)}: name (and order) the class folders like the server's"
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
