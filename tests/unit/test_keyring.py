"""The keyring over the in-memory backend, with an injected clock: no sleeping, no services."""

from __future__ import annotations

import asyncio

import pytest

from sidecar.backends.memory import MemoryBackend
from sidecar.config import KeyConfig
from sidecar.errors import DecryptionFailed, InvalidRequest, PermissionDenied, UpstreamUnavailable
from sidecar.keys import envelope
from sidecar.keys.kek_cache import REFUSED_SECONDS, RefusedKeks
from sidecar.keys.keyring import Keyring


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def backend() -> MemoryBackend:
    return MemoryBackend({"payments": "aes256", "other": "aes256"})


def make_keyring(backend: MemoryBackend, clock: Clock, **key: object) -> Keyring:
    config = KeyConfig(**{"kek_ttl": 3600.0, "upstream_grace": 300.0, **key})  # type: ignore[arg-type]
    return Keyring(
        backend, {"payments": (config, "payments"), "other": (config, "other")}, now=clock
    )


async def test_ten_thousand_issuances_cost_one_kek_fetch(
    backend: MemoryBackend, clock: Clock
) -> None:
    keyring = make_keyring(backend, clock)
    keys = [await keyring.generate_data_key("payments") for _ in range(10_000)]
    assert backend.calls["generate_kek"] == 1
    assert len({k.plaintext for k in keys}) == 10_000
    assert (await keyring.open_blob("payments", keys[-1].blob)).plaintext == keys[-1].plaintext
    assert backend.calls["unwrap_kek"] == 0


async def test_concurrent_first_requests_share_one_fetch(clock: Clock) -> None:
    backend = MemoryBackend({"payments": "aes256", "other": "aes256"}, delay=0.01)
    keyring = make_keyring(backend, clock)
    await asyncio.gather(*(keyring.generate_data_key("payments") for _ in range(100)))
    assert backend.calls["generate_kek"] == 1


async def test_kek_rotates_by_age_and_old_blobs_still_open(
    backend: MemoryBackend, clock: Clock
) -> None:
    keyring = make_keyring(backend, clock)
    old = await keyring.generate_data_key("payments")
    clock.now += 3601
    new = await keyring.generate_data_key("payments")
    assert new.kek_id != old.kek_id
    assert backend.calls["generate_kek"] == 2
    assert (await keyring.open_blob("payments", old.blob)).plaintext == old.plaintext


async def test_kek_rotates_by_uses_with_one_prefetch(backend: MemoryBackend, clock: Clock) -> None:
    keyring = make_keyring(backend, clock, kek_max_uses=1000)
    first = []
    for _ in range(1000):
        first.append(await keyring.generate_data_key("payments"))
        await asyncio.sleep(0)  # let a background prefetch finish as soon as it starts
    assert backend.calls["generate_kek"] == 2, "one successor, fetched before the live KEK ran out"
    assert {k.kek_id for k in first} == {first[0].kek_id}
    after = await keyring.generate_data_key("payments")
    assert after.kek_id != first[0].kek_id
    assert backend.calls["generate_kek"] == 2, "the rotation itself waited for nothing"
    assert keyring.status().keys["payments"].kek_rotations == 1


async def test_no_prefetch_far_from_the_end_of_a_kek(backend: MemoryBackend, clock: Clock) -> None:
    keyring = make_keyring(backend, clock, kek_max_uses=1 << 20)
    for _ in range(5000):
        await keyring.generate_data_key("payments")
    clock.now += 3600 * 0.9  # 90% of the KEK's life: more than a minute left
    await keyring.generate_data_key("payments")
    await asyncio.sleep(0)
    assert backend.calls["generate_kek"] == 1
    clock.now += 3600 * 0.1 - 30  # within the last minute
    await keyring.generate_data_key("payments")
    await asyncio.sleep(0)
    assert backend.calls["generate_kek"] == 2


async def test_new_root_version_retires_live_kek(backend: MemoryBackend, clock: Clock) -> None:
    keyring = make_keyring(backend, clock)
    before = await keyring.generate_data_key("payments")
    await backend.rotate("payments")  # as an operator would, directly upstream
    await keyring.refresh("payments")
    after = await keyring.generate_data_key("payments")
    assert (before.root_version, after.root_version) == (1, 2)
    assert after.blob.startswith("sidecar:v2:")
    assert (await keyring.open_blob("payments", before.blob)).plaintext == before.plaintext


