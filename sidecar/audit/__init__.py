"""The tamper-evident audit log: one hash-chained JSON line per decision (a request, or each
item of a batch).

* :func:`audit_record` builds a record from a fixed set of facts, HMAC-ing context values and
  subjects; :func:`hash_value` computes the same HMAC for a value an auditor already knows.
* :class:`AuditLog` (``log``) writes records, group-committed and fsync'd off the event loop,
  through the file in ``sink`` (locked, rotated by size); ``recovery`` continues the chain after a
  crash and sets aside a torn record.
* :func:`verify` checks the chain through a set of files (and against the running sidecar's
  ``head``); :func:`verify_command` and :func:`hash_command` are the CLI's ``audit verify`` and
  ``audit hash``.

The formats are described in ``docs/audit.md``.
"""

from sidecar.audit.chain import (
    GENESIS,
    Break,
    BreakKind,
    VerifyResult,
    canonical_json,
    record_hash,
    verify,
    verify_command,
)
from sidecar.audit.log import AuditLog, AuditStats
from sidecar.audit.record import (
    OUTCOMES,
    AuditRecord,
    audit_record,
    hash_command,
    hash_value,
    hmac_key_id,
    load_hmac_key,
)

__all__ = [
    "GENESIS",
    "OUTCOMES",
    "AuditLog",
    "AuditRecord",
    "AuditStats",
    "Break",
    "BreakKind",
    "VerifyResult",
    "audit_record",
    "canonical_json",
    "hash_command",
    "hash_value",
    "hmac_key_id",
    "load_hmac_key",
    "record_hash",
    "verify",
    "verify_command",
]
