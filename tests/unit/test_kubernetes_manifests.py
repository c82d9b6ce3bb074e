"""examples/kubernetes/: every manifest against the Kubernetes schemas, offline, and the sidecar
configuration and policies they carry through the sidecar's own loaders.

Objects of the Kubernetes API are checked with ``kubernetes-validate`` (the JSON schemas generated
from the API's OpenAPI document) in strict mode, so an unknown or misspelt field fails, for the
first release where KMS v2 is GA (1.29) and the newest the package knows. ``EncryptionConfiguration``
is not an API object (kube-apiserver reads it from a file), so no published schema covers it: it
is checked against :data:`ENCRYPTION_CONFIGURATION`, written here from the upstream Go types
(``k8s.io/apiserver/pkg/apis/apiserver/v1``: ``EncryptionConfiguration``,
``ResourceConfiguration``, ``ProviderConfiguration``, ``KMSConfiguration``) and the apiserver's
validation of them (one provider per entry; a v2 KMS provider has no ``cachesize``; a name
without ``:``; a ``unix://`` endpoint).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from sidecar.config import config_from_mapping, load_config
from sidecar.policy import load_policies, parse_policy_text
from sidecar.server.socket_access import check_socket_access, world_connectable

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

EXAMPLES = Path(__file__).parents[2] / "examples" / "kubernetes"
MANIFESTS = sorted(EXAMPLES.rglob("*.yaml"))
#: KMS v2 is GA from 1.29; the newest release the schemas know is checked too.
VERSIONS = ("1.29.0", kubernetes_validate.latest_version())

_KEYS = {
    "type": "object",
    "additionalProperties": False,
    "required": ["keys"],
    "properties": {
        "keys": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["name", "secret"],
                "properties": {"name": {"type": "string"}, "secret": {"type": "string"}},
            },
        }
    },
}

ENCRYPTION_CONFIGURATION: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "resources"],
    "properties": {
        "apiVersion": {"const": "apiserver.config.k8s.io/v1"},
        "kind": {"const": "EncryptionConfiguration"},
        "resources": {"type": "array", "minItems": 1, "items": {"$ref": "#/$defs/resource"}},
    },
    "$defs": {
        "resource": {
            "type": "object",
            "additionalProperties": False,
            "required": ["resources", "providers"],
            "properties": {
                "resources": {
                    "type": "array",
                    "minItems": 1,
                    "items": {"type": "string", "minLength": 1},
                },
                "providers": {
                    "type": "array",
                    "minItems": 1,
                    "items": {"$ref": "#/$defs/provider"},
                },
            },
        },
        "provider": {
            "type": "object",
            "additionalProperties": False,
            "minProperties": 1,
            "maxProperties": 1,
            "properties": {
                "aesgcm": _KEYS,
                "aescbc": _KEYS,
                "secretbox": _KEYS,
                "identity": {"type": "object", "additionalProperties": False},
                "kms": {"$ref": "#/$defs/kms"},
            },
        },
        "kms": {
            "type": "object",
            "additionalProperties": False,
            "required": ["name", "endpoint"],
            "properties": {
                "apiVersion": {"enum": ["v1", "v2"]},
                "name": {"type": "string", "pattern": "^[^:]+$"},
                "cachesize": {"type": "integer"},
                "endpoint": {"type": "string", "pattern": "^unix:///."},
                "timeout": {"type": "string", "pattern": r"^([0-9]+(\.[0-9]+)?(ns|us|ms|s|m|h))+$"},
            },
            "if": {"required": ["apiVersion"], "properties": {"apiVersion": {"const": "v2"}}},
            "then": {"not": {"required": ["cachesize"]}},
        },
    },
}


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def objects(kind: str) -> list[dict[str, Any]]:
    return [doc for path in MANIFESTS for doc in documents(path) if doc["kind"] == kind]


def test_the_examples_are_all_there() -> None:
    kinds = {doc["kind"] for path in MANIFESTS for doc in documents(path)}
    assert {"DaemonSet", "Pod", "EncryptionConfiguration", "ConfigMap", "Secret"} <= kinds


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: str(p.relative_to(EXAMPLES)))
def test_every_manifest_fits_the_kubernetes_schemas(path: Path, version: str) -> None:
    for doc in documents(path):
        if doc["kind"] == "EncryptionConfiguration":
            jsonschema.validate(doc, ENCRYPTION_CONFIGURATION)
        else:
            kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize(
    "mistake",
    [
        {"kms": {"apiVersion": "v2", "name": "a", "endpoint": "unix:///s", "cachesize": 10}},
        {"kms": {"apiVersion": "v2", "name": "a:b", "endpoint": "unix:///s"}},
        {"kms": {"apiVersion": "v2", "name": "a", "endpoint": "tcp://s"}},
        {"kms": {"apiVersion": "v3", "name": "a", "endpoint": "unix:///s"}},
        {"kms": {"name": "a", "endpoint": "unix:///s", "timout": "3s"}},
        {"kms": {"name": "a", "endpoint": "unix:///s"}, "identity": {}},
    ],
)
def test_the_encryption_configuration_schema_refuses_what_the_apiserver_does(
    mistake: dict[str, Any],
) -> None:
    doc = {
        "apiVersion": "apiserver.config.k8s.io/v1",
        "kind": "EncryptionConfiguration",
        "resources": [{"resources": ["secrets"], "providers": [mistake]}],
    }
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doc, ENCRYPTION_CONFIGURATION)


def test_the_apiserver_reaches_the_control_plane_sidecar() -> None:
    config = load_config(EXAMPLES / "control-plane" / "sidecar.toml")
    load_policies(config.resolve_path(config.policies.dir))  # a bad rule raises, naming it
    (encryption,) = objects("EncryptionConfiguration")
    (kms,) = [p["kms"] for r in encryption["resources"] for p in r["providers"] if "kms" in p]
    assert kms["apiVersion"] == "v2"
    assert kms["endpoint"] == f"unix://{config.kms_v2.socket}"
    (pod,) = objects("Pod")
    host_dirs = {v["hostPath"]["path"] for v in pod["spec"]["volumes"] if "hostPath" in v}
    assert str(Path(config.kms_v2.socket).parent) in host_dirs
    assert str(Path(config.audit.path).parent) in host_dirs


def test_the_daemonset_config_and_policies_load_and_fit_the_example_app() -> None:
    (config_map,) = [c for c in objects("ConfigMap") if "sidecar.toml" in c["data"]]
    config = config_from_mapping(tomllib.loads(config_map["data"]["sidecar.toml"]))
    rules = parse_policy_text(config_map["data"]["workloads.toml"], path="workloads.toml")
    assert len(rules)
    # The socket is world-connectable, so every allow rule must tell callers apart.
    assert world_connectable(config.server.socket_mode_bits)
    check_socket_access(config.server.socket_mode_bits, rules)
    (daemonset,) = objects("DaemonSet")
    socket_dirs = {
        v["hostPath"]["path"]
        for v in daemonset["spec"]["template"]["spec"]["volumes"]
        if "hostPath" in v
    }
    assert str(Path(config.server.socket).parent) in socket_dirs
    (sidecar,) = daemonset["spec"]["template"]["spec"]["containers"]
    mounted = {m["mountPath"] for m in sidecar["volumeMounts"]}
    for path in (config.auth.jwt_jwks_ca_file, config.auth.jwt_jwks_token_file):
        assert str(Path(path).parent) in mounted, path
    (app,) = [d for d in objects("Deployment") if d["metadata"]["namespace"] == "payments"]
    pod = app["spec"]["template"]["spec"]
    (token,) = [
        s["serviceAccountToken"]
        for v in pod["volumes"]
        if "projected" in v
        for s in v["projected"]["sources"]
    ]
    assert token["audience"] in config.auth.jwt_audiences
    assert {v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v} <= socket_dirs
