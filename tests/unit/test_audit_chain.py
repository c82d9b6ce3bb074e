"""Audit records and the hash chain: known answers, what the builder refuses to log, and every
way of tampering with a log that `audit verify` must name.

Known answers were computed outside Python: HMACs with ``openssl dgst -sha256 -hmac``, the record
hash with ``sha256sum`` over the canonical text spelled out below.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sidecar.audit import (
    GENESIS,
    AuditRecord,
    audit_record,
    canonical_json,
    hash_command,
    hash_value,
    load_hmac_key,
    record_hash,
    verify,
    verify_command,
)
from sidecar.audit.chain import parse_record, seal
from sidecar.errors import ConfigError
from sidecar.identity import Identity, JwtClaims, PeerCredentials, TlsPeer

KEY = b"k" * 32
JWT_IDENTITY = Identity(
    peer=PeerCredentials(uid=1000, gid=1000, pid=4242, exe="/usr/bin/payments-api"),
    jwt=JwtClaims(issuer="https://issuer.example", subject="system:serviceaccount:prod:payments"),
)

# openssl dgst -sha256 -hmac kkkk...k (32 x "k")
ACME_HMAC = "hmac-sha256:5ee61ed202092a628ac7bdbc6ccaef6be44439c0673c6a9e7bf3147b0eba78ec"
SUBJECT_HMAC = "hmac-sha256:0ae8f56d80335b4c8054d14fccf73e1ee61071399c5461d9ecb4a97e22b31173"

KNOWN_CANONICAL = (
    '{"cause":null,"context":{"tenant":"' + ACME_HMAC + '"},"error_code":null,'
    '"event":"request","identity":{"exe":"/usr/bin/payments-api","gid":1000,'
    '"jwt_iss":"https://issuer.example","jwt_sub":"' + SUBJECT_HMAC + '","kind":"jwt",'
    '"pid":4242,"spiffe_id":null,"tls_subject":null,"uid":1000},'
    '"kek_id":"00112233445566778899aabbccddeeff","key":"payments","operation":"datakey",'
    '"outcome":"ok","prev":"' + GENESIS + '","request_id":"req-1","root_version":3,'
    '"rule":"payments-api","seq":1,"time":"2023-11-14T22:13:20.250000Z",'
    '"trace_id":"4bf92f3577b34da6a3ce929d0e0e4736","v":1}'
)
# printf %s "$KNOWN_CANONICAL" | sha256sum
KNOWN_HASH = "fb1a5d247709c7f892b1284a0946725d1544892ebc46cba0bde01b1c83d8f659"


def record(n: int = 1, **overrides: Any) -> AuditRecord:
    fields: dict[str, Any] = {
        "time": 1_700_000_000.25,
        "request_id": f"req-{n}",
        "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736",
        "identity": JWT_IDENTITY,
        "rule": "payments-api",
        "operation": "datakey",
        "key": "payments",
        "root_version": 3,
        "kek_id": "00112233445566778899aabbccddeeff",
        "outcome": "ok",
        "error_code": None,
        "context": {"tenant": "acme"},
        "hmac_key": KEY,
    }
    fields.update(overrides)
    return audit_record(**fields)


# -- known answers -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [  # RFC 4231 test cases 1 and 2, then the audit key of these tests
        (b"\x0b" * 20, "Hi There", "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7"),
        (b"Jefe", "what do ya want for nothing?",
         "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"),
        (KEY, "acme", ACME_HMAC.removeprefix("hmac-sha256:")),
    ],
)  # fmt: skip
def test_hash_value_known_answers(key: bytes, value: str, expected: str) -> None:
    assert hash_value(key, value) == "hmac-sha256:" + expected


def test_hash_value_is_stable_across_calls_and_keys() -> None:
    assert hash_value(KEY, "acme") == hash_value(KEY, "acme") == ACME_HMAC
    assert hash_value(b"o" * 32, "acme") != ACME_HMAC
    assert hash_value(KEY, "acme") == ACME_HMAC  # a second key did not disturb the first


def test_record_hash_known_answer() -> None:
    line, digest = seal(record().fields, seq=1, prev=GENESIS, canonical=record().canonical)
    assert digest == KNOWN_HASH
    assert line == KNOWN_CANONICAL[:-1].encode() + b',"hash":"' + KNOWN_HASH.encode() + b'"}\n'
    parsed = json.loads(line)
    assert canonical_json({k: v for k, v in parsed.items() if k != "hash"}) == (
        KNOWN_CANONICAL.encode()
    )
    assert record_hash(parsed) == KNOWN_HASH


def test_canonical_json_is_sorted_compact_utf8() -> None:
    assert canonical_json({"b": 1, "a": {"d": None, "c": 'é\n"'}}) == (
        '{"a":{"c":"é\\n\\"","d":null},"b":1}'.encode()
    )
    with pytest.raises(ValueError, match="float"):
        canonical_json({"a": 1.5})


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"identity": None, "context": None, "rule": None, "key": None, "trace_id": None},
        {"identity": Identity(tls=TlsPeer(spiffe_id="spiffe://example.org/ns/prod/sa/x",
                                          subject="CN=x,O=Example"))},
        {"identity": Identity(peer=PeerCredentials(0, 0, 1, "/opt/\udcff\udcfeapp"))},
        {"context": {"z": "1", "a\udcff": "2", "\u2028": "3", "é": "\x00", "": ""}},
        {"context": {f"k{i:03d}": "v" for i in range(80)}},
        {"context": {"x" * 200: "long key", "ok": "v"}},
        {"outcome": "error", "error_code": "decryption_failed", "cause": 'blob "expired"\n'},
        {"outcome": "denied", "error_code": "permission_denied", "request_id": "r\u2028\t\x7f"},
        {"outcome": "allowed", "operation": "rotate", "root_version": 0},
    ],
)  # fmt: skip
def test_fast_rendering_equals_the_canonical_encoder(overrides: dict[str, Any]) -> None:
    """The builder renders canonical JSON by hand for speed; verify uses the generic encoder."""
    built = record(**overrides)
    fast, fast_hash = seal(built.fields, seq=12, prev="ab" * 32, canonical=built.canonical)
    slow, slow_hash = seal(built.fields, seq=12, prev="ab" * 32)
    assert fast == slow
    assert fast_hash == slow_hash
    assert parse_record(fast).hash_ok


# -- what the builder writes, and refuses --------------------------------------------------


def test_record_hashes_subjects_and_context_values_but_keeps_context_keys() -> None:
    identity = Identity(
        jwt=JwtClaims(issuer="https://issuer.example", subject="alice@example.com"),
        tls=TlsPeer(spiffe_id="spiffe://example.org/ns/prod/sa/api", subject="CN=Alice Smith"),
    )
    built = record(identity=identity, context={"tenant": "acme", "patient_id": "P-123"})
    line, _ = seal(built.fields, seq=1, prev=GENESIS, canonical=built.canonical)
    text = line.decode()
    for secret in ("alice@example.com", "Alice Smith", "acme", "P-123"):
        assert secret not in text
    fields = json.loads(line)
    assert fields["context"] == {
        "patient_id": hash_value(KEY, "P-123"),
        "tenant": hash_value(KEY, "acme"),
    }
    assert fields["identity"]["jwt_sub"] == hash_value(KEY, "alice@example.com")
    assert fields["identity"]["tls_subject"] == hash_value(KEY, "CN=Alice Smith")
    assert fields["identity"]["jwt_iss"] == "https://issuer.example"
    assert fields["identity"]["spiffe_id"] == "spiffe://example.org/ns/prod/sa/api"
    assert fields["identity"]["kind"] == "jwt"


def test_builder_has_no_field_for_secrets() -> None:
    with pytest.raises(TypeError):
        record(plaintext="c2VjcmV0")
    with pytest.raises(TypeError):
        record(ciphertext="sidecar:v1:AAAA")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"outcome": "maybe"}, "outcome must be one of"),
        ({"outcome": "denied"}, "needs error_code"),
        ({"outcome": "ok", "error_code": "internal"}, "takes no error_code"),
        ({"cause": "x"}, "takes no cause"),
        ({"hmac_key": b""}, "hmac_key"),
        ({"root_version": -1}, "root_version"),
    ],
)
def test_builder_refuses_misuse(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        record(**overrides)


def test_undecodable_executable_path_is_kept_visible() -> None:
    built = record(identity=Identity(peer=PeerCredentials(1, 1, 1, "/opt/\udcffapp")))
    assert built.fields["identity"]["exe"] == "/opt/\\xffapp"  # type: ignore[index]


def test_oversized_context_is_bounded_and_counted() -> None:
    built = record(context={f"k{i:03d}": "v" for i in range(80)} | {"y" * 129: "v"})
    context = built.fields["context"]
    assert isinstance(context, dict)
    assert len(context) == 64
    assert built.fields["context_omitted"] == 17


def test_time_is_rfc3339_utc_with_microseconds() -> None:
    assert record(time=0.0).fields["time"] == "1970-01-01T00:00:00.000000Z"
    assert record(time=1_700_000_000.9999996).fields["time"] == "2023-11-14T22:13:21.000000Z"


def test_load_hmac_key() -> None:
    assert load_hmac_key("K", {}) is None
    assert load_hmac_key("K", {"K": "x" * 32}) == b"x" * 32
    with pytest.raises(ConfigError, match=r"audit\.hmac_key_env: \$K holds 0 bytes"):
        load_hmac_key("K", {"K": ""})
    with pytest.raises(ConfigError, match="at least 32"):
        load_hmac_key("K", {"K": "short"})


def test_hash_command_prints_hashes_for_grep() -> None:
    out, err = io.StringIO(), io.StringIO()
    assert hash_command(["acme"], key_env="K", environ={"K": "k" * 32}, out=out, err=err) == 0
    assert out.getvalue() == ACME_HMAC + "\n"
    assert "hmac key id" in err.getvalue()
    assert hash_command(["acme"], key_env="K", environ={}, out=out, err=err) == 2
    assert "$K is not set" in err.getvalue()


# -- the chain and its verifier ------------------------------------------------------------


def chain_lines(count: int, *, first_seq: int = 1, prev: str = GENESIS) -> list[bytes]:
    lines = []
    for seq in range(first_seq, first_seq + count):
        built = record(seq)
        line, prev = seal(built.fields, seq=seq, prev=prev, canonical=built.canonical)
        lines.append(line)
    return lines


def write(path: Path, lines: list[bytes]) -> str:
    path.write_bytes(b"".join(lines))
    return str(path)


def head_of(lines: list[bytes]) -> str:
    return str(json.loads(lines[-1])["hash"])


def rewrite(line: bytes, rehash: bool = False, **changes: Any) -> bytes:
    fields = json.loads(line)
    fields.update(changes)
    if rehash:
        fields["hash"] = record_hash(fields)
    return json.dumps(fields, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"


def test_intact_chain_verifies(tmp_path: Path) -> None:
    lines = chain_lines(20)
    result = verify([write(tmp_path / "audit.log", lines)], head=head_of(lines))
    assert result.ok
    assert (result.records, result.first_seq, result.last_seq) == (20, 1, 20)
    assert result.head_seq == 20
    assert result.last_hash == head_of(lines)


def test_edited_record_is_named(tmp_path: Path) -> None:
    lines = chain_lines(10)
    lines[4] = rewrite(lines[4], outcome="denied")
    result = verify([write(tmp_path / "audit.log", lines)])
    assert result.problem is not None
    assert (result.problem.kind, result.problem.line, result.problem.seq) == ("edited", 5, 5)
    assert result.records == 4


def test_edited_and_rehashed_record_is_named(tmp_path: Path) -> None:
    lines = chain_lines(10)
    lines[4] = rewrite(lines[4], rehash=True, key="other")
    problem = verify([write(tmp_path / "audit.log", lines)]).problem
    assert problem is not None
    assert (problem.kind, problem.line, problem.seq) == ("edited", 5, 5)
    assert "re-hashed" in problem.message


def test_deleted_record_is_named(tmp_path: Path) -> None:
    lines = chain_lines(10)
    del lines[6]
    problem = verify([write(tmp_path / "audit.log", lines)]).problem
    assert problem is not None
    assert (problem.kind, problem.line, problem.seq) == ("deleted", 7, 8)
    assert "seq 7" in problem.message


def test_several_deleted_records_are_named(tmp_path: Path) -> None:
    lines = chain_lines(10)
    del lines[2:5]
    problem = verify([write(tmp_path / "audit.log", lines)]).problem
    assert problem is not None
    assert (problem.kind, problem.line, problem.seq) == ("deleted", 3, 6)
    assert "seq 3 to 5" in problem.message


def test_swapped_records_are_named(tmp_path: Path) -> None:
    lines = chain_lines(10)
    lines[3], lines[4] = lines[4], lines[3]
    problem = verify([write(tmp_path / "audit.log", lines)]).problem
    assert problem is not None
    assert (problem.kind, problem.line, problem.seq) == ("reordered", 4, 5)


def test_inserted_forged_record_is_named(tmp_path: Path) -> None:
    lines = chain_lines(10)
    prev = str(json.loads(lines[3])["hash"])
    forged = record(99, outcome="ok", key="forged")
    forged_line, _ = seal(forged.fields, seq=5, prev=prev, canonical=forged.canonical)
    lines.insert(4, forged_line)  # a well-formed record claiming the place of seq 5
    problem = verify([write(tmp_path / "audit.log", lines)]).problem
    assert problem is not None
    assert (problem.kind, problem.line, problem.seq) == ("inserted", 5, 5)


def test_inserted_record_without_a_valid_hash_is_named(tmp_path: Path) -> None:
    lines = chain_lines(10)
    lines.insert(4, rewrite(lines[3], request_id="forged"))
    problem = verify([write(tmp_path / "audit.log", lines)]).problem
    assert problem is not None
    assert (problem.kind, problem.line) == ("inserted", 5)


def test_duplicated_record_is_named(tmp_path: Path) -> None:
    lines = chain_lines(10)
    lines.insert(5, lines[4])
    problem = verify([write(tmp_path / "audit.log", lines)]).problem
    assert problem is not None
    assert (problem.kind, problem.line, problem.seq) == ("inserted", 6, 5)


def test_replayed_old_record_is_named(tmp_path: Path) -> None:
    lines = chain_lines(10)
    lines.insert(8, lines[2])
    problem = verify([write(tmp_path / "audit.log", lines)]).problem
    assert problem is not None
    assert (problem.kind, problem.line, problem.seq) == ("inserted", 9, 3)


def test_bad_json_is_named(tmp_path: Path) -> None:
    lines = chain_lines(5)
    lines[2] = b'{"seq": 3, oops\n'
    problem = verify([write(tmp_path / "audit.log", lines)]).problem
    assert problem is not None
    assert (problem.kind, problem.line, problem.seq) == ("bad_json", 3, None)


def test_torn_last_line_is_named(tmp_path: Path) -> None:
    lines = chain_lines(5)
    lines.append(b'{"cause":null,"context":')
    problem = verify([write(tmp_path / "audit.log", lines)]).problem
    assert problem is not None
    assert (problem.kind, problem.line) == ("torn", 6)


def test_truncated_tail_is_caught_only_with_the_head(tmp_path: Path) -> None:
    lines = chain_lines(10)
    path = write(tmp_path / "audit.log", lines[:7])
    assert verify([path]).ok  # without an anchor a clean cut is invisible
    problem = verify([path], head=head_of(lines)).problem
    assert problem is not None
    assert (problem.kind, problem.line, problem.seq) == ("truncated", 7, 7)


def test_records_after_the_head_are_fine(tmp_path: Path) -> None:
    lines = chain_lines(10)
    result = verify([write(tmp_path / "audit.log", lines)], head=head_of(lines[:6]))
    assert result.ok
    assert result.head_seq == 6
    assert any("4 records follow the head" in note for note in result.notes)


def test_first_record_must_follow_genesis(tmp_path: Path) -> None:
    lines = chain_lines(3, prev="11" * 32)
    problem = verify([write(tmp_path / "audit.log", lines)]).problem
    assert problem is not None
    assert (problem.kind, problem.seq) == ("edited", 1)


def test_chain_continues_across_rotated_files_given_in_any_order(tmp_path: Path) -> None:
    lines = chain_lines(30)
    files = [
        write(tmp_path / "audit.log.20250101T000000Z", lines[:10]),
        write(tmp_path / "audit.log.20250101T000000Z-2", lines[10:20]),
        write(tmp_path / "audit.log", lines[20:]),
    ]
    result = verify(sorted(files), head=head_of(lines))  # the live file sorts first
    assert result.ok, result.problem
    assert result.records == 30
    assert result.files == tuple(files)


def test_missing_rotated_file_is_a_deletion(tmp_path: Path) -> None:
    lines = chain_lines(30)
    first = write(tmp_path / "audit.log.1", lines[:10])
    live = write(tmp_path / "audit.log", lines[20:])
    problem = verify([first, live]).problem
    assert problem is not None
    assert (problem.kind, problem.file, problem.line, problem.seq) == ("deleted", live, 1, 21)


def test_a_chain_starting_after_seq_1_is_noted(tmp_path: Path) -> None:
    lines = chain_lines(30)
    result = verify([write(tmp_path / "audit.log", lines[20:])])
    assert result.ok
    assert any("starts at seq 21" in note for note in result.notes)


def test_torn_files_are_skipped(tmp_path: Path) -> None:
    live = write(tmp_path / "audit.log", chain_lines(3))
    torn = tmp_path / "audit.log.torn-20250101T000000Z"
    torn.write_bytes(b'{"cause":nu')
    result = verify([live, str(torn)])
    assert result.ok
    assert any("skipped" in note for note in result.notes)


Run = Callable[..., tuple[int, str]]


@pytest.fixture
def run_verify() -> Run:
    def run(paths: list[str], head: str | None = None) -> tuple[int, str]:
        out = io.StringIO()
        return verify_command(paths, head, out=out), out.getvalue()

    return run


def test_verify_command_exit_codes_and_output(tmp_path: Path, run_verify: Run) -> None:
    lines = chain_lines(5)
    path = write(tmp_path / "audit.log", lines)
    code, text = run_verify([path], head_of(lines).upper())
    assert code == 0
    assert text.startswith("OK: 5 records (seq 1 to 5) in 1 file(s)")
    assert "head found at seq 5" in text

    (tmp_path / "audit.log").write_bytes(b"".join(lines[:2] + lines[3:]))
    code, text = run_verify([path])
    assert code == 1
    assert text.startswith(f"BROKEN: {path} line 3 (seq 4): deleted")

    assert run_verify([str(tmp_path / "missing.log")])[0] == 2
    code, text = run_verify([path], "not-a-hash")
    assert code == 2
    assert "--head" in text
