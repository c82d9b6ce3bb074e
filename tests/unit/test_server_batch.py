"""Every decision is its own record: batch items authorized, audited and answered one by one,
with Vault's status codes for a batch."""

from __future__ import annotations

import io
import os
from pathlib import Path

from sidecar.audit import hash_command, hash_value, verify_command
from tests.unit.server_app import HMAC_KEY, sidecar

DATAKEY = "/v1/transit/datakey/plaintext/payments"
DECRYPT = "/v1/transit/decrypt/payments"

TENANT_A = """
[[allow]]
name = "tenant-a"
when.unix_uid = [4242]
keys = ["payments"]
operations = ["datakey", "decrypt"]
context.tenant = "a"

[[deny]]
name = "no-mallory"
when.jwt_sub = "mallory"
keys = ["*"]
operations = ["*"]

[[allow]]
name = "once-an-hour"
when.unix_uid = [4242]
keys = ["payments"]
operations = ["rewrap"]
rate = "1/h"
"""


def _ctx(tenant: str) -> dict[str, object]:
    return {"encryption_context": {"tenant": tenant}}


async def test_a_mixed_batch_leaves_one_record_per_item_with_its_own_rule_and_outcome(
    tmp_path: Path,
) -> None:
    async with sidecar(tmp_path, policy=TENANT_A) as s:
        status, body = await s.call("POST", DATAKEY, {"batch_input": [_ctx("a"), _ctx("b")]})
        records = s.records()
    assert status == 400, "as Vault: a failed item makes the batch a 400"
    allowed, refused = body["data"]["batch_results"]
    assert "plaintext" in allowed and "ciphertext" in allowed
    assert refused["code"] == "permission_denied" and "plaintext" not in refused
    assert len(records) == 2
    assert {r["request_id"] for r in records} == {body["request_id"]}
    first, second = records
    assert (first["batch_index"], first["batch_size"], second["batch_index"]) == (0, 2, 1)
    assert (first["outcome"], first["rule"], first["error_code"]) == ("ok", "tenant-a", None)
    assert first["context"] == {"tenant": hash_value(HMAC_KEY, "a")}
    assert first["kek_id"] is not None and first["root_version"] == 1
    assert (second["outcome"], second["rule"], second["error_code"]) == (
        "denied",
        None,
        "permission_denied",
    )
    assert second["context"] == {"tenant": hash_value(HMAC_KEY, "b")}
    assert second["kek_id"] is None, "nothing was sealed for the refused item"


async def test_a_single_request_has_no_batch_fields(tmp_path: Path) -> None:
    async with sidecar(tmp_path, policy=TENANT_A) as s:
        assert (await s.call("POST", DATAKEY, _ctx("a")))[0] == 200
        (record,) = s.records()
    assert "batch_index" not in record and "batch_size" not in record


async def test_a_deny_rule_and_a_rate_limit_name_their_rule(tmp_path: Path) -> None:
    async with sidecar(tmp_path, policy=TENANT_A) as s:
        status, _ = await s.call("POST", DATAKEY, _ctx("a"), {"Authorization": "Bearer mallory"})
        assert status == 403
        made = (await s.call("POST", DATAKEY, _ctx("a")))[1]["data"]
        item = {"ciphertext": made["ciphertext"], **_ctx("a")}
        rewrap = "/v1/transit/rewrap/payments"
        statuses = [(await s.call("POST", rewrap, {"batch_input": [item, item]}))[0]]
        records = s.records()
    assert (records[0]["outcome"], records[0]["rule"]) == ("denied", "no-mallory")
    assert statuses == [400]
    ok, limited = records[-2:]
    assert (ok["outcome"], ok["rule"]) == ("ok", "once-an-hour")
    assert (limited["outcome"], limited["error_code"], limited["rule"]) == (
        "denied",
        "rate_limited",
        "once-an-hour",
    )


