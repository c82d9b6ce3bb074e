"""A steady request load on a sidecar from background threads, recording every answer.

Each worker asks for data keys and, every few requests, opens a blob made a few seconds
earlier, so both paths that can need the upstream run all the time (a new KEK once the live one
is used up or old, an unwrap once a cached KEK has aged out). Answers are tallied per phase.
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field

from tests.conftest import RunningSidecar

DATAKEY = "/v1/transit/datakey/plaintext/{key}"
DECRYPT = "/v1/transit/decrypt/{key}"


@dataclass
class Tally:
    """What one phase of the load saw."""

    ok: int = 0
    #: ``(operation, status, code)`` of every failed request.
    failed: list[tuple[str, int, str | None]] = field(default_factory=list)
    #: Monotonic time of the last success.
    last_ok_at: float = 0.0


class Load:
    """``workers`` threads sending requests to ``sidecar`` until :meth:`stop`."""

    def __init__(
        self, sidecar: RunningSidecar, key: str, *, workers: int = 2, reopen_after: float = 2.5
    ) -> None:
        self._sidecar = sidecar
        self._datakey = DATAKEY.format(key=key)
        self._decrypt = DECRYPT.format(key=key)
        self._reopen_after = reopen_after
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.tally = Tally()
        #: (made at, blob, plaintext) of recent data keys, oldest first.
        self.made: collections.deque[tuple[float, str, str]] = collections.deque(maxlen=2000)
        self._threads = [
            threading.Thread(target=self._work, name=f"load-{i}", daemon=True)
            for i in range(workers)
        ]

    def start(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def phase(self) -> Tally:
        """The tally so far; counting starts afresh."""
        with self._lock:
            tally, self.tally = self.tally, Tally(last_ok_at=self.tally.last_ok_at)
        return tally

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)

    def _record(self, operation: str, status: int, code: str | None) -> None:
        with self._lock:
            if status == 200:
                self.tally.ok += 1
                self.tally.last_ok_at = time.monotonic()
            else:
                self.tally.failed.append((operation, status, code))

    def _old_blob(self) -> tuple[str, str] | None:
        cutoff = time.monotonic() - self._reopen_after
        with self._lock:
            for made_at, blob, plaintext in self.made:
                if made_at <= cutoff:
                    return blob, plaintext
                break
        return None

    def _work(self) -> None:
        count = 0
        while not self._stop.is_set():
            count += 1
            made = self._sidecar.request("POST", self._datakey, {})
            self._record("datakey", made.status, made.code)
            if made.status == 200:
                with self._lock:
                    self.made.append(
                        (time.monotonic(), made.data["ciphertext"], made.data["plaintext"])
                    )
            old = self._old_blob() if count % 5 == 0 else None
            if old is not None:
                opened = self._sidecar.request("POST", self._decrypt, {"ciphertext": old[0]})
                good = opened.status == 200 and opened.data["plaintext"] == old[1]
                # (a 200 with the wrong plaintext is recorded as status 0)
                status = 200 if good else (0 if opened.status == 200 else opened.status)
                self._record("decrypt", status, opened.code)
                if good:
                    with self._lock:
                        if self.made and self.made[0][1] == old[0]:
                            self.made.popleft()
            time.sleep(0.002)  # pacing: leave the two cores to the sidecar and OpenBao
