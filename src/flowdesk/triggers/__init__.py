"""What starts work besides the API: signed webhooks, file drops and event streams.

`webhook` registers ``POST /hooks/<name>``; `FileDrop` watches a folder; the stream
consumers live in their own modules, each needing its extra: `flowdesk.triggers.nats`
(``flowdesk[nats]``), `flowdesk.triggers.redis` (``flowdesk[redis]``) and
`flowdesk.triggers.kafka` (``flowdesk[kafka]``), all on `flowdesk.triggers.streams`.
"""

from __future__ import annotations

from flowdesk.triggers.filedrop import DroppedFile, FileDrop
from flowdesk.triggers.streams import Message, StreamConsumer
from flowdesk.triggers.webhooks import Webhook, hooks_of, sign, signed_headers, webhook

__all__ = [
    "DroppedFile",
    "FileDrop",
    "Message",
    "StreamConsumer",
    "Webhook",
    "hooks_of",
    "sign",
    "signed_headers",
    "webhook",
]
