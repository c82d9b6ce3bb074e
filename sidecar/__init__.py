"""kms-sidecar: envelope-encryption data keys for local workloads, over a Unix socket."""

__version__ = "0.1.0"
