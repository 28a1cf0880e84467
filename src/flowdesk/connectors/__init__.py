"""Connectors: typed, idempotent, audited adapters to other systems.

The seam is `base.Connector`; built in are `rest.RestConnector` (HTTP APIs),
`sql.SqlConnector` (PostgreSQL, MariaDB/MySQL, SQLite), `email.SmtpConnector` (SMTP) and
`webhook.WebhookConnector` (signed outgoing webhooks). Credentials come from
`secrets.Secrets`. Import the module you need (``from flowdesk.connectors import rest``):
each pulls in its own client library only when imported.
"""

from __future__ import annotations

from flowdesk.connectors.base import (
    Call,
    Connector,
    Operation,
    Outcome,
    TokenBucket,
    Transient,
    TransportRetry,
)
from flowdesk.connectors.secrets import Secret, Secrets

__all__ = [
    "Call",
    "Connector",
    "Operation",
    "Outcome",
    "Secret",
    "Secrets",
    "TokenBucket",
    "Transient",
    "TransportRetry",
]
