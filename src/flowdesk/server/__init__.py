"""The REST API: runs, human tasks, the audit chain and users over HTTP (`create_app`,
`serve`)."""

from __future__ import annotations
