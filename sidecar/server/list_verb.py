"""Vault's LIST verb, which aiohttp's HTTP parser refuses (llhttp knows no ``LIST`` method).

hvac's ``list_*`` calls and ``vault list`` with ``-output-curl-string`` send ``LIST /v1/…``;
aiohttp's C parser answers it with a text/plain 400 before any handler runs. So the connection
handler here rewrites a request line ``LIST <target> HTTP/1.1`` into ``GET <target>?list=true``
(what ``bao list`` sends, and what Vault treats the same) before the parser sees it — only at
the start of a request: when the chunk received begins with ``LIST `` and the previous request
on the connection has been read whole, so a request body is never touched. A LIST that cannot
be rewritten (pipelined behind another request in one chunk) still fails to parse, and is then
answered with a Vault-shaped 400 that tells hvac users to pass ``strict_http=True`` (hvac then
sends GET with ``?list=true``), instead of aiohttp's plain text.

:class:`ListVerbAppRunner` is ``web.AppRunner`` with this connection handler.
"""

from __future__ import annotations

import json
import os
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMethod
from aiohttp.web_protocol import RequestHandler

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


class ListVerbRequestHandler(RequestHandler):
    """aiohttp's connection handler, reading LIST as GET ``?list=true``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: The body of the last request parsed on this connection (``None``: none yet).
        self._last_payload: Any = None

    def data_received(self, data: bytes) -> None:
        if data[:5] == _LIST and self._at_request_start():
            data = as_get_list(data)
        count = self._request_count
        super().data_received(data)
        if self._request_count > count and self._messages:
            self._last_payload = self._messages[-1][1]

    def _at_request_start(self) -> bool:
        """Whether the next byte received starts a request: the last one's body is complete."""
        payload = self._last_payload
        return payload is None or bool(payload.is_eof())

    def handle_error(
        self,
        request: Any,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if not (isinstance(exc, BadHttpMethod) and "LIST " in str(exc)):
            return super().handle_error(request, status, exc, message)
        body = {
            "errors": [
                "The LIST method could not be read here; send GET with ?list=true instead "
                "(hvac: hvac.Client(..., strict_http=True))."
            ],
            "code": "invalid_request",
            "request_id": os.urandom(16).hex(),
        }
        response = web.Response(
            status=400, body=json.dumps(body).encode(), content_type="application/json"
        )
        response.force_close()
        return response


class _ListVerbServer(web.Server):
    def __call__(self) -> RequestHandler:
        return ListVerbRequestHandler(self, loop=self._loop, **self._kwargs)


class ListVerbAppRunner(web.AppRunner):
    """``web.AppRunner`` whose connections read Vault's LIST verb (see the module docstring)."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        # The app builds its own web.Server; only the connection-handler factory differs.
        server.__class__ = _ListVerbServer
        return server
