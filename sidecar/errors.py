"""The sidecar's one exception tree.

Every error a caller can see is a :class:`SidecarError` whose ``code`` is stable and maps to one
HTTP status in ``sidecar.server.errors.STATUS_BY_CODE`` (the only such table)::

    SidecarError                      code
    ├── InvalidRequest                invalid_request
    │   └── PayloadTooLarge           payload_too_large
    ├── DecryptionFailed              decryption_failed   (one answer for every cause)
    ├── Unauthenticated               unauthenticated
    ├── PermissionDenied              permission_denied   (also unknown key names)
    ├── UnknownPath                   unknown_path
    ├── MethodNotAllowed              method_not_allowed
    ├── RateLimited                   rate_limited
    ├── UpstreamError                 upstream_error      (the upstream answered, wrongly)
    ├── UpstreamUnavailable           upstream_unavailable (the upstream could not be reached)
    ├── AuditUnavailable              audit_unavailable
    └── InternalError                 internal

Messages are one plain sentence a user can act on and never hold key bytes or plaintext.
"""

from __future__ import annotations

from typing import ClassVar


class SidecarError(Exception):
    """Root of every error the sidecar reports to a caller."""

    code: ClassVar[str] = "internal"
    default_message: ClassVar[str] = "The sidecar failed to handle the request."
    #: Set by clients on errors rebuilt from a response: its HTTP status and request id.
    status: int | None = None
    request_id: str | None = None

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or self.default_message)

    @property
    def message(self) -> str:
        return str(self.args[0])


class InvalidRequest(SidecarError):
    """The request is malformed: bad JSON, base64, field type or value."""

    code = "invalid_request"
    default_message = "The request is invalid."


class PayloadTooLarge(InvalidRequest):
    """The body or the plaintext exceeds the configured limit."""

    code = "payload_too_large"
    default_message = "The request body is too large."


class DecryptionFailed(SidecarError):
    """A blob could not be opened. The cause is deliberately not told."""

    code = "decryption_failed"
    default_message = "The ciphertext could not be decrypted."

    def __init__(self, cause: str = "unspecified") -> None:
        super().__init__()
        #: Why it failed, for the audit log and traces only; never sent to the caller.
        self.cause = cause


class Unauthenticated(SidecarError):
    """The caller presented credentials that could not be verified."""

    code = "unauthenticated"
    default_message = "The caller could not be authenticated."


class PermissionDenied(SidecarError):
    """No rule allows this caller this operation on this key (or the key does not exist)."""

    code = "permission_denied"
    default_message = "Permission denied."

    def __init__(self, message: str | None = None, *, rule: str | None = None) -> None:
        super().__init__(message)
        #: The deny rule that refused, for the audit log only (``None``: nothing allowed it).
        self.rule = rule


class UnknownPath(SidecarError):
    """No route matches the path."""

    code = "unknown_path"
    default_message = "Unsupported path."


class MethodNotAllowed(SidecarError):
    """The path exists but not with this method."""

    code = "method_not_allowed"
    default_message = "Method not allowed on this path."


class RateLimited(SidecarError):
    """The caller exceeded its rate; ``retry_after`` is in seconds."""

    code = "rate_limited"
    default_message = "Too many requests; retry later."

    def __init__(
        self, message: str | None = None, *, retry_after: float = 1.0, rule: str | None = None
    ) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        #: The rule whose rate was exceeded, for the audit log only.
        self.rule = rule


class UpstreamError(SidecarError):
    """The root-key backend answered with an error the sidecar could not handle."""

    code = "upstream_error"
    default_message = "The key backend returned an error."


class UpstreamUnavailable(SidecarError):
    """The root-key backend could not be reached and nothing cached could serve the request."""

    code = "upstream_unavailable"
    default_message = "The key backend is unavailable; retry later."


class AuditUnavailable(SidecarError):
    """The audit record could not be written, so the operation was refused."""

    code = "audit_unavailable"
    default_message = "The audit log cannot be written; key operations are refused."


class InternalError(SidecarError):
    """A bug. Details go to the log, never to the caller."""

    code = "internal"


class ConfigError(Exception):
    """The configuration is invalid; the message names the dotted key. Stops start-up."""


#: How many characters of a caller's value an error message may quote.
QUOTE_LIMIT = 40


def quoted(value: object, limit: int = QUOTE_LIMIT) -> str:
    """A caller's value for an error message: its ``repr``, cut after ``limit`` characters.

    Messages name what was wrong without echoing an unbounded input back to the caller.
    """
    text = value if isinstance(value, str) else str(value)
    if len(text) <= limit:
        return repr(text)
    return repr(text[:limit]) + "…"


def error_for_code(code: str) -> type[SidecarError]:
    """The exception class for an error code (``SidecarError`` for unknown codes)."""
    return _BY_CODE.get(code, SidecarError)


def _all_subclasses(cls: type[SidecarError]) -> list[type[SidecarError]]:
    found = []
    for sub in cls.__subclasses__():
        found.append(sub)
        found.extend(_all_subclasses(sub))
    return found


_BY_CODE: dict[str, type[SidecarError]] = {c.code: c for c in _all_subclasses(SidecarError)}
