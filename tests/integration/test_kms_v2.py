"""The KMS v2 provider as kube-apiserver uses it: a gRPC client on the second socket, real OpenBao.

The client (``tests/kms_client.py``) is grpcio, a different gRPC implementation from the server's
grpclib, calling the method paths of ``k8s.io/kms/apis/v2``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import stat
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from sidecar.backends.memory import MemoryBackend
from sidecar.cli import dev_policy
from sidecar.devserver import DevOpenBao
from sidecar.errors import ConfigError
from sidecar.kms.provider import MAX_CIPHERTEXT_BYTES, MAX_PLAINTEXT_BYTES
from tests.conftest import (
    TOKEN_ENV,
    RunningSidecar,
    connected_as_another_uid,
    request,
    sidecar_config,
    sidecar_process,
    vault_sections,
    wait_for,
)
from tests.kms_client import ApiServer, AsyncApiServer

AUDIT_KEY = "k" * 32


def _hostname_ok(name: str) -> bool:
    """RFC 1123 DNS name, fully qualified (at least two labels), as the apiserver requires of
    annotation keys."""
    labels = name.split(".")
    return (
        len(name) <= 253
        and len(labels) >= 2
        and all(
            0 < len(label) <= 63
            and label[0].isalnum()
            and label[-1].isalnum()
            and all(c.isalnum() or c == "-" for c in label)
            and label.isascii()
            and label == label.lower()
            for label in labels
        )
    )


@pytest.fixture
def root_key(openbao: DevOpenBao) -> str:
    """A transit key of the test's own, so rotations don't reach other tests."""
    name = f"etcd-{uuid.uuid4().hex[:8]}"
    openbao.create_key(name)
    return name


def kms_config(
    short_tmp: Path,
    bao: DevOpenBao,
    root_key: str,
    *,
    name: str = "a",
    policy: str | None = None,
    key: dict[str, Any] | None = None,
    **sections: Any,
) -> Any:
    kms = {"socket": str(short_tmp / f"{name}-kms.sock"), "key": "etcd"}
    kms.update(sections.pop("kms_v2", {}))
    return sidecar_config(
        short_tmp / f"{name}.sock",
        policy=policy,
        **vault_sections(bao, {"etcd": {"root_key": root_key, **(key or {})}, "default": {}}),
        kms_v2=kms,
        audit={"path": str(short_tmp / f"{name}-audit.log"), "hmac_key_env": "KMS_TEST_AUDIT"},
        **sections,
    )


@pytest.fixture(autouse=True)
def _audit_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KMS_TEST_AUDIT", AUDIT_KEY)


@pytest.fixture
def kms(openbao: DevOpenBao, run_sidecar: Any, short_tmp: Path, root_key: str) -> RunningSidecar:
    sidecar: RunningSidecar = run_sidecar(kms_config(short_tmp, openbao, root_key))
    return sidecar


def kms_socket(sidecar: RunningSidecar) -> str:
    return sidecar.config.resolve_path(sidecar.config.kms_v2.socket)


def audit_records(sidecar: RunningSidecar) -> list[dict[str, Any]]:
    with open(sidecar.config.audit.path) as fh:
        return [json.loads(line) for line in fh if '"event":"request"' in line]


def test_status_names_the_root_key_and_its_version(
    kms: RunningSidecar, openbao: DevOpenBao, run_sidecar: Any, short_tmp: Path, root_key: str
) -> None:
    assert stat.S_IMODE(os.stat(kms_socket(kms)).st_mode) == 0o600
    with ApiServer(kms_socket(kms)) as apiserver:
        status = apiserver.status()
    assert (status.version, status.healthz) == ("v2", "ok")
    assert status.key_id == f"vault:transit/{root_key}:v1"

    # Another sidecar on the same upstream (another API name for the key, too) says the same.
    other = run_sidecar(
        sidecar_config(
            short_tmp / "b.sock",
            **vault_sections(openbao, {"cluster": {"root_key": root_key}}),
            kms_v2={"socket": str(short_tmp / "b-kms.sock"), "key": "cluster"},
        )
    )
    with ApiServer(kms_socket(other)) as apiserver:
        assert apiserver.status().key_id == status.key_id
    records = [r for r in audit_records(kms) if r["operation"] == "status"]
    assert len(records) == 1 and records[0]["outcome"] == "ok"
    assert records[0]["identity"]["uid"] == os.getuid()


def test_round_trip_within_the_apiservers_limits(kms: RunningSidecar, root_key: str) -> None:
    with ApiServer(kms_socket(kms)) as apiserver:
        seed = os.urandom(32)
        sealed = apiserver.encrypt(seed)
        assert 0 < len(sealed.ciphertext) <= MAX_CIPHERTEXT_BYTES
        assert seed not in sealed.ciphertext
        assert sealed.key_id == apiserver.status().key_id
        assert all(_hostname_ok(k) for k in sealed.annotations)
        assert sum(len(k) + len(v) for k, v in sealed.annotations.items()) < 32 * 1024
        assert apiserver.decrypt(sealed.ciphertext, sealed.key_id) == seed

        largest = apiserver.encrypt(os.urandom(MAX_PLAINTEXT_BYTES))
        assert len(largest.ciphertext) <= MAX_CIPHERTEXT_BYTES
        for plaintext in (b"", os.urandom(MAX_PLAINTEXT_BYTES + 1)):
            with pytest.raises(grpc.RpcError) as refused:
                apiserver.encrypt(plaintext)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "request id" in (refused.value.details() or "")

    # The same blob opens over the HTTP API too: one key, two front doors.
    opened = kms.request(
        "POST", "/v1/transit/decrypt/etcd", {"ciphertext": sealed.ciphertext.decode()}
    )
    assert opened.status == 200
    records = audit_records(kms)
    operations = [r["operation"] for r in records]
    assert operations.count("encrypt") == 4 and operations.count("decrypt") == 2
    encrypt = next(r for r in records if r["operation"] == "encrypt")
    assert encrypt["root_version"] == 1 and encrypt["kek_id"] and encrypt["rule"]


def test_tampered_or_foreign_ciphertext_is_an_error_never_plaintext(
    kms: RunningSidecar,
) -> None:
    with ApiServer(kms_socket(kms)) as apiserver:
        seed = os.urandom(32)
        ciphertext = apiserver.encrypt(seed).ciphertext
        foreign = kms.request("POST", "/v1/transit/datakey/plaintext/default", {})
        bad = [
            b"",
            b"\xff" * 40,
            b"not a blob",
            b"sidecar:v1:" + b"A" * 2000,
            foreign.data["ciphertext"].encode(),  # another key's blob
        ]
        for i in range(len(b"sidecar:v1:"), len(ciphertext), 7):
            flipped = bytearray(ciphertext)
            flipped[i] = ord("B") if flipped[i] != ord("B") else ord("C")
            bad.append(bytes(flipped))
        for candidate in bad:
            with pytest.raises(grpc.RpcError) as refused:
                apiserver.decrypt(candidate)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, candidate
        assert apiserver.decrypt(ciphertext) == seed
    causes = {r["cause"] for r in audit_records(kms) if r["outcome"] == "error"}
    assert causes and None not in causes  # each refusal says why, in the audit log only


def test_hundreds_of_decrypts_at_once_share_one_unwrap(
    openbao: DevOpenBao, run_sidecar: Any, short_tmp: Path, root_key: str
) -> None:
    """An apiserver start-up: every stored seed is opened at once, by a sidecar that has just
    started and holds no KEK."""
    first = run_sidecar(kms_config(short_tmp, openbao, root_key, name="a"))
    with ApiServer(kms_socket(first)) as apiserver:
        seeds = [os.urandom(32) for _ in range(300)]
        sealed = [apiserver.encrypt(seed).ciphertext for seed in seeds]
    fresh = run_sidecar(kms_config(short_tmp, openbao, root_key, name="b"))
    backend = fresh.request("GET", "/v1/sidecar/status").data["backend"]
    unwraps_before = backend["calls"].get("decrypt", 0)  # transit decrypt: one KEK unwrap

    async def all_at_once() -> tuple[list[bytes], float]:
        client = AsyncApiServer(kms_socket(fresh))
        try:
            started = time.perf_counter()

            async def timed(ciphertext: bytes) -> tuple[bytes, float]:
                plaintext = await client.decrypt(ciphertext)
                return plaintext, time.perf_counter() - started

            answers = await asyncio.gather(*(timed(c) for c in sealed))
        finally:
            await client.close()
        return [p for p, _ in answers], max(t for _, t in answers)

    opened, slowest = asyncio.run(all_at_once())
    assert opened == seeds
    backend = fresh.request("GET", "/v1/sidecar/status").data["backend"]
    assert backend["calls"].get("decrypt", 0) - unwraps_before == 1
    assert slowest < 3.0, "each inside the apiserver's 3 s timeout"
    print(f"{len(sealed)} concurrent Decrypts on a cold sidecar: 1 unwrap, slowest {slowest:.3f}s")


def test_rotation_changes_the_key_id_and_old_seeds_still_open(
    openbao: DevOpenBao, run_sidecar: Any, short_tmp: Path, root_key: str
) -> None:
    sidecar = run_sidecar(
        kms_config(short_tmp, openbao, root_key, key={"root_poll_interval": "1s"})
    )
    with ApiServer(kms_socket(sidecar)) as apiserver:
        old_seed = os.urandom(32)
        old = apiserver.encrypt(old_seed)
        assert old.key_id.endswith(":v1")

        openbao.client().secrets.transit.rotate_key(root_key, mount_point="transit")  # upstream
        deadline = time.monotonic() + 15
        while apiserver.status().key_id == old.key_id:  # the poll notices
            assert time.monotonic() < deadline, "the key id did not change"
            time.sleep(0.1)
        assert apiserver.status().key_id == f"vault:transit/{root_key}:v2"

        new_seed = os.urandom(32)
        new = apiserver.encrypt(new_seed)
        assert new.key_id == apiserver.status().key_id and new.ciphertext.startswith(b"sidecar:v2:")
        assert apiserver.decrypt(old.ciphertext, old.key_id) == old_seed
        assert apiserver.decrypt(new.ciphertext, new.key_id) == new_seed


OUTAGE_TOKEN_ENV = "KMS_SIDECAR_TEST_KMS_OUTAGE_TOKEN"


def _accepts(path: str) -> bool:
    """Whether a server listens on the socket at ``path`` (it exists a moment before it does)."""
    probe = socket.socket(socket.AF_UNIX)
    try:
        probe.connect(path)
    except OSError:
        return False
    finally:
        probe.close()
    return True


@pytest.fixture
def doomed_bao() -> Iterator[DevOpenBao]:
    """A dev server of this test's own, since the test kills it."""
    bao = DevOpenBao()
    try:
        bao.start()
        bao.create_key("etcd")
        yield bao
    finally:
        bao.stop()


