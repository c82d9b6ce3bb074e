"""The words a policy rule may use (operations, ``when`` keys) and the error for misusing them."""

from __future__ import annotations

from typing import Final

OPERATIONS: Final = frozenset(
    {
        "datakey",
        "datakey-wrapped",
        "decrypt",
        "encrypt",
        "rewrap",
        "sign",
        "verify",
        "read",
        "rotate",
        "flush",
        "status",
        "hmac",
        "list",
        "random",
        "hash",
        "lookup-self",
    }
)
"""Every operation a rule can name (plus ``"*"`` for all of them)."""

KEYLESS_OPERATIONS: Final = frozenset({"status", "list", "random", "hash", "lookup-self"})
"""Operations about the sidecar as a whole; requested with ``key=None``."""

TTL_OPERATIONS: Final = frozenset({"datakey", "datakey-wrapped"})
"""Operations whose ``ttl`` a rule's ``max_ttl`` bounds."""

WHEN_KEYS: Final = (
    "unix_uid",
    "unix_gid",
    "unix_exe",
    "jwt_iss",
    "jwt_sub",
    "jwt_claims",
    "spiffe_id",
)
"""The ``when.<key>`` conditions a rule can state."""

MAX_CLAIM_PARTS: Final = 16
"""The deepest claim path (``jwt.claims.a.b...``) a condition or template may name."""


class RuleError(ValueError):
    """A rule is invalid. ``key`` is the dotted key at fault inside the rule, if known."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


def format_seconds(seconds: float) -> str:
    """``90.0`` → ``"90s"``, ``600.0`` → ``"10m"``, ``7200.0`` → ``"2h"``."""
    for unit, size in (("h", 3600.0), ("m", 60.0)):
        if seconds >= size and (seconds / size).is_integer():
            return f"{int(seconds / size)}{unit}"
    return f"{int(seconds)}s" if float(seconds).is_integer() else f"{seconds:g}s"
