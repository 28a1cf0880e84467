"""Finding the data keys of runs in a SQL store, and opening their payloads on read.

Reads check the key rows every time (one statement per read, for any number of runs), so
a key destroyed by another process (erasure, retention) is never used from a stale cache:
the payload reads as erased. Unwrapping is cached by (key id, wrapped key), so a hot run
costs one AES-GCM decryption per payload and nothing more.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from flowdesk.store import payloads
from flowdesk.store.payloads import DataKey, Keyring

Fetch = Callable[[str, Sequence[Any]], Awaitable[list[Sequence[Any]]]]
KEY_COLUMNS = "owner, id, wrapped_by, wrapped, destroyed_reason"


@dataclass(slots=True)
class RunKeys:
    """The data keys of some runs: a key, or the reason it was destroyed (a string).
    A run without a key row is from before encryption: its payloads are plaintext."""

    keyring: Keyring | None
    by_run: dict[str, DataKey | str] = field(default_factory=dict)

    def text(self, run_id: str, seq: int, kind: str, stored: str | None) -> str | None:
        """The plaintext JSON of a stored payload; an erased one reads as
        ``{"$erased": reason}``. Raises `PayloadTampered` when it does not authenticate."""
        if stored is None or not stored.startswith(payloads.PREFIX):
            return stored
        key = self.by_run.get(run_id)
        if isinstance(key, str):
            return payloads.erased_text(key)
        if key is None:
            if self.keyring is None:
                return payloads.erased_text("payload encryption is off in this process")
            return payloads.erased_text("the run's data key is gone")
        return Keyring.open(key, run_id, seq, kind, stored)

    def json(self, run_id: str, seq: int, kind: str, stored: str | None) -> Any:
        text = self.text(run_id, seq, kind, stored)
        return None if text is None else json.loads(text)


async def load(
    keyring: Keyring | None,
    fetch: Fetch,
    as_list: Callable[[Sequence[str]], Any],
    run_ids: Sequence[str],
) -> RunKeys:
    """The current keys of ``run_ids`` (one statement; a second one only for run keys
    wrapped by subject keys that are not unwrapped yet)."""
    keys = RunKeys(keyring)
    if keyring is None or not run_ids:
        return keys
    rows = await fetch(
        f"SELECT {KEY_COLUMNS} FROM data_keys WHERE kind = 'run' AND owner"
        " IN (SELECT value FROM json_each(?))",
        (as_list(list(dict.fromkeys(run_ids))),),
    )
    subject_ids: set[str] = set()
    for _owner, key_id, by, wrapped, _reason in rows:
        if wrapped is not None and by.startswith(payloads.SUBJECTS):
            if keyring.peek(key_id, wrapped) is None:
                subject_ids.update(by[len(payloads.SUBJECTS) :].split(","))
    subjects: dict[str, DataKey | str] = {}
    if subject_ids:
        for owner, key_id, by, wrapped, reason in await fetch(
            f"SELECT {KEY_COLUMNS} FROM data_keys WHERE id IN (SELECT value FROM json_each(?))",
            (as_list(sorted(subject_ids)),),
        ):
            if wrapped is None:
                subjects[key_id] = reason or f"subject {owner} was erased"
            else:
                subjects[key_id] = keyring.unwrap(key_id, "subject", owner, by, wrapped)
    for owner, key_id, by, wrapped, reason in rows:
        if wrapped is None:
            keys.by_run[owner] = reason or "erased"
            continue
        needed: list[DataKey] = []
        if by.startswith(payloads.SUBJECTS) and keyring.peek(key_id, wrapped) is None:
            for sid in by[len(payloads.SUBJECTS) :].split(","):
                got = subjects.get(sid, "a subject key is gone")
                if isinstance(got, str):
                    keys.by_run[owner] = got
                    break
                needed.append(got)
            else:
                keys.by_run[owner] = keyring.unwrap(key_id, "run", owner, by, wrapped, needed)
            continue
        keys.by_run[owner] = keyring.unwrap(key_id, "run", owner, by, wrapped)
    return keys
