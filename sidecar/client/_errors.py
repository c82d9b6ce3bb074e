"""Client-side errors, and the one place that turns an answer or an OS error into a typed exception.

Every exception a client method raises is a :class:`~sidecar.errors.SidecarError`. Errors the
sidecar reports are rebuilt as the server's own class (``error_for_code``) with two attributes set:
``status`` (the HTTP status, ``None`` for a failed item of a batch) and ``request_id`` (the id to
quote when asking the operator, ``None`` if the answer had none). Two classes exist only here::

    SidecarError
    ├── SidecarUnreachable     unreachable          the socket could not be reached, or went silent
    └── UnexpectedResponse     unexpected_response  the answer is not the sidecar's API
"""

from __future__ import annotations

import time
from email.utils import parsedate_to_datetime

from sidecar.errors import DecryptionFailed, RateLimited, SidecarError, error_for_code


class SidecarUnreachable(SidecarError):
    """The sidecar's socket could not be reached, or it stopped answering; the message names it."""

    code = "unreachable"
    default_message = "The sidecar could not be reached."
    status: int | None = None
    request_id: str | None = None

    def __init__(self, message: str | None = None, *, socket_path: str | None = None) -> None:
        super().__init__(message)
        self.socket_path = socket_path


class UnexpectedResponse(SidecarError):
    """Something answered on the socket, but not in the sidecar's API shape."""

    code = "unexpected_response"
    default_message = "The sidecar's answer could not be understood."
    status: int | None = None
    request_id: str | None = None


def connection_failure(socket_path: str, error: OSError, *, timeout: float) -> SidecarUnreachable:
    """The error for an OS-level failure to talk to the sidecar at ``socket_path``."""
    if isinstance(error, TimeoutError):
        message = f"The sidecar at {socket_path} did not answer within {timeout:g} s."
    elif isinstance(error, FileNotFoundError):
        message = (
            f"No sidecar socket at {socket_path}; start kms-sidecar, or point "
            "KMS_SIDECAR_SOCKET or socket_path at its socket."
        )
    elif isinstance(error, ConnectionRefusedError):
        message = (
            f"Nothing is listening on the sidecar socket {socket_path}; is kms-sidecar running?"
        )
    elif isinstance(error, PermissionError):
        message = (
            f"Permission denied on the sidecar socket {socket_path}; "
            "the caller must be allowed by the socket's mode and group."
        )
    elif isinstance(error, (ConnectionResetError, BrokenPipeError)):
        message = f"The sidecar at {socket_path} closed the connection before answering."
    else:
        reason = error.strerror or type(error).__name__
        message = f"Cannot talk to the sidecar socket {socket_path}: {reason}."
    return SidecarUnreachable(message, socket_path=socket_path)


def error_from_answer(
    *,
    status: int | None,
    code: object,
    message: object,
    request_id: object,
    retry_after: str | None = None,
) -> SidecarError:
    """The typed exception for an error the sidecar reported (fields as found in its JSON)."""
    known_code = code if isinstance(code, str) and code else None
    cls = error_for_code(known_code) if known_code else SidecarError
    if not isinstance(message, str) or not message:
        message = (
            f"The sidecar answered HTTP {status} without an error message."
            if status is not None
            else "The sidecar reported an error without a message."
        )
    exc: SidecarError
    if issubclass(cls, DecryptionFailed):
        # The server keeps the real cause to itself; the message it chose is what the user sees.
        exc = cls(cause="reported by the sidecar")
        exc.args = (message,)
    elif issubclass(cls, RateLimited):
        exc = cls(message, retry_after=parse_retry_after(retry_after))
    else:
        exc = cls(message)
    _annotate(exc, status=status, request_id=request_id if isinstance(request_id, str) else None)
    if known_code is not None and cls.code != known_code:
        # A code this client does not know yet: keep it visible rather than claim "internal".
        setattr(exc, "code", known_code)  # noqa: B010 - shadows a ClassVar on this instance only
    return exc


def parse_retry_after(value: str | None, *, now: float | None = None) -> float:
    """Seconds from a ``Retry-After`` value (seconds or an HTTP date); 1.0 if absent or bad."""
    if value is None:
        return 1.0
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return 1.0
        seconds = when.timestamp() - (time.time() if now is None else now)
    if seconds != seconds:  # NaN
        return 1.0
    return max(0.0, seconds)


def _annotate(exc: SidecarError, *, status: int | None, request_id: str | None) -> None:
    exc.status = status
    exc.request_id = request_id
