"""Vault's LIST verb, which aiohttp's HTTP parser refuses (llhttp knows no ``LIST`` method).

hvac's ``list_*`` calls send ``LIST /v1/…``; aiohttp's C parser answers it with a 400 before any
handler runs. So :class:`ListVerbRequestHandler` rewrites a request line
``LIST <target> HTTP/1.1`` into ``GET <target>?list=true`` (what ``bao list`` sends, and what
Vault treats the same) before the parser sees it — only at the start of a request: when the
chunk received begins with ``LIST `` and no request's headers or body are still arriving on
the connection, so a request body is never touched. A LIST that cannot be rewritten (pipelined
behind another request in one write) still fails to parse, and is answered with a Vault-shaped
400 that tells hvac users to pass ``strict_http=True`` (hvac then sends GET ``?list=true``).
"""

from __future__ import annotations

from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMethod

from sidecar.errors import InvalidRequest
from sidecar.server.connections import BoundedRequestHandler, closing_error_response

_LIST = b"LIST "


def as_get_list(data: bytes) -> bytes:
    """``data`` whose request line is ``LIST <target> <version>``, as ``GET <target>?list=true``.

    Returned unchanged when the request line is not whole or not three words.
    """
    end = data.find(b"\r\n")
    if end < 0:
        return data
    parts = data[:end].split(b" ")
    if len(parts) != 3:
        return data
    _, target, version = parts
    separator = b"&" if b"?" in target else b"?"
    return b"GET " + target + separator + b"list=true " + version + data[end:]


class ListVerbRequestHandler(BoundedRequestHandler):
    """The bounded connection handler, reading LIST as GET ``?list=true``."""

    def data_received(self, data: bytes) -> None:
        if data[:5] == _LIST and self._body is None and not self._in_headers:
            data = as_get_list(data)
        super().data_received(data)

    def handle_error(
        self,
        request: Any,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if not (isinstance(exc, BadHttpMethod) and "LIST " in str(exc)):
            return super().handle_error(request, status, exc, message)
        error = InvalidRequest(
            "The LIST method could not be read here; send GET with ?list=true instead "
            "(hvac: hvac.Client(..., strict_http=True))."
        )
        return closing_error_response(error)
