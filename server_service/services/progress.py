"""Training progress of the cycles this process trains, for the dashboard.

Kept in this process only (``Runtime.training_board``), written after each epoch by the training
thread: on several replicas the dashboard sees the progress of the replica it asks, and
every replica sees each cycle's state and metrics in the database.
"""

from __future__ import annotations

import threading

from fl_core.schemas import TrainingProgress
from server_service.db import utcnow


class TrainingBoard:
    """Progress of the trainings this process runs, by cycle id (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_cycle: dict[int, TrainingProgress] = {}

    def report(self, cycle_id: int, fraction: float, message: str) -> None:
        entry = TrainingProgress(
            cycle_id=cycle_id,
            fraction=min(1.0, max(0.0, fraction)),
            message=message,
            updated_at=utcnow(),
        )
        with self._lock:
            self._by_cycle[cycle_id] = entry
            # a long-lived server keeps only the latest few
            for old in sorted(self._by_cycle)[:-20]:
                del self._by_cycle[old]

    def snapshot(self) -> list[TrainingProgress]:
        with self._lock:
            return sorted(self._by_cycle.values(), key=lambda p: -p.cycle_id)


__all__ = ["TrainingBoard"]
