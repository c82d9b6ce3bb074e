"""Authenticating callers: JWT verification and the server's adapter (``caller``).

``jwt_keys`` reads signing keys, ``jwks`` says where they come from and when they are read
again, ``jwt`` verifies tokens against them. The server reads the connection's peer credentials
and mTLS certificate itself.
"""

from sidecar.auth.jwt import JwtVerifier
from sidecar.auth.jwt_keys import ASYMMETRIC_ALGORITHMS, VerificationKey

__all__ = ["ASYMMETRIC_ALGORITHMS", "JwtVerifier", "VerificationKey"]
