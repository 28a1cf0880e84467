"""The gateway's answer cache: exact match on task, model version and normalised input.

`cache_key` hashes what decides an answer: the task, the model and its version, the
input with whitespace collapsed and case folded, the allowed labels and the generation
options (``max_tokens``, ``temperature``). Routing facts (risk, region, data class, routing
key) are not part of it: they choose the model, and the model is in the key.

`AnswerCache` is the seam: `LRUCache` (in process, the default) implements it, and a
store-backed cache shared by every worker can implement the same two methods. Entries
hold what the provider answered about the redacted text (placeholders, never the
values), so a hit is restored with the caller's own redaction.
"""

from __future__ import annotations

import hashlib
import json
import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from flowdesk.models import base


def normalise(text: str) -> str:
    """Whitespace runs become one space, ends are trimmed, case is folded."""
    return " ".join(text.split()).casefold()


def cache_key(
    *,
    task: str,
    model: str,
    version: str,
    text: str,
    labels: Sequence[str] = (),
    options: dict[str, Any] | None = None,
) -> str:
    """The hex SHA-256 of everything that decides the answer (see the module docstring)."""
    payload = json.dumps(
        [task, model, version, normalise(text), list(labels), options or {}],
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
        default=str,
    )
    return hashlib.sha256(payload.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class CacheStats:
    hits: int
    misses: int
    entries: int

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


class AnswerCache(ABC):
    """Where the gateway keeps answers for reuse. Must be safe for concurrent callers."""

    @abstractmethod
    async def get(self, key: str) -> base.ProviderResult | None:
        """The entry under ``key`` if it has not expired, else None."""

    @abstractmethod
    async def put(self, key: str, result: base.ProviderResult, ttl: float) -> None:
        """Keep ``result`` under ``key`` for ``ttl`` seconds."""

    def stats(self) -> CacheStats:
        """Hits, misses and size (a shared cache may report only what it knows)."""
        return CacheStats(0, 0, 0)

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""


class LRUCache(AnswerCache):
    """An in-process cache of at most ``max_entries``, least recently used out first.

    ``clock`` is a monotonic seconds clock (injectable so tests need not sleep)."""

    def __init__(
        self, max_entries: int = 10_000, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.max_entries = max_entries
        self._clock = clock
        self._entries: OrderedDict[str, tuple[float, base.ProviderResult]] = OrderedDict()
        self._hits = 0
        self._misses = 0

    async def get(self, key: str) -> base.ProviderResult | None:
        entry = self._entries.get(key)
        if entry is None:
            self._misses += 1
            return None
        expires, result = entry
        if expires <= self._clock():
            del self._entries[key]
            self._misses += 1
            return None
        self._entries.move_to_end(key)
        self._hits += 1
        return result

    async def put(self, key: str, result: base.ProviderResult, ttl: float) -> None:
        if ttl <= 0 or self.max_entries <= 0:
            return
        self._entries[key] = (self._clock() + ttl, result)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def stats(self) -> CacheStats:
        return CacheStats(self._hits, self._misses, len(self._entries))
