"""An upstream outage seen from the socket: grace, clean 503s, the truth in health, recovery.

One OpenBao dev server is killed while a load runs. Within ``upstream_grace`` the sidecar keeps
issuing under its live KEK and keeps opening blobs whose KEK it holds; a blob whose KEK it does
not hold, and everything once the grace is over, gets 503 ``upstream_unavailable`` (never
``decryption_failed``). A new server on the same address heals the sidecar without a restart.
(A dev server forgets its keys when it dies, so opening old blobs after recovery is shown by the
raft cluster test in ``test_ha.py``.)
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sidecar.devserver import DevOpenBao
from tests.conftest import RunningSidecar, sidecar_config
from tests.integration.load import Load
from tests.integration.raft import wait_for

TOKEN_ENV = "KMS_SIDECAR_TEST_OUTAGE_TOKEN"
KEY = "payments"
DATAKEY = f"/v1/transit/datakey/plaintext/{KEY}"
DECRYPT = f"/v1/transit/decrypt/{KEY}"
KEK_TTL, GRACE = 2.0, 3.0


@pytest.fixture
def doomed_bao() -> Iterator[DevOpenBao]:
    """A dev server of this test's own, since the test kills it."""
    bao = DevOpenBao()
    try:
        bao.start()
        bao.create_key(KEY)
        yield bao
    finally:
        bao.stop()


def _key_state(sidecar: RunningSidecar) -> str:
    return str(sidecar.request("GET", "/v1/sidecar/status").data["keys"][KEY]["state"])


def test_outage_grace_then_503_then_recovery(
    doomed_bao: DevOpenBao, run_sidecar: Any, short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(TOKEN_ENV, doomed_bao.root_token)
    sidecar: RunningSidecar = run_sidecar(
        sidecar_config(
            short_tmp / "s.sock",
            backend={
                "type": "vault",
                "vault": {"addresses": [doomed_bao.address], "token_env": TOKEN_ENV},
            },
            keys={
                KEY: {
                    "kek_ttl": f"{KEK_TTL}s",
                    "upstream_grace": f"{GRACE}s",
                    "root_poll_interval": "1s",
                }
            },
        )
    )
    load = Load(sidecar, KEY).start()
    try:
        wait_for(lambda: load.tally.ok >= 50, "the load to warm up", 30)
        cached = sidecar.request("POST", DATAKEY, {}).data  # its KEK is the live one
        load.phase()

        doomed_bao.kill()
        killed_at = time.monotonic()
        # Past kek_ttl the live KEK cannot be replaced: it keeps sealing, in grace.
        wait_for(lambda: _key_state(sidecar) == "degraded", "the key to run in grace", 10)
        in_grace = sidecar.request("POST", DATAKEY, {})
        assert in_grace.status == 200, in_grace
        reopened = sidecar.request("POST", DECRYPT, {"ciphertext": cached["ciphertext"]})
        assert reopened.status == 200 and reopened.data["plaintext"] == cached["plaintext"]
        health = sidecar.request("GET", "/v1/sys/health")
        assert health.status == 200 and health.json["keys"][KEY] == "degraded", health

        # Past the grace: clean 503s, and health says so.
        wait_for(lambda: sidecar.request("POST", DATAKEY, {}).status == 503, "issuance to stop", 10)
        refused_after = time.monotonic() - killed_at
        assert refused_after >= GRACE - 0.5, refused_after  # the grace was honoured
        health = sidecar.request("GET", "/v1/sys/health")
        assert health.status == 503 and health.json["keys"][KEY] == "unavailable", health
        # Nor does the KEK it still holds open blobs: kek_ttl + upstream_grace is its bound.
        late = sidecar.request("POST", DECRYPT, {"ciphertext": cached["ciphertext"]})
        assert late.status == 503 and late.code == "upstream_unavailable", late
        # A blob whose KEK the sidecar does not hold cannot be opened: 503, not "bad blob".
        sidecar.request("POST", "/v1/sidecar/cache/flush", {"key": KEY})
        uncached = sidecar.request("POST", DECRYPT, {"ciphertext": cached["ciphertext"]})
        assert uncached.status == 503 and uncached.code == "upstream_unavailable", uncached
        refused = sidecar.request("POST", DATAKEY, {})
        assert refused.status == 503 and refused.code == "upstream_unavailable", refused
        assert "unavailable" in refused.json["errors"][0]
    finally:
        load.stop()
    outage = load.phase()
    print(
        f"dev server killed: {outage.ok} requests ok in grace, {len(outage.failed)} refused, "
        f"issuance refused {refused_after:.1f}s after the kill"
    )
    assert outage.ok > 0 and outage.failed
    assert {(status, code) for _, status, code in outage.failed} == {(503, "upstream_unavailable")}

    # A new server on the same address, same root token: the sidecar heals by itself.
    reborn = DevOpenBao(port=doomed_bao.port)
    reborn.root_token = doomed_bao.root_token
    try:
        reborn.start()
        reborn.create_key(KEY)
        wait_for(
            lambda: sidecar.request("POST", DATAKEY, {}).status == 200, "issuance to resume", 15
        )
        assert sidecar.request("GET", "/v1/sys/health").status == 200
    finally:
        reborn.stop()