async def test_rotate_through_keyring(backend: MemoryBackend, clock: Clock) -> None:
    keyring = make_keyring(backend, clock)
    await keyring.generate_data_key("payments")
    info = await keyring.rotate("payments")
    assert info.latest_version == 2
    assert (await keyring.generate_data_key("payments")).root_version == 2


async def test_expiry_is_bound_with_leeway(backend: MemoryBackend, clock: Clock) -> None:
    keyring = make_keyring(backend, clock, expiry_leeway=5.0)
    key = await keyring.generate_data_key("payments", ttl=60)
    assert key.expires_at == int(clock.now) + 60
    clock.now += 64
    assert (await keyring.open_blob("payments", key.blob)).plaintext == key.plaintext
    clock.now += 2
    with pytest.raises(DecryptionFailed) as failure:
        await keyring.open_blob("payments", key.blob)
    assert failure.value.cause == "blob expired"


async def test_context_is_bound(backend: MemoryBackend, clock: Clock) -> None:
    keyring = make_keyring(backend, clock)
    key = await keyring.generate_data_key("payments", context={"tenant": "a"})
    with pytest.raises(DecryptionFailed):
        await keyring.open_blob("payments", key.blob, context={"tenant": "b"})
    with pytest.raises(DecryptionFailed):
        await keyring.open_blob("payments", key.blob)
    assert (
        await keyring.open_blob("payments", key.blob, context={"tenant": "a"})
    ).plaintext == key.plaintext


async def test_blob_of_another_key_fails(backend: MemoryBackend, clock: Clock) -> None:
    keyring = make_keyring(backend, clock)
    key = await keyring.generate_data_key("payments")
    with pytest.raises(DecryptionFailed):
        await keyring.open_blob("other", key.blob)


async def test_unknown_key_is_permission_denied(backend: MemoryBackend, clock: Clock) -> None:
    keyring = make_keyring(backend, clock)
    with pytest.raises(PermissionDenied):
        await keyring.generate_data_key("nope")
    with pytest.raises(InvalidRequest):
        await keyring.generate_data_key("payments", bits=100)


async def test_unwrap_is_single_flight_after_flush(clock: Clock) -> None:
    backend = MemoryBackend({"payments": "aes256", "other": "aes256"}, delay=0.01)
    keyring = make_keyring(backend, clock)
    key = await keyring.generate_data_key("payments")
    assert keyring.flush("payments") == 1  # the live KEK, cached once
    opened = await asyncio.gather(*(keyring.open_blob("payments", key.blob) for _ in range(50)))
    assert [o.plaintext for o in opened] == [key.plaintext] * 50
    assert backend.calls["unwrap_kek"] == 1


async def test_outage_within_grace_keeps_issuing(backend: MemoryBackend, clock: Clock) -> None:
    keyring = make_keyring(backend, clock)
    cached = await keyring.generate_data_key("payments")
    backend.available = False
    clock.now += 3600 + 200  # the KEK is past its TTL but inside upstream_grace (300 s)
    during = await keyring.generate_data_key("payments")
    assert during.kek_id == cached.kek_id
    assert keyring.key_state("payments") == "degraded"
    assert (await keyring.open_blob("payments", cached.blob)).plaintext == cached.plaintext
    clock.now += 200  # past grace
    with pytest.raises(UpstreamUnavailable):
        await keyring.generate_data_key("payments")
    assert keyring.key_state("payments") == "unavailable"


async def test_outage_uncached_blob_is_unavailable_not_decryption_failed(
    backend: MemoryBackend, clock: Clock
) -> None:
    keyring = make_keyring(backend, clock)
    key = await keyring.generate_data_key("payments")
    keyring.flush()
    backend.available = False
    with pytest.raises(UpstreamUnavailable):
        await keyring.open_blob("payments", key.blob)
    backend.available = True
    assert (await keyring.open_blob("payments", key.blob)).plaintext == key.plaintext


async def test_raised_min_decryption_version_refuses_old_blobs(
    backend: MemoryBackend, clock: Clock
) -> None:
    keyring = make_keyring(backend, clock)
    old = await keyring.generate_data_key("payments")
    await backend.rotate("payments")
    backend.set_min_decryption_version("payments", 2)
    await keyring.refresh("payments")
    assert keyring.status().keys["payments"].cached_keks == 0
    with pytest.raises(DecryptionFailed):
        await keyring.open_blob("payments", old.blob)
    assert (await keyring.generate_data_key("payments")).root_version == 2


