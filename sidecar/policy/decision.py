"""What a policy check answers: one immutable :class:`Decision`, and the one refusal callers see."""

from __future__ import annotations

from dataclasses import dataclass

from sidecar.errors import PermissionDenied, quoted


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of one policy check.

    ``rule`` names the rule that decided (``None`` when nothing matched: deny by default).
    ``reason`` is for the audit log and operators, not for callers. ``retry_after`` (seconds) is
    set when the deciding rule's rate was exceeded; ``max_ttl`` (seconds) when the only thing
    keeping an allow rule from matching was a too-long or missing ttl.
    """

    allowed: bool
    rule: str | None
    reason: str
    retry_after: float | None = None
    max_ttl: float | None = None


def permission_denied(
    operation: str, key: str | None, *, rule: str | None = None
) -> PermissionDenied:
    """The one denial callers see, whether the key is forbidden or does not exist.

    ``rule`` names the deny rule that refused, for the audit log (callers are not told).
    """
    if key is None:
        return PermissionDenied(
            f"Permission denied: this caller may not use {operation!r}.", rule=rule
        )
    return PermissionDenied(
        f"Permission denied: this caller may not {operation} with key {quoted(key)}, "
        "or no such key exists.",
        rule=rule,
    )
