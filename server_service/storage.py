"""A full disk under the data dir: recognise it, and say so in one clear sentence.

Blob writes raise :class:`InsufficientStorage` (ENOSPC or EDQUOT); SQLite says
``database or disk is full``. Either way nothing of the failed request is stored (the
blob's temporary file is removed, the transaction rolled back), so the client may
retry once an operator has freed space.
"""

from __future__ import annotations

import errno

from sqlalchemy.exc import OperationalError

from fl_core.errors import InsufficientStorage

#: what clients are told: the setting, not the path on this machine
DISK_FULL_DETAIL = (
    "the server's data dir (FEDINSPECT_SERVER_DATA_DIR) is full: nothing of this request "
    "was stored; retry once an operator has freed space"
)


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) is a write that failed for lack of space."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, InsufficientStorage):
            return True
        if isinstance(current, OSError) and current.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if isinstance(current, OperationalError) and "full" in str(current.orig).lower():
            return True
        current = current.__cause__ or current.__context__
    return False


__all__ = ["DISK_FULL_DETAIL", "is_disk_full"]
