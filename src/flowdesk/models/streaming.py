"""Streaming a generated answer to the caller, as the gateway's providers write it.

`StreamSink` sits between a provider's text pieces and the caller's ``on_chunk``: it puts
redacted values back on the way (holding back a placeholder cut between two pieces until
it is whole), enforces the task's ``max_answer_chars`` while the text grows, and sends a
``restart`` chunk when a retry or a fallback model starts the answer over.
"""

from __future__ import annotations

from flowdesk import errors
from flowdesk.models import base, pii

_HOLD = 40  # the longest placeholder a streamed piece may cut in two


class StreamSink:
    """Forwards one answer's streamed text to the caller's sink. Per model it restores PII
    placeholders (holding back a ``<...`` cut between pieces until it is whole), refuses
    an answer that grows beyond ``max_chars`` at once (`AnswerRejected`), and sends a
    ``restart`` chunk before a retry or fallback when text was already sent."""

    def __init__(self, out: base.ChunkSink, max_chars: int | None) -> None:
        self._out = out
        self._max_chars = max_chars
        self._redaction: pii.Redaction | None = None
        self._held = ""
        self._chars = 0
        self._dirty = False

    def use(self, redaction: pii.Redaction | None) -> None:
        """The redaction whose placeholders the next model's text may hold."""
        self._redaction = redaction

    async def begin(self) -> None:
        """A new attempt starts: what was sent so far is void."""
        if self._dirty:
            await self._out(base.Chunk("", restart=True))
        self._dirty = False
        self._held = ""
        self._chars = 0

    async def piece(self, text: str) -> None:
        self._chars += len(text)
        if self._max_chars is not None and self._chars > self._max_chars:
            raise errors.AnswerRejected(
                f"The answer grew beyond max_answer_chars = {self._max_chars}; it was stopped."
            )
        if self._redaction is None:
            await self._emit(text)
            return
        buffer = self._held + text
        cut = buffer.rfind("<")
        if cut >= 0 and ">" not in buffer[cut:] and len(buffer) - cut <= _HOLD:
            buffer, self._held = buffer[:cut], buffer[cut:]
        else:
            self._held = ""
        if buffer:
            await self._emit(self._redaction.restore(buffer))

    async def whole(self, text: str | None) -> None:
        """An answer that came whole (the cache): one piece."""
        await self.begin()
        if text:
            await self.piece(text)
        await self.end()

    async def end(self) -> None:
        if self._held:
            held, self._held = self._held, ""
            await self._emit(self._redaction.restore(held) if self._redaction else held)

    async def _emit(self, text: str) -> None:
        self._dirty = True
        await self._out(base.Chunk(text))
