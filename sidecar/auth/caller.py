"""Who is calling: the connection's proven facts plus a verified JWT, as the server asks.

:class:`CallerAuthenticator` satisfies the server's ``Authenticator`` Protocol. The connection's
facts (Unix peer credentials, a verified client certificate) are read by the server when the
connection is made; this adds what a token proves.
"""

from __future__ import annotations

import dataclasses

from sidecar.auth.jwt import JwtVerifier
from sidecar.errors import Unauthenticated
from sidecar.identity import Identity


class CallerAuthenticator:
    """The connection's facts plus a verified JWT, if one is presented.

    A token that is present but invalid — or present when no JWT verification is configured — is
    refused by the verifier with 401; it never falls back to the peer credentials. With
    ``peercred=False`` the Unix peer credentials are left out of every identity.
    """

    def __init__(self, verifier: JwtVerifier, *, peercred: bool) -> None:
        self.verifier = verifier
        self._peercred = peercred

    async def identify(self, connection: Identity, token: str | None) -> Identity:
        """``connection`` with the token's claims; raises ``Unauthenticated`` for a bad token."""
        if not self._peercred and connection.peer is not None:
            connection = dataclasses.replace(connection, peer=None)
        if token is None:
            return connection
        try:
            claims = await self.verifier.verify(token)
        except Unauthenticated as exc:
            raise Unauthenticated(f"The token was refused: {exc.message}.") from None
        return dataclasses.replace(connection, jwt=claims)

    async def reload(self) -> None:
        """Fetch the JWT signing keys again, so a withdrawn key stops verifying."""
        if self.verifier.enabled:
            await self.verifier.refresh_keys()

    async def close(self) -> None:
        """Stop the verifier's background JWKS refresh."""
        await self.verifier.aclose()
