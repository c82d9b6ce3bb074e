"""Single-use key pools against a real sidecar on a real OpenBao: both the thread and the task.

Each pool talks to the sidecar over its own connection; these tests check what a user of a pool
relies on: every key distinct and openable with its context, none older than ``max_age``, refill
errors raised by ``take()`` without spinning, nothing left behind by ``close()``, never more than
``size`` keys held, and no key bytes in any repr, log record or exception.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from sidecar.client import (
    AsyncClient,
    AsyncKeyPool,
    Client,
    DataKey,
    DecryptionFailed,
    KeyPool,
    PermissionDenied,
)
from sidecar.devserver import DevOpenBao
from tests.conftest import RunningSidecar, sidecar_config, vault_sections

pytestmark = pytest.mark.integration

CONTEXT = {"tenant": "acme"}


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def client(sidecar: RunningSidecar) -> Iterator[Client]:
    with Client(sidecar.socket) as client:
        yield client


@pytest.fixture
async def aclient(sidecar: RunningSidecar) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(sidecar.socket) as client:
        yield client


def wait_until(condition: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


async def await_until(condition: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.005)


def pool_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("kms-sidecar key pool")]


def pool_tasks() -> list[asyncio.Task[Any]]:
    return [t for t in asyncio.all_tasks() if t.get_name().startswith("kms-sidecar key pool")]


def assert_accounted(pool: KeyPool | AsyncKeyPool) -> None:
    stats = pool.stats()
    assert stats.issued == stats.taken + stats.expired + stats.discarded + stats.held, stats


# -- every key distinct, each opens with its own context -----------------------------------------


def test_sync_pool_keys_are_distinct_and_open_with_their_context(client: Client) -> None:
    with client.key_pool("payments", context=CONTEXT, size=40, batch=16) as pool:
        keys = [pool.take() for _ in range(130)]  # several refills
        assert_accounted(pool)
        assert pool.stats().refills >= 4
    assert len({k.plaintext for k in keys}) == len(keys)
    assert len({k.ciphertext for k in keys}) == len(keys)
    assert all(k.plaintext is not None and len(k.plaintext) == 32 for k in keys)
    opened = client.decrypt_batch("payments", [k.ciphertext for k in keys], context=CONTEXT)
    assert opened == [k.plaintext for k in keys]
    with pytest.raises(DecryptionFailed):
        client.decrypt("payments", keys[0].ciphertext, context={"tenant": "other"})
    with pytest.raises(DecryptionFailed):
        client.decrypt("payments", keys[0].ciphertext)


async def test_async_pool_keys_are_distinct_and_open_with_their_context(
    aclient: AsyncClient,
) -> None:
    async with aclient.key_pool("payments", context=CONTEXT, size=40, batch=16) as pool:
        keys = [await pool.take() for _ in range(130)]
        assert_accounted(pool)
    assert len({k.plaintext for k in keys}) == len(keys)
    opened = await aclient.decrypt_batch("payments", [k.ciphertext for k in keys], context=CONTEXT)
    assert opened == [k.plaintext for k in keys]
    with pytest.raises(DecryptionFailed):
        await aclient.decrypt("payments", keys[-1].ciphertext, context={"tenant": "other"})


async def test_concurrent_takers_never_share_a_key(aclient: AsyncClient) -> None:
    async with aclient.key_pool("payments", size=30, batch=10) as pool:

        async def taker() -> list[DataKey]:
            return [await pool.take() for _ in range(25)]

        batches = await asyncio.gather(*(taker() for _ in range(8)))
    plaintexts = [k.plaintext for batch in batches for k in batch]
    assert len(set(plaintexts)) == len(plaintexts) == 200


def test_threads_taking_from_one_pool_never_share_a_key(client: Client) -> None:
    taken: list[DataKey] = []
    lock = threading.Lock()
    with client.key_pool("payments", size=30, batch=10) as pool:

        def taker() -> None:
            mine = [pool.take() for _ in range(25)]
            with lock:
                taken.extend(mine)

        threads = [threading.Thread(target=taker) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len({k.plaintext for k in taken}) == len(taken) == 150


def test_key_pools_keep_one_pool_per_context_and_close_the_least_recently_used(
    client: Client,
) -> None:
    with client.key_pools("payments", size=8, max_contexts=2) as pools:
        a = pools.take({"tenant": "a"})
        b = pools.take({"tenant": "b"})
        first_a = pools.pool({"tenant": "a"})
        pools.take({"tenant": "c"})  # evicts b, the least recently used
        assert len(pools) == 2
        assert pools.pool({"tenant": "a"}) is first_a
        wait_until(lambda: len(pool_threads()) == 2)
    assert pool_threads() == []
    assert client.decrypt("payments", a.ciphertext, context={"tenant": "a"}) == a.plaintext
    assert client.decrypt("payments", b.ciphertext, context={"tenant": "b"}) == b.plaintext


async def test_async_key_pools_are_bounded(aclient: AsyncClient) -> None:
    async with aclient.key_pools("payments", size=4, max_contexts=2) as pools:
        for tenant in "abcde":
            key = await pools.take({"tenant": tenant})
            opened = await aclient.decrypt("payments", key.ciphertext, context={"tenant": tenant})
            assert opened == key.plaintext
        assert len(pools) == 2
        assert len(pool_tasks()) == 2
    assert pool_tasks() == []


def test_every_pooled_key_has_its_own_audit_record_as_a_batch_item(
    openbao: DevOpenBao, run_sidecar: Any, short_tmp: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KMS_AUDIT_HMAC_KEY", "ab" * 32)
    audit_path = short_tmp / "audit" / "audit.log"
    sidecar = run_sidecar(
        sidecar_config(
            short_tmp / "a.sock",
            audit={"path": str(audit_path), "fail_closed": True},
            **vault_sections(openbao),
        )
    )
    with Client(sidecar.socket) as client, client.key_pool("payments", size=20, batch=8) as pool:
        for _ in range(25):
            pool.take()
        wait_until(lambda: pool.stats().held == 20)
    stats = pool.stats()
    records = [json.loads(line) for line in audit_path.read_text().splitlines()]
    issued = [r for r in records if r.get("operation") == "datakey" and r.get("outcome") == "ok"]
    assert len(issued) == stats.issued  # one record per key, not per refill
    assert all(r["batch_size"] >= 1 and 0 <= r["batch_index"] < r["batch_size"] for r in issued)
    assert len({(r["request_id"], r["batch_index"]) for r in issued}) == stats.issued
    assert len({r["request_id"] for r in issued}) == stats.refills
    assert {r["identity"]["uid"] for r in issued} == {os.getuid()}


# -- never older than max_age --------------------------------------------------------------------


def test_sync_pool_never_hands_out_a_key_older_than_max_age(client: Client) -> None:
    clock = FakeClock()
    with client.key_pool("payments", size=10, max_age=2.0, now=clock) as pool:
        wait_until(lambda: pool.stats().held == 10)
        first = pool.take()
        clock.now += 2.0  # every held key is now max_age old
        second = pool.take()
        stats = pool.stats()
        assert stats.expired == 9
        assert stats.refills >= 2  # the second key came from a later refill
        assert second.ciphertext != first.ciphertext
        assert_accounted(pool)
    assert client.decrypt("payments", second.ciphertext) == second.plaintext


async def test_async_pool_never_hands_out_a_key_older_than_max_age(aclient: AsyncClient) -> None:
    clock = FakeClock()
    async with aclient.key_pool("payments", size=10, max_age=2.0, now=clock) as pool:
        await await_until(lambda: pool.stats().held == 10)
        await pool.take()
        clock.now += 1.999  # not yet
        await pool.take()
        assert pool.stats().expired == 0
        clock.now += 0.001
        await pool.take()
        assert pool.stats().expired >= 8
        assert_accounted(pool)


def test_idle_pool_drops_expired_keys_without_a_take_and_asks_for_no_more(client: Client) -> None:
    with client.key_pool("payments", size=6, max_age=0.2) as pool:
        wait_until(lambda: pool.stats().held == 6)
        wait_until(lambda: pool.stats().held == 0)  # the refiller wipes them when due
        refills = pool.stats().refills
        time.sleep(0.5)  # nobody takes: no refill may be made meanwhile
        assert pool.stats().refills == refills
        assert pool.stats().expired == 6
        key = pool.take()  # the next take asks again, and waits for it
        assert client.decrypt("payments", key.ciphertext) == key.plaintext


# -- refill errors reach take() ------------------------------------------------------------------


def test_refused_sync_pool_raises_and_does_not_spin(client: Client) -> None:
    with client.key_pool("not-configured", size=10) as pool:
        with pytest.raises(PermissionDenied) as caught:
            pool.take()
        assert caught.value.request_id
        time.sleep(0.3)
        assert pool.stats().refill_errors == 1  # nothing in the background since
        with pytest.raises(PermissionDenied):
            pool.take()  # each take asks once more, and raises again
        assert pool.stats().refill_errors == 2
        assert pool.stats().issued == 0


async def test_refused_async_pool_raises_to_every_waiting_taker(aclient: AsyncClient) -> None:
    async with aclient.key_pool("not-configured", size=10) as pool:
        results = await asyncio.gather(*(pool.take() for _ in range(3)), return_exceptions=True)
        assert all(isinstance(r, PermissionDenied) for r in results), results
        await asyncio.sleep(0.3)
        assert pool.stats().refill_errors == 1


def test_pool_on_a_vanished_sidecar_raises_unreachable(short_tmp: Any) -> None:
    from sidecar.client import SidecarUnreachable

    with (
        Client(str(short_tmp / "absent.sock"), timeout=1.0) as client,
        client.key_pool("payments") as pool,
        pytest.raises(SidecarUnreachable),
    ):
        pool.take()


# -- close: nothing lost, nothing left behind ----------------------------------------------------


def test_sync_pool_closed_mid_refill_wipes_the_batch_and_stops_its_thread(client: Client) -> None:
    pool = client.key_pool("payments", size=1000)
    wait_until(lambda: pool._core.in_flight > 0)  # the first fill is on the wire
    pool.close()
    stats = pool.stats()
    assert stats.issued == stats.discarded == 1000  # the batch landed and was wiped at once
    assert stats.held == 0 and stats.taken == 0
    assert pool_threads() == []
    with pytest.raises(RuntimeError, match="closed"):
        pool.take()


async def test_async_pool_closed_mid_refill_wipes_the_batch_and_stops_its_task(
    aclient: AsyncClient,
) -> None:
    pool = aclient.key_pool("payments", size=1000)
    await await_until(lambda: pool._core.in_flight > 0)
    await pool.aclose()
    stats = pool.stats()
    assert stats.issued == stats.discarded == 1000
    assert stats.held == 0
    assert pool_tasks() == []
    with pytest.raises(RuntimeError, match="closed"):
        await pool.take()


def test_close_overwrites_the_keys_held(client: Client) -> None:
    pool = client.key_pool("payments", size=5)
    wait_until(lambda: pool.stats().held == 5)
    held = [entry[1] for entry in pool._core.held]
    pool.close()
    assert all(plaintext == bytearray(32) for plaintext in held)
    assert_accounted(pool)


def test_a_taker_blocked_on_an_empty_pool_is_released_by_close(client: Client) -> None:
    pool = client.key_pool("not-configured", size=5)
    with pytest.raises(PermissionDenied):
        pool.take()
    raised: list[BaseException] = []

    def blocked() -> None:
        try:
            pool.take()
        except BaseException as exc:
            raised.append(exc)

    thread = threading.Thread(target=blocked)
    thread.start()
    pool.close()
    thread.join(5)
    assert not thread.is_alive()
    assert raised and isinstance(raised[0], (RuntimeError, PermissionDenied))


# -- bounded -------------------------------------------------------------------------------------


def test_pool_never_holds_more_than_size(client: Client) -> None:
    with client.key_pool("payments", size=7, batch=3) as pool:
        most = 0
        for _ in range(60):
            pool.take()
            most = max(most, pool.stats().held + pool._core.in_flight)
        wait_until(lambda: pool.stats().held == 7)
        time.sleep(0.1)
        assert pool.stats().held == 7
        assert most <= 7


def test_bad_pool_arguments_are_refused_before_any_request(client: Client) -> None:
    for kwargs in ({"size": 0}, {"max_age": 0}, {"batch": 0}, {"batch": 1001}):
        with pytest.raises(ValueError):
            client.key_pool("payments", **kwargs)  # type: ignore[arg-type]
    with pytest.raises(Exception, match="not a valid key name"):
        client.key_pool("a/b")
    assert pool_threads() == []


# -- no key bytes anywhere -----------------------------------------------------------------------


def test_no_key_bytes_in_any_repr_log_or_exception(
    client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    shown: list[str] = []
    with client.key_pool("payments", context=CONTEXT, size=20) as pool:
        keys = [pool.take() for _ in range(30)]
        shown += [repr(pool), str(pool), repr(pool.stats()), *map(repr, keys), *map(str, keys)]
    with client.key_pool("not-configured", size=5) as refused:
        with pytest.raises(PermissionDenied) as caught:
            refused.take()
        shown += [repr(refused), str(caught.value), repr(caught.value)]
    shown += [record.getMessage() for record in caplog.records]
    text = "\n".join(shown)
    for key in keys:
        assert key.plaintext is not None
        for form in (
            key.plaintext.hex(),
            base64.b64encode(key.plaintext).decode(),
            repr(key.plaintext)[2:-1],
        ):
            assert form not in text
    assert "acme" not in text  # context values are not shown either


# -- envelope helpers on pools -------------------------------------------------------------------


def test_records_sealed_from_a_pool_each_under_its_own_key_open_in_one_batch(
    client: Client,
) -> None:
    from sidecar.client import envelope

    records = [os.urandom(n) for n in (0, 1, 1024, 70_000, *([1024] * 40))]
    with client.key_pool("payments", context=CONTEXT, size=16) as pool:
        sealed = envelope.encrypt_records_sync(pool, records)
        taken = pool.stats().taken
    assert taken == len(records)
    blobs = [json.loads(s[23 : 23 + int.from_bytes(s[19:23], "big")])["blob"] for s in sealed]
    assert len(set(blobs)) == len(records)  # one data key per record
    assert all(records[i] not in sealed[i] for i in range(2, len(records)))
    assert envelope.decrypt_records_sync(client, sealed, key="payments") == records
    assert envelope.decrypt_bytes_sync(client, sealed[2]) == records[2]  # the same format

    tampered = [*sealed[:5], sealed[5][:-1] + bytes([sealed[5][-1] ^ 1]), *sealed[6:]]
    with pytest.raises(DecryptionFailed):
        envelope.decrypt_records_sync(client, tampered)
    with pytest.raises(DecryptionFailed):
        envelope.decrypt_records_sync(client, sealed, key="default")


async def test_async_records_round_trip_across_keys_and_batches(aclient: AsyncClient) -> None:
    from sidecar.client import envelope

    async with (
        aclient.key_pool("payments", context=CONTEXT, size=32) as payments,
        aclient.key_pool("default", size=32) as default,
    ):
        first = await envelope.encrypt_records(payments, [b"p%d" % i for i in range(30)])
        second = await envelope.encrypt_records(default, [b"d%d" % i for i in range(30)])
    mixed = [blob for pair in zip(first, second, strict=True) for blob in pair]
    opened = await envelope.decrypt_records(aclient, mixed, batch=7)
    assert opened == [p for i in range(30) for p in (b"p%d" % i, b"d%d" % i)]
