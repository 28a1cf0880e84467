"""The model gateway: providers, routing, redaction, caching, rollouts, cost and drift."""

from __future__ import annotations
