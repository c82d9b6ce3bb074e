"""Claim paths with dots in claim names (``kubernetes.io``): one defined reading, or none."""

from __future__ import annotations

from typing import Any

import pytest

from sidecar.policy.facts import MISSING, resolve_claim

K8S: dict[str, Any] = {
    "kubernetes.io": {
        "namespace": "payments",
        "serviceaccount": {"name": "api", "uid": "u-1"},
        "pod": {"name": "api-7d9c", "uid": "u-2"},
    },
    "team": "blue",
}


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("kubernetes.io.namespace", "payments"),
        ("kubernetes.io.serviceaccount.name", "api"),
        ("kubernetes.io.pod.name", "api-7d9c"),
        ("team", "blue"),
    ],
)
def test_nested_kubernetes_claims_resolve(path: str, value: str) -> None:
    assert resolve_claim(K8S, path.split(".")) == value


def test_quoted_toml_parts_read_the_same_claim() -> None:
    assert resolve_claim(K8S, ("kubernetes.io", "namespace")) == "payments"


@pytest.mark.parametrize("path", ["kubernetes.namespace", "kubernetes.io.node.name", "io"])
def test_absent_claims_are_missing(path: str) -> None:
    assert resolve_claim(K8S, path.split(".")) is MISSING


def test_a_path_naming_two_claims_is_missing_not_the_shadow() -> None:
    """A token with a top-level "kubernetes.io.namespace" beside the nested claim matches
    neither reading: such a claim can't stand in for the one the rule meant."""
    forged = {**K8S, "kubernetes.io.namespace": "kms-system"}
    assert resolve_claim(forged, ["kubernetes", "io", "namespace"]) is MISSING
    assert resolve_claim(forged, ("kubernetes.io", "namespace")) is MISSING
    assert resolve_claim(forged, ["kubernetes", "io", "pod", "name"]) == "api-7d9c"
