"""The audit chain: verification, signed checkpoints, export.

Records are appended by the store in the same transaction as the change they describe
(`flowdesk.store.audit`). This module proves afterwards that nobody changed them:

* `AuditLog.verify` walks the chain from the first record and reports, by sequence
  number, every record whose data no longer matches its ``data_hash``, whose fields no
  longer match its ``hash``, whose ``prev_hash`` does not name the record before it, or
  that is missing; and a chain whose end falls short of the head row or of a checkpoint.
* `AuditLog.checkpoint` signs "the chain up to seq N ends in hash H" with an Ed25519 key
  kept outside the database (a key file, created with mode 0600 on first use). Someone
  who can write to the database but does not hold the key cannot rewrite the chain
  behind a checkpoint without `verify` noticing. `install` makes every worker sign one
  every ``every`` records.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from flowdesk import errors
from flowdesk.engine.app import App
from flowdesk.store import audit as records
from flowdesk.store import base

log = logging.getLogger("flowdesk.audit")

KEY_ENV = "FLOWDESK_AUDIT_KEY_FILE"
_BATCH = 5000


def default_key_file(database_url: str) -> Path:
    """``$FLOWDESK_AUDIT_KEY_FILE``, else next to a SQLite database, else ./flowdesk-audit.key."""
    if os.environ.get(KEY_ENV):
        return Path(os.environ[KEY_ENV])
    if database_url.startswith("sqlite:"):
        from flowdesk.store import sqlite

        path, _ = sqlite.parse_url(database_url)
        if path != ":memory:":
            return Path(path + ".audit-key")
    return Path("flowdesk-audit.key")


def load_or_create_key(path: Path) -> tuple[Ed25519PrivateKey, bool]:
    """The signing key in ``path``; created (mode 0600) when the file does not exist."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process created it first
            return load_or_create_key(path)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        log.warning("created audit signing key %s (keep it safe; back it up)", path)
        return key, True
    try:
        loaded = serialization.load_pem_private_key(data, password=None)
    except ValueError as exc:
        raise errors.ConfigurationError(f"{path} is not a PEM private key: {exc}") from exc
    if not isinstance(loaded, Ed25519PrivateKey):
        raise errors.ConfigurationError(f"{path} holds a key that is not Ed25519.")
    return loaded, False


def load_public_key(path: Path) -> Ed25519PublicKey:
    """A public key file (PEM), or the public half of a private key file."""
    data = path.read_bytes()
    if b"PRIVATE KEY" in data:
        return load_or_create_key(path)[0].public_key()
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError as exc:
        raise errors.ConfigurationError(f"{path} is not a PEM public key: {exc}") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise errors.ConfigurationError(f"{path} holds a key that is not Ed25519.")
    return key


def key_id(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class Checkpoint:
    seq: int
    hash: str
    at: int
    key_id: str
    signature: str


@dataclass(frozen=True, slots=True)
class Problem:
    seq: int
    kind: str  # data_altered | record_altered | broken_link | missing | truncated | checkpoint
    message: str


@dataclass(slots=True)
class Report:
    records: int = 0
    head_seq: int = 0
    checkpoints: int = 0
    last_checkpoint: int = 0
    problems: list[Problem] = field(default_factory=list)
    more_problems: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def first_bad_seq(self) -> int | None:
        return min((p.seq for p in self.problems), default=None)

    @property
    def unanchored(self) -> int:
        """Records after the last checkpoint: protected by the head row only."""
        return max(0, self.head_seq - self.last_checkpoint)

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "records": self.records,
            "head_seq": self.head_seq,
            "checkpoints": self.checkpoints,
            "last_checkpoint": self.last_checkpoint,
            "unanchored": self.unanchored,
            "first_bad_seq": self.first_bad_seq,
            "problems": [
                {"seq": p.seq, "kind": p.kind, "message": p.message} for p in self.problems
            ],
            "more_problems": self.more_problems,
        }


