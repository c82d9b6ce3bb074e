"""The Kubernetes KMS v2 provider: kube-apiserver's key manager on a second Unix socket."""
