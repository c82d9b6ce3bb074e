"""Failover across ``addresses`` with scripted nodes: what each kind of node answer leads to."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import hvac.exceptions
import pytest
import requests

from sidecar.backends.vault import VaultBackend
from sidecar.config import VaultConfig
from sidecar.errors import DecryptionFailed, UpstreamError, UpstreamUnavailable

PLAIN = base64.b64encode(b"k" * 32).decode()
OK = {"data": {"plaintext": PLAIN}}
A, B, C = "http://a:8200", "http://b:8200", "http://c:8200"


def _raise(exc: Exception) -> Callable[..., Any]:
    def fail(*args: Any, **kwargs: Any) -> Any:
        raise exc

    return fail


def _node(decrypt: Any, lookup: Any = None) -> Any:
    """A stand-in hvac client: ``decrypt``/``lookup`` are answers or exceptions to raise."""

    def answer(value: Any) -> Callable[..., Any]:
        return _raise(value) if isinstance(value, Exception) else (lambda *a, **k: value)

    return SimpleNamespace(
        secrets=SimpleNamespace(transit=SimpleNamespace(decrypt_data=answer(decrypt))),
        auth=SimpleNamespace(token=SimpleNamespace(lookup_self=answer(lookup or {"data": {}}))),
    )


def _backend(
    monkeypatch: pytest.MonkeyPatch, nodes: dict[str, Any], addresses: tuple[str, ...] = (A, B, C)
) -> tuple[VaultBackend, list[str]]:
    monkeypatch.setenv("KMS_TEST_FAILOVER_TOKEN", "root")
    backend = VaultBackend(
        VaultConfig(addresses=addresses, token_env="KMS_TEST_FAILOVER_TOKEN", max_concurrency=1)
    )
    asked: list[str] = []

    def client(address: str, token: str) -> Any:
        asked.append(address)
        return nodes[address]

    monkeypatch.setattr(backend, "_client", client)
    return backend, asked


def _decrypt(backend: VaultBackend) -> bytes:
    async def run() -> bytes:
        try:
            return await backend.decrypt_ciphertext("k", "vault:v1:xyz", None)
        finally:
            await backend.close()

    return asyncio.run(run())


DOWN = requests.exceptions.ConnectionError("refused")
SEALED = hvac.exceptions.VaultDown("sealed")
NO_LEADER = hvac.exceptions.InternalServerError("local node not active")
REFUSED = hvac.exceptions.InvalidRequest("invalid ciphertext", errors=["invalid ciphertext"])


def test_down_and_sealed_nodes_are_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    backend, _ = _backend(monkeypatch, {A: _node(DOWN), B: _node(SEALED), C: _node(OK)})
    assert _decrypt(backend) == b"k" * 32
    assert backend.status()["address"] == C  # remembered for the next call


def test_no_node_answering_is_unavailable_never_decryption_failed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    backend, _ = _backend(monkeypatch, {A: _node(DOWN), B: _node(SEALED), C: _node(NO_LEADER)})
    with pytest.raises(UpstreamUnavailable):
        _decrypt(backend)
    assert backend.status()["state"] == "unavailable"


def test_a_lagging_standby_refusal_is_checked_with_another_node(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    backend, asked = _backend(monkeypatch, {A: _node(REFUSED), B: _node(OK), C: _node(OK)})
    assert _decrypt(backend) == b"k" * 32
    assert asked[-2:] == [A, B]


def test_a_refusal_confirmed_by_a_second_node_is_decryption_failed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    backend, asked = _backend(monkeypatch, {A: _node(REFUSED), B: _node(REFUSED), C: _node(OK)})
    with pytest.raises(DecryptionFailed):
        _decrypt(backend)
    assert C not in asked


def test_an_unconfirmed_refusal_while_the_rest_is_down_is_unavailable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    backend, _ = _backend(monkeypatch, {A: _node(REFUSED), B: _node(DOWN), C: _node(SEALED)})
    with pytest.raises(UpstreamUnavailable):
        _decrypt(backend)


def test_a_single_node_refusal_is_final(monkeypatch: pytest.MonkeyPatch) -> None:
    backend, _ = _backend(monkeypatch, {A: _node(REFUSED)}, addresses=(A,))
    with pytest.raises(DecryptionFailed):
        _decrypt(backend)


def test_403_with_a_live_token_is_a_policy_refusal(monkeypatch: pytest.MonkeyPatch) -> None:
    forbidden = hvac.exceptions.Forbidden("permission denied")
    backend, _ = _backend(monkeypatch, {A: _node(forbidden)}, addresses=(A,))
    with pytest.raises(UpstreamError, match="refused decrypt"):
        _decrypt(backend)
    assert backend.status()["auth"]["logins"] == 1  # no login storm for a policy refusal
