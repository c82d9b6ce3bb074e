"""KMS_SIDECAR_LOOP chooses the daemon's event loop; a bad choice stops start-up."""

from __future__ import annotations

import asyncio

import pytest

from sidecar.errors import ConfigError
from sidecar.server.eventloop import loop_name, loop_runner

pytest.importorskip("uvloop")  # installed by the dev extra; "auto" then means uvloop


async def _running_loop_name(into: list[str]) -> None:
    into.append(loop_name(asyncio.get_running_loop()))


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("", "uvloop"),
        ("auto", "uvloop"),
        ("uvloop", "uvloop"),
        ("asyncio", "asyncio"),
        ("ASYNCIO", "asyncio"),
    ],
)
def test_the_choice_decides_the_loop(value: str, expected: str) -> None:
    seen: list[str] = []
    loop_runner({"KMS_SIDECAR_LOOP": value})(_running_loop_name(seen))
    assert seen == [expected]


def test_an_unknown_choice_names_the_variable() -> None:
    with pytest.raises(
        ConfigError, match="KMS_SIDECAR_LOOP: expected one of auto, uvloop, asyncio"
    ):
        loop_runner({"KMS_SIDECAR_LOOP": "trio"})


def test_uvloop_demanded_but_missing_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop now raises ImportError
    with pytest.raises(ConfigError, match="uvloop is not installed"):
        loop_runner({"KMS_SIDECAR_LOOP": "uvloop"})
    assert loop_runner({}) is asyncio.run
