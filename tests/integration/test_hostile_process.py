"""Hostile input against the process as shipped, over a real OpenBao: a smaller fuzz run, and the
refusals that depend on the real upstream (sign beyond the latest version, a signing key asked
for data keys).

The in-process suite (``tests/security/test_fuzz_api.py``) runs the same properties fast over
the memory backend; this one checks they hold for ``kms-sidecar run`` on uvloop, with OpenBao
answering, and that nothing it logs is an ERROR or a traceback.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.devserver import DevOpenBao
from tests.conftest import TOKEN_ENV, ProcessSidecar, request, shipped_sidecar
from tests.integration.conftest import shipped_policy
from tests.security.test_fuzz_api import MESSAGE_LIMIT, TOKEN, api_request, item

SIGNER = "hostile-signer"
#: The root key behind the API's ``payments`` here: the fuzz run may rotate it, and the shared
#: OpenBao's own ``payments`` must stay at version 1 for other modules.
FUZZ_ROOT = "hostile-fuzz"


@pytest.fixture(scope="module")
def shipped(openbao: DevOpenBao, module_tmp: Path) -> Iterator[ProcessSidecar]:
    openbao.create_key(SIGNER, "ecdsa-p256")
    openbao.create_key(FUZZ_ROOT)
    (module_tmp / "policies").mkdir()
    (module_tmp / "policies" / "test.toml").write_text(shipped_policy(os.getuid()))
    sock = module_tmp / "h.sock"
    config = module_tmp / "sidecar.toml"
    config.write_text(
        f'[server]\nsocket = "{sock}"\nsocket_mode = "0600"\n'
        f'[backend.vault]\naddresses = ["{openbao.address}"]\ntoken_env = "{TOKEN_ENV}"\n'
        f'[keys.payments]\nroot_key = "{FUZZ_ROOT}"\n[keys.{SIGNER}]\n'
    )
    with shipped_sidecar(config, sock, loop="uvloop") as sidecar:
        yield sidecar
    log = sidecar.log()
    assert "Traceback" not in log and " ERROR " not in log, log[-3000:]


@pytest.fixture(scope="module")
def blobs(shipped: ProcessSidecar) -> list[str]:
    made = []
    for body in ({}, {"encryption_context": {"tenant": "acme"}}, {"ttl": "1h"}):
        answer = shipped.request("POST", "/v1/transit/datakey/wrapped/payments", body)
        made.append(answer.data["ciphertext"])
    return made


def test_sign_beyond_the_latest_version_is_a_400_and_health_stays_ready(
    shipped: ProcessSidecar,
) -> None:
    for _ in range(3):  # transit answers this with a 500, which once read as an outage
        answer = shipped.request(
            "POST", f"/v1/transit/sign/{SIGNER}", {"input": "aGk=", "key_version": 7}
        )
        assert (answer.status, answer.code) == (400, "invalid_request"), answer
        assert "Field 'key_version' names version 7" in answer.json["errors"][0]
    health = shipped.request("GET", "/v1/sys/health")
    assert health.status == 200 and health.json["keys"][SIGNER] == "ok", health
    signed = shipped.request("POST", f"/v1/transit/sign/{SIGNER}", {"input": "aGk="})
    assert signed.status == 200, signed


@pytest.mark.parametrize("operation", ["datakey/plaintext", "datakey/wrapped", "encrypt"])
def test_a_signing_key_is_refused_data_keys_without_asking_upstream(
    shipped: ProcessSidecar, operation: str
) -> None:
    answer = shipped.request("POST", f"/v1/transit/{operation}/{SIGNER}", {"plaintext": "aGk="})
    assert (answer.status, answer.code) == (400, "invalid_request"), answer
    assert "is an ecdsa-p256 key" in answer.json["errors"][0]  # the local refusal's wording


@settings(max_examples=40)
@given(st.data())
def test_any_request_to_the_process_is_a_2xx_or_4xx(
    shipped: ProcessSidecar, blobs: list[str], data: st.DataObject
) -> None:
    method, path, body, headers = data.draw(api_request(blobs))
    answer = request(shipped.socket, method, path, raw=body, headers=headers)
    if answer.status >= 500 and b'"batch_results"' in answer.raw:
        return  # a status the caller chose with partial_failure_response_code
    assert 200 <= answer.status < 500, (method, path, answer)
    if answer.status >= 400 and answer.json and "errors" in answer.json:
        assert len(answer.json["errors"][0]) <= MESSAGE_LIMIT
        assert TOKEN not in answer.text


@settings(max_examples=20)
@given(st.data())
def test_a_batch_of_anything_is_answered_item_by_item(
    shipped: ProcessSidecar, blobs: list[str], data: st.DataObject
) -> None:
    batch = [{"bits": 128}, *data.draw(st.lists(item(blobs), max_size=4))]
    body = json.dumps({"batch_input": batch}, allow_nan=True).encode()
    answer = request(shipped.socket, "POST", "/v1/transit/datakey/wrapped/payments", raw=body)
    assert answer.status < 500, answer
    if answer.json and "data" in answer.json:
        results = answer.json["data"]["batch_results"]
        assert len(results) == len(batch) and "ciphertext" in results[0]
