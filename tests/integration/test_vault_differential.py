"""One table of requests, sent to a real OpenBao transit engine and to the sidecar on it.

For each case the two answers must agree on the status code, the envelope's fields, and the
names and JSON types of every field in ``data`` (recursively; values differ — keys are random).
Where they are meant to differ, the case names the difference by its id in the table
"Intended differences" of ``docs/api.md``; the test reads that table, so every difference is
listed there once, with its reason, and the ids the test knows are exactly the ids listed.
"""

from __future__ import annotations

import base64
import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests

from sidecar.devserver import DevOpenBao
from tests.conftest import TOKEN_ENV, ProcessSidecar, shipped_sidecar
from tests.integration.conftest import shipped_policy

API_DOC = Path(__file__).parents[2] / "docs" / "api.md"
H = base64.b64encode(b"hello").decode()


def documented_differences() -> dict[str, str]:
    """id → reason, from the table under "### Intended differences" in docs/api.md."""
    text = API_DOC.read_text(encoding="utf-8")
    section = text.split("### Intended differences", 1)[1].split("\n#", 1)[0]
    rows = re.findall(r"^\| `([a-z0-9-]+)` \| (.+?) \|", section, re.MULTILINE)
    return dict(rows)


@dataclass
class Answer:
    status: int
    body: Any


Shape = Any


def shape(value: Any) -> Shape:
    """The JSON types of ``value``: objects field by field, lists by their items' shapes."""
    if isinstance(value, dict):
        return {name: shape(item) for name, item in value.items()}
    if isinstance(value, list):
        return ["list", sorted({json.dumps(shape(item), sort_keys=True) for item in value})]
    return type(value).__name__


# -- the intended differences: how each one changes what is compared --------------------------

Adjust = Callable[[Answer, Answer], None]


def _drop(body: Any, path: tuple[str, ...], names: tuple[str, ...]) -> None:
    """Remove ``names`` from the object at ``path`` (and from every batch result there)."""
    node = body
    for part in path:
        if not isinstance(node, dict) or part not in node:
            return
        node = node[part]
    targets = node.get("batch_results", [node]) if isinstance(node, dict) else []
    for target in [node, *targets]:
        if isinstance(target, dict):
            for name in names:
                target.pop(name, None)


def _error_fields(vault: Answer, sidecar: Answer) -> None:
    if isinstance(sidecar.body, dict) and "errors" in sidecar.body:
        assert isinstance(sidecar.body.pop("code"), str)
        assert isinstance(sidecar.body.pop("request_id"), str)
        # Vault's messages are its own words; ours are one sentence naming the field
        assert all(m.endswith(".") for m in sidecar.body["errors"]), sidecar.body
        vault.body["errors"] = sidecar.body["errors"] = ["…"]


def _unknown_key(vault: Answer, sidecar: Answer) -> None:
    assert vault.status in (400, 404) and sidecar.status == 403, (vault.status, sidecar.status)
    assert sidecar.body["code"] == "permission_denied"
    sidecar.status = vault.status


def _blobs(vault: Answer, sidecar: Answer) -> None:
    def prefixes(body: Any) -> set[str]:
        found = re.findall(r'"ciphertext": "([a-z]+):v\d+:', json.dumps(body))
        return set(found)

    assert prefixes(vault.body) <= {"vault"} and prefixes(sidecar.body) <= {"sidecar"}


def _expires_at(vault: Answer, sidecar: Answer) -> None:
    _drop(sidecar.body, ("data",), ("expires_at",))


def _batch_item_code(vault: Answer, sidecar: Answer) -> None:
    for result in sidecar.body["data"]["batch_results"]:
        if "error" in result:
            assert isinstance(result.pop("code"), str)


def _key_metadata(vault: Answer, sidecar: Answer) -> None:
    _drop(sidecar.body, ("data",), ("backend", "root_key", "kek"))


def _seal_status(vault: Answer, sidecar: Answer) -> None:
    assert sidecar.body["type"] == "kms-sidecar" and sidecar.body["cluster_name"] == "kms-sidecar"


