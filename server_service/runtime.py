"""The heavy objects of one server process, created in the app lifespan.

Routes reach them through ``api.deps``; background work (training thread, deadline
watcher) receives the same :class:`Runtime`. Apart from the database and the blob
store the process holds no state that matters, so several replicas can share one
database and one store: the spec cache holds immutable values keyed by content,
``training_ids`` only keeps this process from queueing a cycle twice, and which
replica trains a cycle (or runs the watcher) is decided by leases in the database.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from sqlalchemy import Engine
from sqlalchemy.orm import sessionmaker

from fl_core.blobstore import BlobStore
from fl_core.schemas import FeatureSpec, RoundPlan
from server_service.config import Settings
from server_service.db import Session
from server_service.services.metrics import ServerMetrics
from server_service.services.progress import TrainingBoard


@dataclass
class Runtime:
    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    blobs: BlobStore
    metrics: ServerMetrics
    #: one worker: trainings run one after another, off the event loop
    executor: ThreadPoolExecutor
    #: who this process is to the others (lease owner, ``/health``)
    replica_id: str = ""
    #: feature specs by (model version, sha256): building one loads the model
    specs: dict[tuple[int, str], FeatureSpec] = field(default_factory=dict)
    #: held while a spec is built, so that a burst of joins loads the model once (each
    #: concurrent load took ~50 MB: 200 edges joining at once peaked at 2.5 GB)
    spec_build: threading.Lock = field(default_factory=threading.Lock)
    #: round plans by (model version, sha256), built with the spec (the settings are fixed)
    plans: dict[tuple[int, str], RoundPlan] = field(default_factory=dict)
    #: name -> shape of the tensors a round trains, by (model version, first stage)
    round_shapes: dict[tuple[int, str], dict[str, list[int]]] = field(default_factory=dict)
    #: (cycle, round) pairs this process is aggregating, so a round is not done twice
    aggregating: set[tuple[int, int]] = field(default_factory=set)
    #: cycles queued or training in this process, so a cycle is never queued twice
    training_ids: set[int] = field(default_factory=set)
    #: leases this process holds and renews on the heartbeat; and those it lost (a
    #: training whose lease was lost stops: another replica has taken the cycle over)
    leases_held: set[str] = field(default_factory=set)
    leases_lost: set[str] = field(default_factory=set)
    #: whether this process holds the watcher lease (runs deadlines and takeovers)
    watching: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)
    #: failed trainings whose `failed` state could not be written yet (full disk), by
    #: cycle id: the deadline watcher writes them as soon as it can
    unrecorded_failures: dict[int, str] = field(default_factory=dict)
    #: set at shutdown: a running training stops at its next epoch, left `training`
    stopping: threading.Event = field(default_factory=threading.Event)
    #: training progress of the cycles this process trains, for the dashboard
    training_board: TrainingBoard = field(default_factory=TrainingBoard)

    def hold(self, name: str) -> None:
        with self.lock:
            self.leases_held.add(name)
            self.leases_lost.discard(name)

    def drop(self, name: str) -> bool:
        """Stop renewing ``name``; True if it was still ours (not lost meanwhile)."""
        with self.lock:
            self.leases_held.discard(name)
            lost = name in self.leases_lost
            self.leases_lost.discard(name)
        return not lost

    def lost(self, name: str) -> bool:
        with self.lock:
            return name in self.leases_lost

    def mark_lost(self, names: set[str]) -> None:
        with self.lock:
            self.leases_lost |= names & self.leases_held


__all__ = ["Runtime"]