class _Walk:
    """Checks rows one by one, in seq order."""

    def __init__(self, report: Report, watch: set[int], limit: int) -> None:
        self.report = report
        self.expected = 1
        self.prev = records.GENESIS
        self.hashes: dict[int, str] = {}
        self.watch = watch
        self.limit = limit

    def problem(self, seq: int, kind: str, message: str) -> None:
        if len(self.report.problems) < self.limit:
            self.report.problems.append(Problem(seq, kind, message))
        else:
            self.report.more_problems += 1

    def feed(self, rows: Iterable[Sequence[Any]]) -> None:
        sha = hashlib.sha256
        for seq, at, actor, action, subject, data, data_hash, prev_hash, hash_ in rows:
            self.report.records += 1
            if seq != self.expected:
                self.problem(
                    self.expected,
                    "missing",
                    f"records {self.expected}..{seq - 1} are missing (deleted)"
                    if seq > self.expected + 1
                    else f"record {self.expected} is missing (deleted)",
                )
            if data is None:
                # Records hold digests, never payloads, so nothing ever clears their data.
                self.problem(seq, "data_altered", f"record {seq}: its data was removed")
            elif sha(data.encode("utf-8")).hexdigest() != data_hash:
                self.problem(seq, "data_altered", f"record {seq}: data does not match data_hash")
            if prev_hash != self.prev:
                self.problem(
                    seq,
                    "broken_link",
                    f"record {seq}: prev_hash does not match the hash of the record before it"
                    " (records reordered, replaced or removed)",
                )
            if records.record_hash(seq, at, actor, action, subject, data_hash, prev_hash) != hash_:
                self.problem(seq, "record_altered", f"record {seq}: fields do not match its hash")
            if seq in self.watch:
                self.hashes[seq] = hash_
            self.prev = hash_
            self.expected = seq + 1