def _lookup_self(vault: Answer, sidecar: Answer) -> None:
    data = sidecar.body["data"]
    assert data["id"] == "" and isinstance(data.pop("sidecar"), dict)
    vault.body["data"]["meta"] = data["meta"] = {}  # root's is null; ours the caller's facts


def _wrong_method_message(vault: Answer, sidecar: Answer) -> None:
    pass  # covered by error-fields: only the words differ


ADJUSTMENTS: dict[str, Adjust] = {
    "error-fields": _error_fields,
    "unknown-key-403": _unknown_key,
    "sidecar-blobs": _blobs,
    "expires-at": _expires_at,
    "batch-item-code": _batch_item_code,
    "key-metadata": _key_metadata,
    "seal-status": _seal_status,
    "lookup-self": _lookup_self,
}
#: Differences every case may show.
ALWAYS = ("error-fields",)


@dataclass(frozen=True)
class Case:
    method: str
    path: str
    body: Any = None
    differences: tuple[str, ...] = ()
    #: Fields whose values must be equal, not just of one type (``data`` only).
    same_values: tuple[str, ...] = field(default=())

    @property
    def id(self) -> str:
        return f"{self.method} {self.path} {json.dumps(self.body)[:40] if self.body else ''}"


BLOB = ("sidecar-blobs", "expires-at")
CASES = [
    Case("POST", "/v1/transit/datakey/plaintext/payments", {}, BLOB),
    Case("PUT", "/v1/transit/datakey/wrapped/payments", None, BLOB),
    Case("POST", "/v1/transit/datakey/plaintext/payments", {"bits": 512}, BLOB),
    Case("POST", "/v1/transit/datakey/plaintext/payments", {"bits": 100}),
    Case("POST", "/v1/transit/datakey/plaintext/nosuch", {}, ("unknown-key-403",)),
    Case("POST", "/v1/transit/encrypt/payments", {"plaintext": H}, BLOB),
    Case("POST", "/v1/transit/encrypt/payments", {"plaintext": "%%"}),
    Case("POST", "/v1/transit/encrypt/payments", {"plaintext": H, "key_version": 99}),
    Case(
        "POST",
        "/v1/transit/encrypt/payments",
        {
            "batch_input": [
                {"plaintext": H, "reference": "a"},
                {"plaintext": "%%", "reference": "b"},
            ]
        },
        (*BLOB, "batch-item-code"),
    ),
    Case("POST", "/v1/transit/decrypt/payments", {}),
    Case("GET", "/v1/transit/keys/payments", None, ("key-metadata",), ("keys", "latest_version")),
    Case("GET", "/v1/transit/keys/signer", None, ("key-metadata",), ("keys",)),
    Case("GET", "/v1/transit/keys/nosuch", None, ("unknown-key-403",)),
    Case("GET", "/v1/transit/keys?list=true"),
    Case("GET", "/v1/transit/keys"),
    Case("POST", "/v1/transit/hmac/payments", {"input": H}, (), ("hmac",)),
    Case("POST", "/v1/transit/hmac/payments/sha2-512", {"input": H}, (), ("hmac",)),
    Case("POST", "/v1/transit/hmac/payments/md5", {"input": H}),
    Case(
        "POST",
        "/v1/transit/hmac/payments",
        {"batch_input": [{"input": H, "reference": "a"}]},
        (),
        ("batch_results",),
    ),
    Case(
        "POST", "/v1/transit/verify/payments", {"input": H, "hmac": "vault:v1:AAAA"}, (), ("valid",)
    ),
    Case("POST", "/v1/transit/sign/signer", {"input": H}, (), ("signature",)),
    Case("POST", "/v1/transit/random", {}),
    Case("POST", "/v1/transit/random/16", {"format": "hex"}),
    Case("POST", "/v1/transit/random/0", {}),
    Case("POST", "/v1/sys/tools/random/platform/8", {}),
    Case("POST", "/v1/transit/hash", {"input": H}, (), ("sum",)),
    Case("POST", "/v1/transit/hash/sha2-512", {"input": H, "format": "base64"}, (), ("sum",)),
    Case("POST", "/v1/transit/hash/md5", {"input": H}),
    Case("POST", "/v1/sys/tools/hash", {"input": H}, (), ("sum",)),
    Case("GET", "/v1/sys/seal-status", None, ("seal-status",)),
    Case("GET", "/v1/sys/leader"),
    Case("GET", "/v1/auth/token/lookup-self", None, ("lookup-self",)),
    Case("POST", "/v1/nothing/here", {}),
    Case("GET", "/v1/transit/datakey/plaintext/payments"),
]


