"""Kubernetes service-account tokens as identities, with the policy the example DaemonSet ships.

The tokens are shaped like the kubelet's projected tokens (RS256, a ``kid``, ``aud`` a list, the
nested ``kubernetes.io`` claim with namespace, service account, pod and node) and signed by a key
made here; the sidecar reads the signing keys from a JWKS file, as the DaemonSet does from its
ConfigMap (``kubectl get --raw /openid/v1/jwks``). Real OpenBao behind it.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import jwt
import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric import rsa

from sidecar.devserver import DevOpenBao
from tests.conftest import RunningSidecar, sidecar_config, vault_sections

EXAMPLE = Path(__file__).parents[2] / "examples" / "kubernetes" / "workloads" / "kms-sidecar.yaml"
ISSUER = "https://kubernetes.default.svc.cluster.local"
AUDIENCE = "kms-sidecar"


def shipped_policy() -> str:
    """The ``workloads.toml`` of the example DaemonSet's ConfigMap, as shipped."""
    for doc in yaml.safe_load_all(EXAMPLE.read_text()):
        if doc and doc["kind"] == "ConfigMap" and "workloads.toml" in doc.get("data", {}):
            return str(doc["data"]["workloads.toml"])
    raise AssertionError("no workloads.toml in the example")


class Issuer:
    """A cluster's service-account token issuer: its signing keys and the tokens it makes."""

    def __init__(self, jwks_path: Path) -> None:
        self.jwks_path = jwks_path
        self.keys: dict[str, rsa.RSAPrivateKey] = {}
        self.rotate()

    def rotate(self) -> str:
        """A new signing key, published beside the old ones (as the apiserver does)."""
        kid = uuid.uuid4().hex[:16]
        self.keys[kid] = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.kid = kid
        jwks = []
        for key_id, private in self.keys.items():
            jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(private.public_key()))
            jwks.append({**jwk, "kid": key_id, "use": "sig", "alg": "RS256"})
        self.jwks_path.write_text(json.dumps({"keys": jwks}))
        return kid

    def token(
        self,
        namespace: str,
        service_account: str,
        *,
        audience: str = AUDIENCE,
        lifetime: int = 3600,
        **overrides: Any,
    ) -> str:
        now = int(time.time())
        pod = f"{service_account}-{uuid.uuid4().hex[:5]}"
        claims: dict[str, Any] = {
            "aud": [audience],
            "exp": now + lifetime,
            "iat": now,
            "nbf": now,
            "iss": ISSUER,
            "jti": str(uuid.uuid4()),
            "sub": f"system:serviceaccount:{namespace}:{service_account}",
            "kubernetes.io": {
                "namespace": namespace,
                "node": {"name": "node-1", "uid": str(uuid.uuid4())},
                "pod": {"name": pod, "uid": str(uuid.uuid4())},
                "serviceaccount": {"name": service_account, "uid": str(uuid.uuid4())},
            },
        }
        claims.update(overrides)
        return jwt.encode(claims, self.keys[self.kid], algorithm="RS256", headers={"kid": self.kid})


@pytest.fixture
def cluster(short_tmp: Path) -> Issuer:
    return Issuer(short_tmp / "jwks.json")


@pytest.fixture
def node_sidecar(
    openbao: DevOpenBao, run_sidecar: Any, short_tmp: Path, cluster: Issuer
) -> RunningSidecar:
    sidecar: RunningSidecar = run_sidecar(
        sidecar_config(
            short_tmp / "n.sock",
            policy=shipped_policy(),
            auth={
                "jwt_issuer": ISSUER,
                "jwt_audiences": [AUDIENCE],
                "jwt_jwks_file": str(cluster.jwks_path),
            },
            **vault_sections(openbao, {"tenant-data": {"root_key": "default"}, "payments": {}}),
        )
    )
    return sidecar


def call(sidecar: RunningSidecar, token: str, path: str, body: Any = None) -> Any:
    return sidecar.request("POST", path, body or {}, headers={"Authorization": f"Bearer {token}"})


def test_a_pod_gets_data_keys_bound_to_its_namespace(
    node_sidecar: RunningSidecar, cluster: Issuer
) -> None:
    payments = cluster.token("payments", "api")
    own = call(
        node_sidecar,
        payments,
        "/v1/transit/datakey/plaintext/tenant-data",
        {"encryption_context": {"tenant": "payments"}, "ttl": "1h"},
    )
    assert own.status == 200, own
    other = call(
        node_sidecar,
        payments,
        "/v1/transit/datakey/plaintext/tenant-data",
        {"encryption_context": {"tenant": "billing"}, "ttl": "1h"},
    )
    assert other.status == 403 and other.code == "permission_denied"

    # Another namespace can't open it, even claiming the first namespace's context.
    billing = cluster.token("billing", "worker")
    blob = {"ciphertext": own.data["ciphertext"], "encryption_context": {"tenant": "payments"}}
    stolen = call(node_sidecar, billing, "/v1/transit/decrypt/tenant-data", blob)
    assert stolen.status == 403
    opened = call(node_sidecar, payments, "/v1/transit/decrypt/tenant-data", blob)
    assert opened.status == 200 and opened.data["plaintext"] == own.data["plaintext"]


def test_nested_claims_pick_one_service_account(
    node_sidecar: RunningSidecar, cluster: Issuer
) -> None:
    datakey = "/v1/transit/datakey/plaintext/payments"
    assert call(node_sidecar, cluster.token("payments", "api"), datakey).status == 200
    assert call(node_sidecar, cluster.token("payments", "batch"), datakey).status == 403
    assert call(node_sidecar, cluster.token("orders", "api"), datakey).status == 403
    # A forged top-level claim is not the nested one.
    forged = cluster.token("orders", "api", **{"kubernetes.io.namespace": "payments"})
    assert call(node_sidecar, forged, datakey).status == 403


def test_the_default_service_account_is_refused_everywhere(
    node_sidecar: RunningSidecar, cluster: Issuer
) -> None:
    token = cluster.token("payments", "default")
    answer = call(
        node_sidecar,
        token,
        "/v1/transit/datakey/plaintext/tenant-data",
        {"encryption_context": {"tenant": "payments"}, "ttl": "1h"},
    )
    assert answer.status == 403


@pytest.mark.parametrize(
    "mistake",
    [
        {"audience": "https://kubernetes.default.svc"},  # the API's own audience, not ours
        {"lifetime": -120},  # expired past the leeway
        {"iss": "https://attacker.example"},
    ],
)
def test_tokens_for_someone_else_are_refused_not_ignored(
    node_sidecar: RunningSidecar, cluster: Issuer, mistake: dict[str, Any]
) -> None:
    token = cluster.token("payments", "api", **mistake)
    answer = call(node_sidecar, token, "/v1/transit/datakey/plaintext/payments")
    assert answer.status == 401 and answer.code == "unauthenticated", answer


def test_a_new_cluster_signing_key_is_picked_up_without_a_restart(
    node_sidecar: RunningSidecar, cluster: Issuer
) -> None:
    datakey = "/v1/transit/datakey/plaintext/payments"
    assert call(node_sidecar, cluster.token("payments", "api"), datakey).status == 200
    cluster.rotate()  # the ConfigMap is updated with the new key; the kubelet syncs the file
    assert call(node_sidecar, cluster.token("payments", "api"), datakey).status == 200