def test_outage_decrypts_from_cache_then_healthz_fails_then_recovers(
    doomed_bao: DevOpenBao, run_sidecar: Any, short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(OUTAGE_TOKEN_ENV, doomed_bao.root_token)
    grace = 3.0
    sidecar = run_sidecar(
        sidecar_config(
            short_tmp / "o.sock",
            backend={
                "type": "vault",
                "vault": {"addresses": [doomed_bao.address], "token_env": OUTAGE_TOKEN_ENV},
            },
            keys={
                "etcd": {"kek_ttl": "2s", "upstream_grace": f"{grace}s", "root_poll_interval": "1s"}
            },
            kms_v2={"socket": str(short_tmp / "o-kms.sock"), "key": "etcd"},
        )
    )
    with ApiServer(kms_socket(sidecar)) as apiserver:
        seed = os.urandom(32)
        sealed = apiserver.encrypt(seed)
        doomed_bao.kill()
        killed_at = time.monotonic()

        # In grace: seeds still seal and open (the KEK is cached) and healthz stays ok.
        assert apiserver.decrypt(sealed.ciphertext) == seed
        assert apiserver.status().healthz == "ok"
        apiserver.encrypt(os.urandom(32))

        # Past the grace: healthz says why, new seeds are refused; cached KEKs still open.
        deadline = time.monotonic() + 15
        while (status := apiserver.status()).healthz == "ok":
            assert time.monotonic() < deadline, "healthz stayed ok"
            time.sleep(0.1)
        assert time.monotonic() - killed_at >= grace - 0.5
        assert "unavailable" in status.healthz
        with pytest.raises(grpc.RpcError) as refused:
            apiserver.encrypt(os.urandom(32))
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE

        # A new server on the same address: healthy again without a restart.
        reborn = DevOpenBao(port=doomed_bao.port)
        reborn.root_token = doomed_bao.root_token
        try:
            reborn.start()
            reborn.create_key("etcd")
            deadline = time.monotonic() + 15
            while apiserver.status().healthz != "ok":
                assert time.monotonic() < deadline, "healthz did not recover"
                time.sleep(0.1)
            fresh = os.urandom(32)
            assert apiserver.decrypt(apiserver.encrypt(fresh).ciphertext) == fresh
        finally:
            reborn.stop()


def _relay(upstream: socket.socket, path: str) -> threading.Thread:
    """Serve one connection on ``path`` and pump its bytes to and from ``upstream``."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)

    def pump(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while chunk := src.recv(65536):
                dst.sendall(chunk)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def serve() -> None:
        with listener:
            client, _ = listener.accept()
        with client:
            back = threading.Thread(target=pump, args=(upstream, client), daemon=True)
            back.start()
            pump(client, upstream)
            back.join(30)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


def test_a_uid_without_a_rule_is_refused(
    openbao: DevOpenBao, run_sidecar: Any, short_tmp: Path, root_key: str
) -> None:
    sidecar = run_sidecar(kms_config(short_tmp, openbao, root_key, kms_v2={"socket_mode": "0666"}))
    os.chmod(short_tmp, 0o755)  # noqa: S103 - the socket directory, for the other uid
    # The apiserver's calls on a connection that uid 65534 made: its peer credentials are the
    # connection's, whoever then writes to it (the checkout may be private to this user).
    with connected_as_another_uid(kms_socket(sidecar)) as conn:
        relay = _relay(conn, str(short_tmp / "relay.sock"))
        answers = []
        with ApiServer(str(short_tmp / "relay.sock")) as apiserver:
            for call in (
                apiserver.status,
                lambda: apiserver.encrypt(b"s"),
                lambda: apiserver.decrypt(b"x"),
            ):
                with pytest.raises(grpc.RpcError) as refused:
                    call()
                answers.append(refused.value.code().name)
        relay.join(30)
    assert answers == ["PERMISSION_DENIED"] * 3
    denied = [r for r in audit_records(sidecar) if r["identity"]["uid"] == 65534]
    assert [r["outcome"] for r in denied] == ["denied"] * 3
    assert {r["operation"] for r in denied} == {"status", "encrypt", "decrypt"}


def test_in_flight_calls_drain_on_stop(run_sidecar: Any, short_tmp: Path) -> None:
    backend = MemoryBackend({"etcd": "aes256"}, delay=1.0)  # the KEK fetch takes a second
    sidecar = run_sidecar(
        sidecar_config(
            short_tmp / "d.sock",
            keys={"etcd": {}},
            kms_v2={"socket": str(short_tmp / "d-kms.sock"), "key": "etcd"},
        ),
        backend,
    )
    answers: list[Any] = []

    def call() -> None:
        with ApiServer(kms_socket(sidecar)) as apiserver:
            answers.append(apiserver.encrypt(b"s" * 32))

    worker = threading.Thread(target=call)
    worker.start()
    while backend.calls["generate_kek"] == 0:
        time.sleep(0.01)
    sidecar.stop()
    worker.join()
    assert answers and answers[0].ciphertext.startswith(b"sidecar:v1:"), answers
    assert not os.path.exists(kms_socket(sidecar))


def test_the_run_command_serves_kms_v2_and_exits_zero_on_sigterm(
    openbao: DevOpenBao, short_tmp: Path, root_key: str
) -> None:
    policies = short_tmp / "policies"
    policies.mkdir()
    (policies / "main.toml").write_text(dev_policy(os.getuid()))
    config_file = short_tmp / "sidecar.toml"
    config_file.write_text(
        f"""
[server]
socket = "{short_tmp / "r.sock"}"
socket_mode = "0600"

[backend.vault]
addresses = ["{openbao.address}"]
token_env = "{TOKEN_ENV}"

[keys.etcd]
root_key = "{root_key}"

[kms_v2]
socket = "{short_tmp / "r-kms.sock"}"
key = "etcd"

[policies]
dir = "policies"
"""
    )
    sock, kms_sock = str(short_tmp / "r.sock"), str(short_tmp / "r-kms.sock")
    with sidecar_process(config_file, sock) as proc:
        wait_for(lambda: _accepts(kms_sock), proc)
        with ApiServer(kms_sock) as apiserver:
            seed = os.urandom(32)
            assert apiserver.decrypt(apiserver.encrypt(seed).ciphertext) == seed
            assert apiserver.status().healthz == "ok"
        assert request(sock, "GET", "/v1/sys/health").status == 200
        metrics = request(sock, "GET", "/metrics").text
        assert 'kms_requests_total{operation="kms_v2_encrypt",outcome="ok"} 1.0' in metrics
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    assert not os.path.exists(kms_sock) and not os.path.exists(sock)


def test_a_kms_socket_path_taken_by_a_file_stops_start_up_naming_it(
    openbao: DevOpenBao, run_sidecar: Any, short_tmp: Path, root_key: str
) -> None:
    taken = short_tmp / "a-kms.sock"
    taken.write_text("not a socket")
    with pytest.raises(ConfigError, match=r"^kms_v2\.socket: .* is not a socket"):
        run_sidecar(kms_config(short_tmp, openbao, root_key))
    assert taken.read_text() == "not a socket"
