"""Where JWT signing keys come from, and when they are read again.

``jwt_public_keys`` (read once at start), ``jwt_jwks_file`` and ``jwt_jwks_url``, all combined.
The URL is fetched on first use (a failure is retried after :data:`RETRY_AFTER_FAILURE`, not on
every request). The file and URL are read again when a token names an unknown ``kid``, at most
once per :data:`REFETCH_INTERVAL` counted from the last read; the URL is also refreshed in the
background once its keys are older than :data:`JWKS_MAX_AGE`. A failed re-read keeps the keys
already held. When a key disappears, ``on_withdrawn`` is called (the verifier forgets its
cached tokens).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
import urllib.request
from collections.abc import Callable, Sequence
from typing import Final

from sidecar.auth.jwt_keys import VerificationKey, fingerprint, keys_from_jwks

log = logging.getLogger(__name__)

REFETCH_INTERVAL: Final = 30.0
"""Seconds between two key reloads triggered by unknown key ids."""

RETRY_AFTER_FAILURE: Final = 5.0
"""Seconds before a failed JWKS fetch is tried again."""

JWKS_MAX_AGE: Final = 300.0
"""Seconds after which JWKS URL keys are refreshed in the background."""

MAX_JWKS_BYTES: Final = 1024 * 1024

Fetch = Callable[[str, float], bytes]
"""URL and timeout (seconds) → body bytes; blocking, run in a thread."""


def fetch_url(
    url: str,
    timeout: float,
    *,
    context: ssl.SSLContext | None = None,
    token_file: str = "",
) -> bytes:
    """GET ``url`` (blocking; run it in a thread). Raises ``OSError``/``ValueError``.

    ``context`` replaces the system's trusted CAs; ``token_file``'s content, read at each fetch
    (the kubelet replaces a projected token before it expires), goes as ``Authorization: Bearer``.
    """
    headers = {"Accept": "application/json", "User-Agent": "kms-sidecar"}
    if token_file:
        with open(token_file, encoding="ascii") as fh:
            headers["Authorization"] = f"Bearer {fh.read().strip()}"
    request = urllib.request.Request(  # noqa: S310 - the scheme is checked to be http(s) at start
        url, headers=headers
    )
    with urllib.request.urlopen(request, timeout=timeout, context=context) as response:  # noqa: S310
        body: bytes = response.read(MAX_JWKS_BYTES + 1)
    if len(body) > MAX_JWKS_BYTES:
        raise ValueError(f"the JWKS is larger than {MAX_JWKS_BYTES} bytes")
    return body


def cluster_fetcher(ca_file: str, token_file: str) -> Fetch:
    """:func:`fetch_url` as a Kubernetes cluster's own JWKS endpoint needs it
    (``https://kubernetes.default.svc/openid/v1/jwks``): the cluster's CA (``ca_file``, PEM;
    ``""`` keeps the system's) and a service-account token (``token_file``; ``""`` sends none).
    Raises ``ssl.SSLError``/``OSError`` for an unusable CA file.
    """
    context = ssl.create_default_context(cafile=ca_file) if ca_file else None

    def fetch(url: str, timeout: float) -> bytes:
        return fetch_url(url, timeout, context=context, token_file=token_file)

    return fetch


class JwtKeySources:
    """The trusted keys from every configured source, reloaded on the schedule above.

    ``jwks_file`` is an absolute path or ``""``; ``jwks_url`` a checked http(s) URL or ``""``.
    """

    def __init__(
        self,
        *,
        static: Sequence[VerificationKey] = (),
        jwks_file: str = "",
        jwks_url: str = "",
        fetch: Fetch = fetch_url,
        fetch_timeout: float = 5.0,
        on_withdrawn: Callable[[], None] = lambda: None,
    ) -> None:
        self._static = list(static)
        self._jwks_file = jwks_file
        self._jwks_url = jwks_url
        self._fetch = fetch
        self._fetch_timeout = fetch_timeout
        self._on_withdrawn = on_withdrawn
        self._file_keys: list[VerificationKey] = []
        self._url_keys: list[VerificationKey] = []
        self._keys: list[VerificationKey] = []
        self._lock = asyncio.Lock()
        self._last_reload: float | None = None  # last key reload: first fetch or unknown kid
        self._url_fetched_at: float | None = None
        self._url_failed_at: float | None = None
        self._background: asyncio.Task[None] | None = None
        #: JWKS URL fetches attempted.
        self.fetches = 0
        self._rebuild()

    @property
    def keys(self) -> tuple[VerificationKey, ...]:
        """The keys currently trusted."""
        return tuple(self._keys)

    @property
    def waiting_for_url(self) -> bool:
        """Whether a JWKS URL is configured and has never been fetched successfully."""
        return bool(self._jwks_url) and self._url_fetched_at is None

    def has(self, kid: str) -> bool:
        """Whether a trusted key has this key id."""
        return any(k.kid == kid for k in self._keys)

    def load_file(self) -> int:
        """Read the JWKS file now (at start). Raises ``OSError``/``ValueError``; returns the number
        of usable keys it holds."""
        self._file_keys = self._read_jwks_file()
        self._rebuild()
        return len(self._file_keys)

    def _read_jwks_file(self) -> list[VerificationKey]:
        with open(self._jwks_file, "rb") as fh:
            body = fh.read(MAX_JWKS_BYTES + 1)
        if len(body) > MAX_JWKS_BYTES:
            raise ValueError(f"the JWKS is larger than {MAX_JWKS_BYTES} bytes")
        return keys_from_jwks(json.loads(body), origin=self._jwks_file)

    def _rebuild(self) -> None:
        before = {(k.kid, fingerprint(k)) for k in self._keys}
        self._keys = [*self._static, *self._file_keys, *self._url_keys]
        after = {(k.kid, fingerprint(k)) for k in self._keys}
        if before - after:
            self._on_withdrawn()  # tokens a withdrawn key signed must be checked again

    async def refresh(self, now: float) -> None:
        """Read the JWKS file and fetch the JWKS URL now (for start-up and SIGHUP)."""
        async with self._lock:
            await self._reload(now)

    async def _reload(self, now: float) -> None:
        if self._jwks_file:
            try:
                self._file_keys = await asyncio.to_thread(self._read_jwks_file)
            except (OSError, ValueError) as exc:
                log.warning("cannot re-read %s, keeping its old keys: %s", self._jwks_file, exc)
        if self._jwks_url:
            await self._fetch_jwks(now)
        self._rebuild()

    async def _fetch_jwks(self, now: float) -> None:
        self.fetches += 1
        try:
            body = await asyncio.to_thread(self._fetch, self._jwks_url, self._fetch_timeout)
            keys = keys_from_jwks(json.loads(body), origin=self._jwks_url)
        except (OSError, ValueError) as exc:
            self._url_failed_at = now
            log.warning("cannot fetch the JWKS from %s: %s", self._jwks_url, exc)
            return
        if not keys:
            self._url_failed_at = now
            log.warning("the JWKS at %s holds no usable signing key", self._jwks_url)
            return
        self._url_keys = keys
        self._url_fetched_at = now
        self._url_failed_at = None
        log.info("fetched %d JWT signing keys from %s", len(keys), self._jwks_url)

    async def ensure_url_keys(self, now: float) -> None:
        """Fetch the JWKS URL if it never succeeded (retrying failures every few seconds)."""
        if not self.waiting_for_url:
            return
        async with self._lock:
            if self._url_fetched_at is not None:
                return
            if self._url_failed_at is not None and now - self._url_failed_at < RETRY_AFTER_FAILURE:
                return
            await self._fetch_jwks(now)
            self._last_reload = now
            self._rebuild()

    async def reload_for_unknown_kid(self, kid: str, now: float) -> None:
        """Read the file and URL again for a token naming ``kid``, if none was read lately."""
        if not (self._jwks_file or self._jwks_url):
            return
        if self.waiting_for_url:
            return  # never fetched yet: ensure_url_keys retries on its own schedule
        async with self._lock:
            if self.has(kid):
                return  # another request already reloaded
            if self._last_reload is not None and now - self._last_reload < REFETCH_INTERVAL:
                return
            self._last_reload = now
            await self._reload(now)

    def refresh_if_stale(self, now: float) -> None:
        """Start a background refetch of the URL's keys once they are older than the max age."""
        fetched = self._url_fetched_at
        if fetched is None or now - fetched < JWKS_MAX_AGE:
            return
        if self._background is not None and not self._background.done():
            return
        self._background = asyncio.create_task(self._refresh_stale(now))

    async def _refresh_stale(self, now: float) -> None:
        async with self._lock:
            if self._url_fetched_at is not None and now - self._url_fetched_at < JWKS_MAX_AGE:
                return
            await self._fetch_jwks(now)
            if self._url_fetched_at is None or self._url_fetched_at < now:
                self._url_fetched_at = now  # failed: try again after another max age
            self._rebuild()

    async def aclose(self) -> None:
        """Stop a background JWKS refresh, if one is running."""
        task, self._background = self._background, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
