"""Streaming rewrap for migrations: blobs in, blobs under the newest root version out."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import IO

from sidecar.errors import SidecarError
from sidecar.keys.keyring import Keyring

#: Lines rewrapped concurrently; order is kept.
WINDOW = 256


@dataclass
class RewrapReport:
    lines: int = 0
    rewrapped: int = 0
    unchanged: int = 0
    failed: int = 0


async def rewrap_stream(
    keyring: Keyring,
    key_name: str,
    lines: Iterable[str],
    out: IO[str],
    progress: IO[str] | None = None,
    *,
    progress_every: float = 2.0,
) -> RewrapReport:
    """Rewrap each line of ``lines`` into ``out``, one for one, in order.

    A line is a bare blob, or a JSON object with ``ciphertext`` and optional
    ``encryption_context`` (written back with only ``ciphertext`` replaced). Blank lines are
    copied. A line that cannot be rewrapped is copied unchanged — nothing is ever lost — and
    counted as failed, with its line number and error code on ``progress``.
    """
    report = RewrapReport()
    last = time.monotonic()
    batch: list[str] = []

    async def flush() -> None:
        results = await asyncio.gather(*(_rewrap_line(keyring, key_name, line) for line in batch))
        for number, (text, outcome) in enumerate(results, start=report.lines + 1):
            out.write(text + "\n")
            if outcome == "rewrapped":
                report.rewrapped += 1
            elif outcome == "unchanged":
                report.unchanged += 1
            else:
                report.failed += 1
                if progress:
                    progress.write(f"line {number}: not rewrapped ({outcome}); copied unchanged\n")
        report.lines += len(batch)
        batch.clear()

    for raw in lines:
        batch.append(raw.rstrip("\n"))
        if len(batch) >= WINDOW:
            await flush()
            if progress and time.monotonic() - last >= progress_every:
                last = time.monotonic()
                progress.write(
                    f"{report.lines} lines, {report.rewrapped} rewrapped, {report.failed} failed\n"
                )
                progress.flush()
    if batch:
        await flush()
    out.flush()
    if progress:
        progress.write(
            f"done: {report.lines} lines, {report.rewrapped} rewrapped, "
            f"{report.unchanged} unchanged, {report.failed} failed\n"
        )
    return report


async def _rewrap_line(keyring: Keyring, key_name: str, line: str) -> tuple[str, str]:
    if not line.strip():
        return line, "unchanged"
    try:
        if line.lstrip().startswith("{"):
            try:
                item = json.loads(line)
                blob, context = item["ciphertext"], item.get("encryption_context")
            except (ValueError, KeyError, TypeError):
                return line, "invalid_request"
            sealed = await keyring.rewrap(key_name, blob, context=context)
            return json.dumps({**item, "ciphertext": sealed.blob}), "rewrapped"
        sealed = await keyring.rewrap(key_name, line.strip())
        return sealed.blob, "rewrapped"
    except SidecarError as exc:
        return line, exc.code
