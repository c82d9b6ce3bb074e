"""A sidecar in front of a 3-node OpenBao raft cluster: leader loss, total loss, recovery.

The sidecar lists all three nodes in ``addresses``. Its load needs the upstream all the time: a
new KEK every 50 data keys (``kek_max_uses = 50``) and an unwrap for blobs whose cached KEK has
aged past ``kek_ttl``. Killing the leader must cost no request; killing every node must end in
clean 503s once ``upstream_grace`` is over; bringing two nodes back must heal the sidecar without
a restart, and blobs made before the outage must open again.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import RunningSidecar, sidecar_config
from tests.integration.load import Load
from tests.integration.raft import RaftCluster, wait_for

TOKEN_ENV = "KMS_SIDECAR_TEST_RAFT_TOKEN"
KEY = "payments"


@pytest.fixture
def cluster() -> Iterator[RaftCluster]:
    with RaftCluster(3) as cluster:
        cluster.create_key(KEY)
        yield cluster


def _status(sidecar: RunningSidecar) -> dict[str, Any]:
    answer = sidecar.request("GET", "/v1/sidecar/status")
    assert answer.status == 200, answer
    data: dict[str, Any] = answer.data
    return data


def _rotations(sidecar: RunningSidecar) -> int:
    return int(_status(sidecar)["keys"][KEY]["kek_rotations"])


def test_leader_loss_total_loss_and_recovery(
    cluster: RaftCluster, run_sidecar: Any, short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(TOKEN_ENV, cluster.root_token)
    sidecar: RunningSidecar = run_sidecar(
        sidecar_config(
            short_tmp / "s.sock",
            backend={
                "type": "vault",
                "vault": {"addresses": cluster.addresses, "token_env": TOKEN_ENV},
            },
            keys={
                KEY: {
                    "kek_max_uses": 50,
                    "kek_ttl": "2s",
                    "upstream_grace": "3s",
                    "root_poll_interval": "1s",
                }
            },
        )
    )
    load = Load(sidecar, KEY).start()
    try:
        # -- the leader dies under load: nothing fails ----------------------------------------
        wait_for(lambda: _rotations(sidecar) >= 5 and load.made, "the load to warm up", 30)
        load.phase()
        leader = cluster.leader()
        assert leader is not None
        killed_address = cluster.nodes[leader].address
        rotations_at_kill = _rotations(sidecar)
        cluster.kill(leader)
        new_leader = cluster.wait_for_leader(30)
        # Keep going until the sidecar has made 20 more KEKs and reopened old blobs.
        wait_for(lambda: _rotations(sidecar) >= rotations_at_kill + 20, "KEK rotations", 30)
        leader_loss = load.phase()
        print(
            f"leader kill: {leader_loss.ok} requests ok, {len(leader_loss.failed)} failed, "
            f"{_rotations(sidecar) - rotations_at_kill} KEKs made, node{new_leader} now leads"
        )
        assert leader_loss.failed == []
        assert leader_loss.ok > 100
        backend = _status(sidecar)["backend"]
        assert backend["state"] == "ok" and backend["address"] != killed_address, backend

        # -- every node dies: issuance rides out the grace, then clean 503s ------------------
        for index in range(len(cluster.nodes)):
            cluster.kill(index)
        all_dead_at = time.monotonic()
        wait_for(
            lambda: sidecar.request("GET", "/v1/sys/health").status == 503,
            "health to report the outage",
            15,
        )
        sidecar.request("POST", "/v1/sidecar/cache/flush", {"key": KEY})
        blob, plaintext = load.made[0][1], load.made[0][2]
        uncached = sidecar.request("POST", f"/v1/transit/decrypt/{KEY}", {"ciphertext": blob})
        assert uncached.status == 503 and uncached.code == "upstream_unavailable", uncached
        outage = load.phase()
        print(
            f"all nodes down: {outage.ok} requests ok (within grace), "
            f"{len(outage.failed)} refused; health 503 after "
            f"{time.monotonic() - all_dead_at:.1f}s"
        )
        assert outage.failed, "past the grace period requests must fail"
        assert {(status, code) for _, status, code in outage.failed} == {
            (503, "upstream_unavailable")
        }

        # -- two nodes come back (sealed; unsealed): the sidecar heals by itself --------------
        back_at = time.monotonic()
        cluster.start_nodes(leader, (leader + 1) % 3)
        wait_for(
            lambda: load.tally.ok >= 100 and load.tally.last_ok_at > back_at,
            "requests to succeed again",
            30,
        )
        print(f"two nodes back: requests succeed again {time.monotonic() - back_at:.1f}s later")
        opened = sidecar.request("POST", f"/v1/transit/decrypt/{KEY}", {"ciphertext": blob})
        assert opened.status == 200 and opened.data["plaintext"] == plaintext, opened
        health = sidecar.request("GET", "/v1/sys/health")
        assert health.status == 200 and health.json["upstream"]["state"] == "ok", health
        recovery = load.phase()
        assert {(status, code) for _, status, code in recovery.failed} <= {
            (503, "upstream_unavailable")
        }
    finally:
        load.stop()
