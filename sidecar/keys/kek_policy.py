"""When a KEK may seal or open: its age, uses and root version, grace in an outage, prefetch.

A KEK's age counts from the backend's last word on it: when the backend made it, or last
unwrapped it. A KEK is *fresh* (may seal) while it is younger than ``kek_ttl``, has sealed fewer
than ``kek_max_uses`` blobs and its root version is the latest known. A cached KEK *may open*
blobs while it is younger than ``kek_ttl`` — the live KEK too — after which the backend is asked
again. While the backend cannot be reached, a KEK past its end stays usable for
``upstream_grace`` more (*in grace*), to seal and to open: so no KEK is ever used more than
``kek_ttl + upstream_grace`` after the backend last vouched for it. The live KEK's successor is
fetched in the background shortly before the live one's end, so a rotation never stalls.
"""

from __future__ import annotations

from typing import Final

from sidecar.config import KeyConfig
from sidecar.keys.kek_cache import Kek

#: The successor of a live KEK is fetched in the background once the live one has this share of
#: its uses left (at least one use), or this share of its lifetime (at most a minute): late
#: enough that a run within the budget costs no extra upstream call, early enough to hide the
#: fetch.
PREFETCH_REMAINING: Final = 0.01
PREFETCH_LEAD_MAX_SECONDS: Final = 60.0
#: A KEK never seals more than this many blobs, grace or not (random 96-bit nonces stay safe).
HARD_MAX_USES: Final = 1 << 31


def is_fresh(kek: Kek, config: KeyConfig, latest_version: int, now: float) -> bool:
    """Whether ``kek`` may seal without asking the backend for a successor."""
    return (
        now - kek.created_at < config.kek_ttl
        and kek.uses < config.kek_max_uses
        and kek.root_version >= latest_version
    )


def may_open(kek: Kek, config: KeyConfig, now: float) -> bool:
    """Whether cached ``kek`` may open blobs without asking the backend again."""
    return now - kek.created_at < config.kek_ttl


def in_grace(
    kek: Kek,
    config: KeyConfig,
    *,
    min_decryption_version: int,
    outage_since: float | None,
    now: float,
) -> bool:
    """May ``kek`` still be used while the backend is down?

    Up to ``upstream_grace`` past the end of its life: its TTL, or — for the live KEK, which
    passes ``outage_since`` — the moment it was first due for replacement (its uses ran out) and
    could not be replaced.
    """
    end = kek.created_at + config.kek_ttl
    if outage_since is not None:
        end = min(end, outage_since)
    return (
        now < end + config.upstream_grace
        and kek.uses < HARD_MAX_USES
        and kek.root_version >= min_decryption_version
    )


def prefetch_due(kek: Kek, now: float) -> bool:
    """Whether the successor of the live ``kek`` should be fetched now."""
    return kek.uses >= kek.prefetch_uses or now >= kek.prefetch_at


def go_live(kek: Kek, config: KeyConfig, now: float) -> None:
    """Start ``kek``'s life as the live KEK at ``now`` and schedule its successor's prefetch."""
    kek.created_at = now
    lead = min(PREFETCH_LEAD_MAX_SECONDS, config.kek_ttl * PREFETCH_REMAINING * 10)
    kek.prefetch_at = now + config.kek_ttl - lead
    kek.prefetch_uses = config.kek_max_uses - max(1, int(config.kek_max_uses * PREFETCH_REMAINING))