async def test_rewrap_moves_to_newest_version_keeping_context_and_expiry(
    backend: MemoryBackend, clock: Clock
) -> None:
    keyring = make_keyring(backend, clock)
    key = await keyring.generate_data_key("payments", context={"t": "1"}, ttl=600)
    await keyring.rotate("payments")
    moved = await keyring.rewrap("payments", key.blob, context={"t": "1"})
    assert moved.root_version == 2 and moved.expires_at == key.expires_at
    assert (
        await keyring.open_blob("payments", moved.blob, context={"t": "1"})
    ).plaintext == key.plaintext


async def test_status_never_holds_key_bytes(backend: MemoryBackend, clock: Clock) -> None:
    keyring = make_keyring(backend, clock)
    key = await keyring.generate_data_key("payments")
    text = repr(keyring.status()) + repr(key)
    assert key.plaintext.hex() not in text
    assert key.plaintext not in text.encode()


async def test_grace_of_a_used_up_kek_starts_when_it_ran_out(
    backend: MemoryBackend, clock: Clock
) -> None:
    keyring = make_keyring(backend, clock, kek_max_uses=10)
    for _ in range(9):
        await keyring.generate_data_key("payments")
    backend.available = False  # the prefetch at the last use fails too
    await keyring.generate_data_key("payments")
    await keyring.generate_data_key("payments")  # used up: grace starts now, not at its TTL
    clock.now += 299
    await keyring.generate_data_key("payments")
    clock.now += 2
    with pytest.raises(UpstreamUnavailable):
        await keyring.generate_data_key("payments")


