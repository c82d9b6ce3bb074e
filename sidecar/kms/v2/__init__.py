"""Kubernetes KMS v2 messages and service, generated from ``api.proto``.

Regenerate with ``scripts/gen-kms-proto``; never edit the generated modules by hand.
"""
