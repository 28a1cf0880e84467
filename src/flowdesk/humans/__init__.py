"""Human tasks: the inbox people work from (list, claim, complete, delegate, comment)."""

from __future__ import annotations