def test_importing_the_keyring_loads_no_metrics_or_tracing_sdk() -> None:
    import subprocess
    import sys

    probe = (
        "import sys, sidecar.keys.keyring; "
        "print(sorted(m for m in sys.modules "
        "if m.startswith(('prometheus_client', 'opentelemetry.sdk', 'sidecar.telemetry'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"


# -- how long a cached KEK opens blobs, revocation, refused KEKs, health (documented in
# docs/operations.md: "How long a KEK is trusted")


async def test_the_live_kek_opens_only_within_its_ttl_then_the_backend_vouches_again(
    backend: MemoryBackend, clock: Clock
) -> None:
    keyring = make_keyring(backend, clock, kek_ttl=5.0, upstream_grace=5.0)
    key = await keyring.generate_data_key("payments")
    clock.now += 4
    assert (await keyring.open_blob("payments", key.blob)).plaintext == key.plaintext
    assert backend.calls["unwrap_kek"] == 0
    clock.now += 16  # 20 s idle with kek_ttl 5 s: the live KEK is not trusted on its own
    assert (await keyring.open_blob("payments", key.blob)).plaintext == key.plaintext
    assert backend.calls["unwrap_kek"] == 1
    clock.now += 4  # the unwrap vouched for it again: cached for another kek_ttl
    await keyring.open_blob("payments", key.blob)
    assert backend.calls["unwrap_kek"] == 1


async def test_in_an_outage_a_cached_kek_opens_until_its_ttl_plus_grace(
    backend: MemoryBackend, clock: Clock
) -> None:
    keyring = make_keyring(backend, clock, kek_ttl=5.0, upstream_grace=5.0)
    key = await keyring.generate_data_key("payments")
    backend.available = False
    clock.now += 9.5  # past kek_ttl, inside upstream_grace
    assert (await keyring.open_blob("payments", key.blob)).plaintext == key.plaintext
    clock.now += 1  # past kek_ttl + upstream_grace
    with pytest.raises(UpstreamUnavailable):
        await keyring.open_blob("payments", key.blob)
    clock.now += 44  # 54 s into the outage: still refused, whatever the blob
    with pytest.raises(UpstreamUnavailable):
        await keyring.open_blob("payments", key.blob)
    backend.available = True  # the upstream is back: it vouches for the KEK again
    assert (await keyring.open_blob("payments", key.blob)).plaintext == key.plaintext


async def test_a_destroyed_root_key_drops_its_keks_at_the_next_poll(
    backend: MemoryBackend, clock: Clock
) -> None:
    keyring = make_keyring(backend, clock)
    key = await keyring.generate_data_key("payments")
    await backend.destroy("payments")  # as `kms-sidecar keys destroy` does upstream
    await keyring.refresh("payments")  # the poll
    assert keyring.key_state("payments") == "revoked"
    status = keyring.status().keys["payments"]
    assert status.state == "revoked" and status.cached_keks == 0 and status.live_kek is None
    assert status.problem is not None and "no such root key" in status.problem
    calls = sum(backend.calls.values())
    with pytest.raises(PermissionDenied):
        await keyring.open_blob("payments", key.blob)
    with pytest.raises(PermissionDenied):
        await keyring.generate_data_key("payments")
    assert sum(backend.calls.values()) == calls, "a revoked key is refused without asking"
    assert keyring.key_state("other") == "ok"

    await backend.create("payments", "aes256")  # a new key of the same name
    await keyring.refresh("payments")
    assert keyring.key_state("payments") == "ok"
    assert (await keyring.generate_data_key("payments")).root_version == 1
    with pytest.raises(DecryptionFailed):  # the old key's blobs are gone for good
        await keyring.open_blob("payments", key.blob)


async def test_a_root_key_the_backend_denies_on_use_is_revoked_at_once(
    backend: MemoryBackend, clock: Clock
) -> None:
    keyring = make_keyring(backend, clock, kek_ttl=5.0)
    key = await keyring.generate_data_key("payments")
    await backend.destroy("payments")
    clock.now += 6  # the cached KEK needs the backend's word, which is "no such key"
    with pytest.raises(PermissionDenied):
        await keyring.open_blob("payments", key.blob)
    assert keyring.key_state("payments") == "revoked"


def _forged(kek_id_seed: bytes, nonce: bytes) -> str:
    wrapped = b"mem:v1:forged-" + kek_id_seed
    header = envelope.Header("payments", 1, envelope.kek_id_for("payments", wrapped), wrapped, None)
    return envelope.KekCipher(bytes(32)).seal_encoded(
        header.encode(), 1, bytes(32), context=b"{}", associated_data=b"", nonce=nonce
    )


async def test_forged_blobs_sharing_a_refused_kek_cost_one_backend_call(
    backend: MemoryBackend, clock: Clock
) -> None:
    keyring = make_keyring(backend, clock)
    forged = [_forged(b"a", i.to_bytes(12, "big")) for i in range(200)]
    for blob in forged:
        with pytest.raises(DecryptionFailed):
            await keyring.open_blob("payments", blob)
    assert backend.calls["unwrap_kek"] == 1
    clock.now += REFUSED_SECONDS  # the refusal is remembered only briefly
    with pytest.raises(DecryptionFailed):
        await keyring.open_blob("payments", forged[0])
    assert backend.calls["unwrap_kek"] == 2
    key = await keyring.generate_data_key("payments")  # genuine blobs are not affected
    keyring.flush("payments")
    assert (await keyring.open_blob("payments", key.blob)).plaintext == key.plaintext


def test_refused_keks_are_bounded() -> None:
    refused = RefusedKeks(seconds=30.0, capacity=3)
    for i in range(10):
        refused.add(bytes([i]), 0.0)
    assert len(refused) == 3 and refused.holds(bytes([9]), 1.0)
    assert not refused.holds(bytes([0]), 1.0)


async def test_health_says_unavailable_when_nothing_can_issue(
    backend: MemoryBackend, clock: Clock
) -> None:
    keyring = make_keyring(backend, clock)
    backend.available = False
    await keyring.refresh("payments")  # the poll finds the upstream down; no KEK yet
    assert keyring.key_state("payments") == "unavailable"
    assert keyring.key_problem("payments") == "the key backend is unreachable and no KEK may issue"
    with pytest.raises(UpstreamUnavailable):
        await keyring.generate_data_key("payments")
    backend.available = True
    await keyring.refresh("payments")
    assert keyring.key_state("payments") == "ok"


async def test_an_upstream_rotation_is_not_a_degraded_key(
    backend: MemoryBackend, clock: Clock
) -> None:
    keyring = make_keyring(backend, clock)
    await keyring.generate_data_key("payments")
    await backend.rotate("payments")
    await keyring.refresh("payments")  # the live KEK is now under an old version
    assert keyring.key_state("payments") == "ok"
    assert keyring.key_problem("payments") is None
