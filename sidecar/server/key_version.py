"""``key_version`` on encrypt and datakey: honoured when it names the latest root version.

Vault seals under any version from ``min_encryption_version`` up. The sidecar seals under its
live KEK, which the latest root version wraps, so a request for the latest version (or ``0``,
or none: the latest, as in Vault) is honoured and any other is refused with 400 — never ignored.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sidecar.errors import InvalidRequest, quoted
from sidecar.keys.envelope import MAX_ROOT_VERSION
from sidecar.server import fields


def requested_key_version(item: Mapping[str, Any]) -> int | None:
    """The item's ``key_version``; ``None`` for absent or ``0`` (the latest)."""
    value = item.get("key_version")
    if value is None:
        return None
    version = fields.integer_value(value, "key_version")
    return None if version == 0 else version


def check_key_version(requested: int | None, used: int) -> None:
    """Refuse an answer sealed under ``used`` when the caller asked for another version."""
    if requested is None or requested == used:
        return
    shown = str(requested) if requested <= MAX_ROOT_VERSION else quoted(requested)
    if requested > used:
        raise InvalidRequest(
            f"Field 'key_version' is {shown}, higher than the latest version {used}."
        )
    raise InvalidRequest(
        f"Field 'key_version' is {shown}; this sidecar seals under the latest version "
        f"({used}) only: omit key_version, or rewrap later."
    )
