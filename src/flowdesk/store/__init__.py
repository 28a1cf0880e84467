"""Durable state: the `Store` seam and its SQLite implementation."""

from __future__ import annotations
