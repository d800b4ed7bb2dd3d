"""The heavy objects of one server process, created in the app lifespan.

Routes reach them through ``api.deps``; background work (training thread, deadline
watcher) receives the same :class:`Runtime`. Apart from the database and the blob
store the process holds no state that matters: caches here can be rebuilt.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from sqlalchemy import Engine
from sqlalchemy.orm import sessionmaker

from fl_core.blobstore import BlobStore
from fl_core.schemas import FeatureSpec
from server_service.config import Settings
from server_service.db import Session
from server_service.metrics import ServerMetrics


@dataclass
class Runtime:
    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    blobs: BlobStore
    metrics: ServerMetrics
    #: one worker: trainings run one after another, off the event loop
    executor: ThreadPoolExecutor
    #: feature specs by (model version, sha256): building one loads the model
    specs: dict[tuple[int, str], FeatureSpec] = field(default_factory=dict)
    #: held while a spec is built, so that a burst of joins loads the model once (each
    #: concurrent load took ~50 MB: 200 edges joining at once peaked at 2.5 GB)
    spec_build: threading.Lock = field(default_factory=threading.Lock)
    #: cycles queued or training in this process, so a cycle is never queued twice
    training_ids: set[int] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)
    #: failed trainings whose `failed` state could not be written yet (full disk), by
    #: cycle id: the deadline watcher writes them as soon as it can
    unrecorded_failures: dict[int, str] = field(default_factory=dict)
    #: set at shutdown: a running training stops at its next epoch, left `training`
    stopping: threading.Event = field(default_factory=threading.Event)


__all__ = ["Runtime"]
