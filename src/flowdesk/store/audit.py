"""The audit record format: what is hashed, and how, so that the chain can be verified.

Each record is ``{seq, at, actor, action, subject, data_hash, prev_hash, hash}``:

* ``data_hash`` = SHA-256 of the canonical JSON of the record's data;
* ``hash`` = SHA-256 of ``0x00`` + the canonical JSON of every other field (``prev_hash``
  included), so each record commits to the whole chain before it.

The leading byte separates domains, as RFC 6962 prefixes leaves (0x00) and nodes (0x01):
a record hash can never be passed off as a checkpoint statement (prefix 0x01, see
`checkpoint_message`) or the other way round.

Canonical JSON: keys sorted, no whitespace, UTF-8, no NaN. The appending happens inside
the store's transaction (`sql.SqlTx.seal_audit`), so a change and its audit record commit
together or not at all.
"""

from __future__ import annotations

import contextvars
import hashlib
import json
from dataclasses import dataclass
from typing import Any

GENESIS = "0" * 64
RECORD_PREFIX = b"\x00"
CHECKPOINT_PREFIX = b"\x01"

ACTOR: contextvars.ContextVar[str] = contextvars.ContextVar("flowdesk_actor", default="system")
"""Who is acting: the user id, set by the API for each request (``alice``), or
``system``/``system:<job>``; read when an operation is built, written into its audit
records, and stored as a run's initiator (the four-eyes rule compares it with the user
completing a task)."""


_canonical = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
).encode


def canonical(value: Any) -> bytes:
    return _canonical(value).encode("utf-8")


def digest(text: str | None) -> str | None:
    """SHA-256 of a stored payload, for audit data that must not hold the payload."""
    return None if text is None else hashlib.sha256(text.encode("utf-8")).hexdigest()


def data_hash(data: Any) -> str:
    return hashlib.sha256(canonical(data)).hexdigest()


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """An audit record waiting for its place in the chain (seq and hashes come at commit)."""

    actor: str
    action: str
    subject: str
    data: Any


@dataclass(frozen=True, slots=True, kw_only=True)
class AuditRecord:
    seq: int
    at: int
    actor: str
    action: str
    subject: str
    data: Any
    data_hash: str
    prev_hash: str
    hash: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "at": self.at,
            "actor": self.actor,
            "action": self.action,
            "subject": self.subject,
            "data": self.data,
            "data_hash": self.data_hash,
            "prev_hash": self.prev_hash,
            "hash": self.hash,
        }


def record_hash(
    seq: int, at: int, actor: str, action: str, subject: str, data_hash: str, prev_hash: str
) -> str:
    body = canonical(
        {
            "seq": seq,
            "at": at,
            "actor": actor,
            "action": action,
            "subject": subject,
            "data_hash": data_hash,
            "prev_hash": prev_hash,
        }
    )
    return hashlib.sha256(RECORD_PREFIX + body).hexdigest()


def chain(
    events: list[AuditEvent], head_seq: int, head_hash: str, at: int
) -> list[tuple[Any, ...]]:
    """Rows ``(seq, at, actor, action, subject, data, data_hash, prev_hash, hash)`` that
    append ``events`` after the head."""
    rows: list[tuple[Any, ...]] = []
    prev = head_hash
    seq = head_seq
    for e in events:
        seq += 1
        data_text = _canonical(e.data)
        dh = hashlib.sha256(data_text.encode("utf-8")).hexdigest()
        h = record_hash(seq, at, e.actor, e.action, e.subject, dh, prev)
        rows.append((seq, at, e.actor, e.action, e.subject, data_text, dh, prev, h))
        prev = h
    return rows


def checkpoint_message(seq: int, hash_: str, at: int) -> bytes:
    """What a checkpoint signs: "the chain up to ``seq`` ends in ``hash_``"."""
    return CHECKPOINT_PREFIX + canonical({"seq": seq, "hash": hash_, "at": at})
