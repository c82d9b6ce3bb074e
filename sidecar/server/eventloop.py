"""Which event loop the daemon runs on: uvloop when installed, unless ``KMS_SIDECAR_LOOP`` says.

``KMS_SIDECAR_LOOP`` is ``auto`` (the default: uvloop if it can be imported, else asyncio's own
loop), ``uvloop`` (uvloop or a start-up error) or ``asyncio`` (asyncio's loop even when uvloop is
installed). The suite runs the shipped process on both, so neither is the untested one.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

from sidecar.errors import ConfigError

LOOP_ENV = "KMS_SIDECAR_LOOP"
LOOP_CHOICES = ("auto", "uvloop", "asyncio")

Runner = Callable[[Coroutine[Any, Any, None]], None]


def loop_runner(environ: Mapping[str, str] = os.environ) -> Runner:
    """The function that runs the daemon's main coroutine on the chosen loop.

    Raises ``ConfigError`` for an unknown choice, or for ``uvloop`` when it is not installed.
    """
    choice = environ.get(LOOP_ENV, "").strip().lower() or "auto"
    if choice not in LOOP_CHOICES:
        raise ConfigError(f"{LOOP_ENV}: expected one of {', '.join(LOOP_CHOICES)}, got {choice!r}")
    if choice == "asyncio":
        return asyncio.run
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise ConfigError(
                f"{LOOP_ENV}: uvloop is not installed (pip install 'kms-sidecar[fast]')"
            ) from None
        return asyncio.run
    run: Runner = uvloop.run
    return run


def loop_name(loop: asyncio.AbstractEventLoop) -> str:
    """``uvloop`` or ``asyncio``: the package whose loop this is, for the start log."""
    return type(loop).__module__.split(".")[0]
