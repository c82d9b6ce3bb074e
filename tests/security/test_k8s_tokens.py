"""Kubernetes service-account tokens as identities, with the policy the example DaemonSet ships.

The tokens are shaped like the kubelet's projected tokens (RS256, a ``kid``, ``aud`` a list, the
nested ``kubernetes.io`` claim with namespace, service account, pod and node) and signed by a key
made here; the sidecar reads the signing keys from a JWKS file, as the DaemonSet does from its
ConfigMap (``kubectl get --raw /openid/v1/jwks``). Real OpenBao behind it.
"""

from __future__ import annotations

import json
import ssl
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric import rsa

from sidecar.auth import JwtVerifier, jwks
from sidecar.config import config_from_mapping
from sidecar.devserver import DevOpenBao
from sidecar.errors import ConfigError
from tests.conftest import RunningSidecar, sidecar_config, vault_sections
from tests.pki import make_tls_files

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


@pytest.fixture
def cluster_jwks(
    short_tmp: Path, cluster: Issuer, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[str, Path, Path, list[str | None]]]:
    """The cluster's own JWKS endpoint: https with the cluster's CA, for bearers of a token.

    Yields the URL, the CA file, the token file the sidecar sends, and the Authorization
    headers received."""
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    (short_tmp / "pki").mkdir()
    tls = make_tls_files(short_tmp / "pki")
    token_file = short_tmp / "sa-token"
    token_file.write_text("sidecar-sa-token-1\n")
    seen: list[str | None] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.headers.get("Authorization"))
            allowed = f"Bearer {token_file.read_text().strip()}"
            if self.path != "/openid/v1/jwks" or self.headers.get("Authorization") != allowed:
                self.send_response(401)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            body = cluster.jwks_path.read_bytes()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tls.server_cert, tls.server_key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"https://127.0.0.1:{server.server_address[1]}/openid/v1/jwks"
    try:
        yield url, tls.ca_cert, token_file, seen
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_keys_from_the_clusters_own_jwks_endpoint_with_its_ca_and_a_token(
    openbao: DevOpenBao,
    run_sidecar: Any,
    short_tmp: Path,
    cluster: Issuer,
    cluster_jwks: tuple[str, Path, Path, list[str | None]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(jwks, "REFETCH_INTERVAL", 0.0)  # an unknown kid refetches at once
    url, ca_file, token_file, seen = cluster_jwks
    sidecar = run_sidecar(
        sidecar_config(
            short_tmp / "c.sock",
            policy=shipped_policy(),
            auth={
                "jwt_issuer": ISSUER,
                "jwt_audiences": [AUDIENCE],
                "jwt_jwks_url": url,
                "jwt_jwks_ca_file": str(ca_file),
                "jwt_jwks_token_file": str(token_file),
            },
            **vault_sections(openbao, {"payments": {}}),
        )
    )
    datakey = "/v1/transit/datakey/plaintext/payments"
    assert call(sidecar, cluster.token("payments", "api"), datakey).status == 200
    assert seen and set(seen) == {"Bearer sidecar-sa-token-1"}

    # The kubelet replaces the sidecar's token; the cluster rotates its signing key.
    token_file.write_text("sidecar-sa-token-2\n")
    cluster.rotate()
    assert call(sidecar, cluster.token("payments", "api"), datakey).status == 200
    assert seen[-1] == "Bearer sidecar-sa-token-2"


def test_a_token_for_the_jwks_is_never_sent_over_plain_http(short_tmp: Path) -> None:
    token_file = short_tmp / "sa-token"
    token_file.write_text("t")
    with pytest.raises(ConfigError, match=r"^auth\.jwt_jwks_token_file: .*https://"):
        JwtVerifier(
            config_from_mapping(
                {
                    "auth": {
                        "jwt_issuer": ISSUER,
                        "jwt_audiences": [AUDIENCE],
                        "jwt_jwks_url": "http://127.0.0.1:1/openid/v1/jwks",
                        "jwt_jwks_token_file": str(token_file),
                    }
                }
            ).auth
        )
