"""Durable execution: registry, context, replaying runner, worker, group-commit writer."""

from __future__ import annotations