class AuditLog:
    """The audit chain of one app's store."""

    def __init__(self, app: App, key_file: str | Path | None = None, *, every: int = 1000) -> None:
        self.app = app
        self.key_file = Path(key_file) if key_file else default_key_file(app.database_url)
        if every < 1:
            raise errors.ConfigurationError("Checkpoints need every >= 1 records.")
        self.every = every
        self._key: Ed25519PrivateKey | None = None
        self._last_checkpoint: int | None = None

    def signing_key(self) -> Ed25519PrivateKey:
        if self._key is None:
            self._key, _ = load_or_create_key(self.key_file)
        return self._key

    def public_key(self) -> Ed25519PublicKey:
        """The key checkpoints are verified with: the public half of the key file (a public
        key file will do). Never creates a key: checking with a new key would only report
        every checkpoint as signed by an unknown key."""
        if self._key is not None:
            return self._key.public_key()
        if not self.key_file.exists():
            raise errors.ConfigurationError(
                f"The audit chain has signed checkpoints but there is no key file "
                f"{self.key_file} to check them with: pass the key file that signed them "
                f"(or its public key), e.g. --key-file or ${KEY_ENV}."
            )
        return load_public_key(self.key_file)

    # -- checkpoints -------------------------------------------------------------------
    async def checkpoint(self) -> Checkpoint | None:
        """Sign the chain's current head (None while the chain is empty)."""
        await self.app.open()
        seq, hash_ = await self.app.store.audit_head()
        if seq == 0:
            return None
        key = self.signing_key()
        at = base.now_ms()
        signature = key.sign(records.checkpoint_message(seq, hash_, at)).hex()
        kid = key_id(key.public_key())
        await self.app.submit(lambda tx: tx.add_checkpoint(seq, hash_, at, kid, signature))
        self._last_checkpoint = seq
        rows = await self.app.store.audit_checkpoints()
        row = next(r for r in rows if r[0] == seq)
        return Checkpoint(row[0], row[1], row[2], row[3], row[4])

    async def checkpoints(self) -> list[Checkpoint]:
        await self.app.open()
        return [Checkpoint(*r) for r in await self.app.store.audit_checkpoints()]

    async def maybe_checkpoint(self) -> Checkpoint | None:
        """Sign a checkpoint when ``every`` records came since the last one."""
        await self.app.open()
        if self._last_checkpoint is None:
            cps = await self.app.store.audit_checkpoints()
            self._last_checkpoint = int(cps[-1][0]) if cps else 0
        seq, _ = await self.app.store.audit_head()
        if seq - self._last_checkpoint < self.every:
            return None
        return await self.checkpoint()

    def install(self) -> AuditLog:
        """Have every worker of the app sign a checkpoint each ``every`` records."""
        self.app.upkeep_hooks.append(self._hook)
        return self

    async def _hook(self) -> None:
        await self.maybe_checkpoint()

    # -- verification ------------------------------------------------------------------
    async def verify(
        self, public_key: Ed25519PublicKey | None = None, *, max_problems: int = 50
    ) -> Report:
        """Recompute the whole chain and check every checkpoint's signature. The public key
        defaults to the one of the configured key file."""
        await self.app.open()
        store = self.app.store
        report = Report()
        cps = [Checkpoint(*r) for r in await store.audit_checkpoints()]
        walk = _Walk(report, {c.seq for c in cps}, max_problems)
        after = 0
        while True:
            rows = await store.audit_rows(after, _BATCH)
            if not rows:
                break
            walk.feed(rows)
            after = int(rows[-1][0])
        last_seq, last_hash = walk.expected - 1, walk.prev
        head_seq, head_hash = await store.audit_head()
        report.head_seq = head_seq
        if head_seq > last_seq:
            walk.problem(
                last_seq + 1,
                "truncated",
                f"the chain ends at record {last_seq} but its head row says {head_seq}: "
                f"records {last_seq + 1}..{head_seq} were cut off",
            )
        elif head_seq < last_seq or (head_seq and head_hash != last_hash):
            walk.problem(
                min(head_seq, last_seq) or 1,
                "head_mismatch",
                f"the head row (seq {head_seq}) does not match the chain's last record "
                f"({last_seq})",
            )
        if cps:
            if public_key is None:
                public_key = self.public_key()
            kid = key_id(public_key)
            for cp in cps:
                report.checkpoints += 1
                if cp.key_id != kid:
                    walk.problem(
                        cp.seq, "checkpoint", f"checkpoint {cp.seq}: unknown key {cp.key_id}"
                    )
                    continue
                try:
                    public_key.verify(
                        bytes.fromhex(cp.signature),
                        records.checkpoint_message(cp.seq, cp.hash, cp.at),
                    )
                except (InvalidSignature, ValueError):
                    walk.problem(cp.seq, "checkpoint", f"checkpoint {cp.seq}: bad signature")
                    continue
                if cp.seq > last_seq:
                    walk.problem(
                        last_seq + 1,
                        "truncated",
                        f"a signed checkpoint covers record {cp.seq} but the chain ends at "
                        f"{last_seq}: records {last_seq + 1}..{cp.seq} were cut off",
                    )
                elif walk.hashes.get(cp.seq) != cp.hash:
                    walk.problem(
                        cp.seq,
                        "checkpoint",
                        f"record {cp.seq} differs from the signed checkpoint: the chain up to "
                        "it was rewritten",
                    )
                else:
                    report.last_checkpoint = max(report.last_checkpoint, cp.seq)
        report.problems.sort(key=lambda p: p.seq)
        return report

    # -- export ------------------------------------------------------------------------
    async def export(self, out: IO[str], *, after_seq: int = 0, subject: str | None = None) -> int:
        """Write records as JSON Lines (one record per line, data decoded); returns how
        many."""
        await self.app.open()
        count = 0
        async for row in self.rows(after_seq=after_seq, subject=subject):
            out.write(json.dumps(row, ensure_ascii=False, separators=(",", ":")) + "\n")
            count += 1
        return count

    async def rows(self, *, after_seq: int = 0, subject: str | None = None) -> Any:
        """Records as dicts, in chain order (an async iterator)."""
        await self.app.open()
        after = after_seq
        while True:
            batch = await self.app.store.audit_rows(after, _BATCH, subject)
            if not batch:
                return
            for r in batch:
                yield {
                    "seq": r[0],
                    "at": r[1],
                    "actor": r[2],
                    "action": r[3],
                    "subject": r[4],
                    "data": None if r[5] is None else json.loads(r[5]),
                    "data_hash": r[6],
                    "prev_hash": r[7],
                    "hash": r[8],
                }
            after = int(batch[-1][0])
