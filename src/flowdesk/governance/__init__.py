"""Governance: the audit chain and its signed checkpoints, users and API tokens, roles and
permissions, retention."""

from __future__ import annotations
