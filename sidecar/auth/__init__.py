"""Authenticating callers: JWT verification. (The server reads peer credentials and mTLS.)"""

from sidecar.auth.jwt import ASYMMETRIC_ALGORITHMS, JwtVerifier, VerificationKey

__all__ = ["ASYMMETRIC_ALGORITHMS", "JwtVerifier", "VerificationKey"]
