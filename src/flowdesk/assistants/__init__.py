"""The reference assistants built on the engine: ``approvals`` (requests decided by a
policy and by people) and ``support`` (customer messages triaged by a local model)."""

from __future__ import annotations