@pytest.fixture(scope="module")
def both(openbao: DevOpenBao, module_tmp: Path) -> Iterator[tuple[DevOpenBao, ProcessSidecar]]:
    """The shared OpenBao (with an ed25519 key ``signer``) and the shipped sidecar on it."""
    client = openbao.client()
    client.secrets.transit.create_key("signer", key_type="ed25519")
    (module_tmp / "policies").mkdir()
    (module_tmp / "policies" / "test.toml").write_text(shipped_policy(os.getuid()))
    sock = module_tmp / "d.sock"
    config = module_tmp / "sidecar.toml"
    config.write_text(
        f'[server]\nsocket = "{sock}"\n'
        f'[backend.vault]\naddresses = ["{openbao.address}"]\ntoken_env = "{TOKEN_ENV}"\n'
        "[keys.payments]\n[keys.signer]\n"
    )
    with shipped_sidecar(config, sock) as sidecar:
        yield openbao, sidecar


def ask_vault(bao: DevOpenBao, case: Case) -> Answer:
    response = requests.request(
        case.method,
        bao.address + case.path,
        data=None if case.body is None else json.dumps(case.body),
        headers={"X-Vault-Token": bao.root_token},
        timeout=30,
    )
    return Answer(response.status_code, response.json() if response.content else None)


def ask_sidecar(sidecar: ProcessSidecar, case: Case) -> Answer:
    raw = b"" if case.body is None else json.dumps(case.body).encode()
    answer = sidecar.request(case.method, case.path, raw=raw)
    return Answer(answer.status, json.loads(answer.raw) if answer.raw else None)


def _comparable_keys(keys: dict[str, Any]) -> dict[str, Any]:
    """Vault gives asymmetric creation times in nanoseconds; the sidecar in seconds."""
    return {v: e["public_key"] if isinstance(e, dict) else e for v, e in keys.items()}


def test_the_documented_differences_are_the_ones_the_suite_knows() -> None:
    documented = documented_differences()
    assert set(documented) == set(ADJUSTMENTS), "docs/api.md and this suite must list the same"
    assert all(len(reason) > 20 for reason in documented.values()), "each says why"
    used = {d for case in CASES for d in case.differences} | set(ALWAYS)
    assert used == set(ADJUSTMENTS), "every documented difference is exercised"


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_the_sidecar_answers_as_openbao_does(
    both: tuple[DevOpenBao, ProcessSidecar], case: Case
) -> None:
    bao, sidecar = both
    vault, ours = ask_vault(bao, case), ask_sidecar(sidecar, case)
    values = {
        name: (vault.body["data"][name], ours.body["data"][name]) for name in case.same_values
    }
    for difference in (*case.differences, *ALWAYS):
        ADJUSTMENTS[difference](vault, ours)
    assert ours.status == vault.status, (vault.body, ours.body)
    assert shape(ours.body) == shape(vault.body), (vault.body, ours.body)
    for name, (theirs, mine) in values.items():
        if name == "batch_results":
            theirs, mine = [r.get("hmac") for r in theirs], [r.get("hmac") for r in mine]
        if name == "keys":  # the versions, their public keys, and symmetric creation times
            theirs, mine = _comparable_keys(theirs), _comparable_keys(mine)
        assert mine == theirs, name