async def test_batch_status_follows_vault(tmp_path: Path) -> None:
    async with sidecar(tmp_path, policy=TENANT_A) as s:
        mixed = [_ctx("a"), _ctx("b")]
        code = {"partial_failure_response_code": 207}
        assert (await s.call("POST", DATAKEY, {"batch_input": mixed, **code}))[0] == 207
        assert (await s.call("POST", DATAKEY, {"batch_input": [_ctx("a")], **code}))[0] == 200
        status, body = await s.call("POST", DATAKEY, {"batch_input": [_ctx("b")] * 2, **code})
        assert status == 400, "all failed stays an error, whatever the override"
        assert [r["code"] for r in body["data"]["batch_results"]] == ["permission_denied"] * 2
        s.backend.available = False
        s.services.keyring.flush(None)
        status, body = await s.call("POST", DATAKEY, {"batch_input": [_ctx("a")]})
        assert status == 503, "only server-side failures: the failure's own status"
        assert body["data"]["batch_results"][0]["code"] == "upstream_unavailable"


async def test_a_bad_partial_failure_code_is_refused_before_any_item_runs(
    tmp_path: Path,
) -> None:
    async with sidecar(tmp_path, policy=TENANT_A) as s:
        for bad in ("abc", 99, 600, True, 2.5):
            body = {"batch_input": [_ctx("a")], "partial_failure_response_code": bad}
            status, answer = await s.call("POST", DATAKEY, body)
            assert (status, answer["code"]) == (400, "invalid_request"), bad
            assert "partial_failure_response_code" in answer["errors"][0]
        records = s.records()
    assert [r["outcome"] for r in records] == ["error"] * 5
    assert all("batch_index" not in r for r in records), "no item was decided"
    assert s.backend.calls["generate_kek"] == 0


async def test_reference_is_echoed_on_every_item(tmp_path: Path) -> None:
    async with sidecar(tmp_path, policy=TENANT_A) as s:
        items = [{**_ctx("a"), "reference": "one"}, {**_ctx("b"), "reference": "two"}, {}]
        _, body = await s.call("POST", DATAKEY, {"batch_input": items})
        made = body["data"]["batch_results"]
        opened = [
            {"ciphertext": made[0]["ciphertext"], **_ctx("a"), "reference": "r0"},
            {"ciphertext": "sidecar:v1:AAAA", **_ctx("a"), "reference": "r1"},
        ]
        _, reopened = await s.call("POST", DECRYPT, {"batch_input": opened})
    assert [r["reference"] for r in made] == ["one", "two", ""], "as OpenBao: always there"
    assert [r["reference"] for r in reopened["data"]["batch_results"]] == ["r0", "r1"]


async def test_batch_records_verify_and_hash_with_the_audit_commands(tmp_path: Path) -> None:
    async with sidecar(tmp_path, policy=TENANT_A) as s:
        await s.call("POST", DATAKEY, {"batch_input": [_ctx("a"), _ctx("b"), _ctx("a")]})
        records = s.records()
    assert [r["batch_index"] for r in records] == [0, 1, 2]
    assert verify_command([str(s.audit_path)], None) == 0
    out, err = io.StringIO(), io.StringIO()
    environ = {"KMS_AUDIT_HMAC_KEY": HMAC_KEY.decode()}
    assert hash_command(["b"], environ=environ, out=out, err=err) == 0
    hashed = out.getvalue().strip()
    assert [r["batch_index"] for r in records if r["context"]["tenant"] == hashed] == [1]
    lines = s.audit_path.read_bytes().splitlines(keepends=True)
    edited = [line.replace(b'"batch_index":1', b'"batch_index":2') for line in lines]
    tampered = tmp_path / "tampered.log"
    tampered.write_bytes(b"".join(edited))
    os.chmod(tampered, 0o600)
    assert verify_command([str(tampered)], None) != 0, "an edited batch index breaks the chain"
