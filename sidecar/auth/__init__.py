"""Authenticating callers: JWT verification (``jwt``) and the server's adapter (``caller``).

The server reads the connection's peer credentials and mTLS certificate itself.
"""

from sidecar.auth.jwt import ASYMMETRIC_ALGORITHMS, JwtVerifier, VerificationKey

__all__ = ["ASYMMETRIC_ALGORITHMS", "JwtVerifier", "VerificationKey"]
