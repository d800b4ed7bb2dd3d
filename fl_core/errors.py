"""One exception tree for the whole project.

Services map these to HTTP errors with one exception handler each: every class
carries the status code it should become and a stable, human-readable message, so
``fl_core`` itself never imports a web framework.

    FedInspectError (500)
    ├── InvalidInput (422)            bad data from a caller: shapes, dtypes, labels
    │   └── NotSafetensors (422)      a blob that is not a safetensors file
    ├── AuthError (401)               no token, or a token we do not know
    │   └── Forbidden (403)           a known caller without the right role
    ├── NotFound (404)
    ├── Conflict (409)                the request does not fit the current state
    ├── PayloadTooLarge (413)
    ├── IntegrityError (502)          bytes whose sha256 does not match
    ├── Unavailable (503)             try again later
    ├── InsufficientStorage (507)     no space left on this machine's disk
    ├── RemoteError (502)             the other service answered with an error
    └── ConfigError (500)             settings or files on this machine are wrong
"""

from __future__ import annotations

#: longest piece of caller input an error detail repeats
ECHO_CHARS = 80


def shorten(text: str, limit: int = ECHO_CHARS) -> str:
    """``text``, cut to ``limit`` characters with a note of how much was cut: an error
    detail names the input it refuses, never a megabyte of it."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} characters)"


class FedInspectError(Exception):
    """Base of every error the project raises on purpose."""

    http_status: int = 500

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class InvalidInput(FedInspectError):
    http_status = 422


class NotSafetensors(InvalidInput):
    http_status = 422


class AuthError(FedInspectError):
    http_status = 401


class Forbidden(AuthError):
    http_status = 403


class NotFound(FedInspectError):
    http_status = 404


class Conflict(FedInspectError):
    http_status = 409


class PayloadTooLarge(FedInspectError):
    http_status = 413


class IntegrityError(FedInspectError):
    http_status = 502


class Unavailable(FedInspectError):
    http_status = 503


class InsufficientStorage(FedInspectError):
    """A write failed for lack of disk space (ENOSPC, EDQUOT); nothing was stored."""

    http_status = 507


class RemoteError(FedInspectError):
    """The other service answered with an error status; ``status`` is what it said."""

    http_status = 502

    def __init__(self, detail: str, status: int = 502) -> None:
        super().__init__(detail)
        self.status = status


class ConfigError(FedInspectError):
    http_status = 500


__all__ = [
    "ECHO_CHARS",
    "AuthError",
    "ConfigError",
    "Conflict",
    "FedInspectError",
    "Forbidden",
    "InsufficientStorage",
    "IntegrityError",
    "InvalidInput",
    "NotFound",
    "NotSafetensors",
    "PayloadTooLarge",
    "RemoteError",
    "Unavailable",
    "shorten",
]
