"""The Kubernetes KMS v2 provider (DESIGN §12)."""
