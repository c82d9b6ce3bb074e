"""A fresh SoftHSM2 token for each test module, and backends on it that are always closed."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable, Iterator

import pytest

from sidecar.backends.pkcs11 import Pkcs11Backend
from sidecar.config import Pkcs11Config
from tests.integration.softhsm import SOFTHSM_MODULE, SoftHsm, softhsm_missing

TOKEN = "kms"
PIN_ENV = "KMS_SIDECAR_TEST_HSM_PIN"


@pytest.fixture(scope="module")
def softhsm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SoftHsm]:
    """A private SoftHSM2 (config file + token dir) with token ``kms``, selected by env var.

    ``SOFTHSM2_CONF`` is only read when the module is initialised; the backends below are
    closed after every test, which finalizes the module, so the next module's token is seen.
    """
    missing = softhsm_missing()
    if missing:
        pytest.skip(missing)
    hsm = SoftHsm.create(tmp_path_factory.mktemp("softhsm"), labels=(TOKEN,))
    with pytest.MonkeyPatch.context() as patch:
        for name, value in hsm.env().items():
            patch.setenv(name, value)
        yield hsm


@pytest.fixture
def hsm_config(softhsm: SoftHsm, monkeypatch: pytest.MonkeyPatch) -> Pkcs11Config:
    monkeypatch.setenv(PIN_ENV, softhsm.pin)
    return Pkcs11Config(module=SOFTHSM_MODULE, token_label=TOKEN, pin_env=PIN_ENV)


@pytest.fixture
async def open_backend(hsm_config: Pkcs11Config) -> AsyncIterator[Callable[..., Pkcs11Backend]]:
    """Make backends with ``open_backend(config=None)``; every one is closed afterwards."""
    opened: list[Pkcs11Backend] = []

    def make(config: Pkcs11Config | None = None) -> Pkcs11Backend:
        backend = Pkcs11Backend(config or hsm_config)
        opened.append(backend)
        return backend

    yield make
    for backend in reversed(opened):
        await backend.close()


@pytest.fixture
def backend(open_backend: Callable[..., Pkcs11Backend]) -> Pkcs11Backend:
    return open_backend()


@pytest.fixture
def key_name() -> str:
    """A key name no other test on the module's token uses."""
    return f"k-{uuid.uuid4().hex[:12]}"
