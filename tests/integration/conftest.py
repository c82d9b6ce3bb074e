"""The integration tests' fixtures: a real OpenBao dev server (see tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sidecar.devserver import DevOpenBao
from tests.conftest import TOKEN_ENV, RunningSidecar, openbao, sidecar_config, vault_sections

__all__ = ["TOKEN_ENV", "openbao", "vault_sections"]


@pytest.fixture
def sidecar(openbao: DevOpenBao, run_sidecar: Any, short_tmp: Path) -> RunningSidecar:
    """One sidecar on the shared OpenBao with keys ``payments`` and ``default``."""
    sidecar: RunningSidecar = run_sidecar(
        sidecar_config(short_tmp / "s.sock", **vault_sections(openbao))
    )
    return sidecar
