"""Approval policy as data: a TOML file, parsed into frozen dataclasses, and the checks it
drives (pure functions, no I/O once the text is loaded).

::

    name = "default"
    currency = "EUR"                       # amounts are compared in this currency
    blocked_vendors = ["Shady Supplies"]  # a request naming one is rejected
    separation_of_duties = true            # the requester never approves their own request

    [rates]                                # 1 unit of the key = this many policy-currency units
    USD = 0.9

    [budgets]                              # budget left per cost centre (policy currency)
    CC-100 = 50000

    [[rule]]                               # first rule whose types and max_amount fit wins
    types = ["purchase", "expense"]        # default: every type
    max_amount = 1000                      # default: no upper bound
    [[rule.stage]]                         # stages run in order (sequential)
    name = "manager"
    mode = "any"                           # any: first decision of the approvers decides
    users = ["anna", "bob"]                # all: every approver must approve (in parallel)
    due_seconds = 86400                    # SLA of each task of the stage (optional)
    escalate_to = ["carl"]                 # reassigned there when the SLA passes (optional)

The policy's identity is the SHA-256 of its text: a run records text and hash in its first
step, so a policy edited while it waits does not change the rules it is decided under.
"""

from __future__ import annotations

import hashlib
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from flowdesk import errors

__all__ = [
    "Check",
    "Policy",
    "Rule",
    "Stage",
    "check",
    "parse",
    "policy_hash",
]

REQUEST_TYPES = ("purchase", "access", "expense")


@dataclass(frozen=True, slots=True)
class Stage:
    """One approval step: who approves, and whether any one or all of them must."""

    name: str
    mode: Literal["any", "all"]
    users: tuple[str, ...]
    due_seconds: float | None = None
    escalate_to: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Rule:
    """Amount threshold (and request types) -> approval chain."""

    index: int
    types: tuple[str, ...]
    max_amount: float | None
    stages: tuple[Stage, ...]

    def fits(self, kind: str, amount: float) -> bool:
        return kind in self.types and (self.max_amount is None or amount <= self.max_amount)


@dataclass(frozen=True, slots=True)
class Policy:
    name: str
    currency: str
    rules: tuple[Rule, ...]
    blocked_vendors: frozenset[str] = frozenset()
    separation_of_duties: bool = True
    rates: dict[str, float] = field(default_factory=dict)
    budgets: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Check:
    """What the policy says about one request before anyone is asked."""

    fired: tuple[dict[str, Any], ...]
    """Every rule that fired: ``{"rule": id, "detail": text}``, in evaluation order."""
    rejected: bool
    amount: float
    """The request's amount in the policy currency."""
    stages: tuple[Stage, ...] = ()


def policy_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _bad(why: str) -> errors.ConfigurationError:
    return errors.ConfigurationError(
        f"Approval policy: {why}. See flowdesk.assistants.approvals_policy."
    )


def _users(raw: Any, what: str) -> tuple[str, ...]:
    if not isinstance(raw, list) or not all(isinstance(u, str) and u for u in raw):
        raise _bad(f"{what} must be a list of user ids")
    return tuple(raw)


def _stage(raw: Any, where: str) -> Stage:
    if not isinstance(raw, dict):
        raise _bad(f"{where} must be a table")
    mode = raw.get("mode", "any")
    if mode not in ("any", "all"):
        raise _bad(f"{where}: mode is 'any' or 'all', not {mode!r}")
    users = _users(raw.get("users"), f"{where}.users")
    if not users:
        raise _bad(f"{where} names no approver")
    due = raw.get("due_seconds")
    if due is not None and (not isinstance(due, int | float) or due <= 0):
        raise _bad(f"{where}.due_seconds must be a positive number")
    return Stage(
        name=str(raw.get("name") or where),
        mode=mode,
        users=users,
        due_seconds=None if due is None else float(due),
        escalate_to=_users(raw.get("escalate_to", []), f"{where}.escalate_to"),
    )


def parse(text: str) -> Policy:
    """Parse and validate a policy; raises `ConfigurationError` naming what is wrong."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise _bad(f"not valid TOML ({exc})") from None
    rules: list[Rule] = []
    for i, rule in enumerate(raw.get("rule", [])):
        types = tuple(rule.get("types", REQUEST_TYPES))
        unknown = set(types) - set(REQUEST_TYPES)
        if unknown:
            raise _bad(f"rule {i}: unknown request types {sorted(unknown)}")
        limit = rule.get("max_amount")
        if limit is not None and not isinstance(limit, int | float):
            raise _bad(f"rule {i}: max_amount must be a number")
        stages = tuple(
            _stage(s, f"rule {i} stage {j}") for j, s in enumerate(rule.get("stage", []))
        )
        if not stages:
            raise _bad(f"rule {i} has no [[rule.stage]]")
        rules.append(Rule(i, types, None if limit is None else float(limit), stages))
    if not rules:
        raise _bad("no [[rule]]")
    return Policy(
        name=str(raw.get("name", "policy")),
        currency=str(raw.get("currency", "EUR")).upper(),
        rules=tuple(rules),
        blocked_vendors=frozenset(v.casefold() for v in raw.get("blocked_vendors", [])),
        separation_of_duties=bool(raw.get("separation_of_duties", True)),
        rates={str(k).upper(): float(v) for k, v in raw.get("rates", {}).items()},
        budgets={str(k): float(v) for k, v in raw.get("budgets", {}).items()},
    )


def check(
    policy: Policy,
    *,
    kind: str,
    amount: float,
    currency: str,
    cost_centre: str,
    requester: str,
    vendor: str | None = None,
) -> Check:
    """Apply the policy's checks in a fixed order: currency, blocked vendor, budget left,
    approval chain by threshold, separation of duties. Rejections stop at the first."""
    fired: list[dict[str, Any]] = []

    def fire(rule: str, detail: str) -> None:
        fired.append({"rule": rule, "detail": detail})

    cur = currency.upper()
    if cur == policy.currency:
        value = amount
    elif cur in policy.rates:
        value = round(amount * policy.rates[cur], 2)
        fire("currency", f"{amount} {cur} = {value} {policy.currency}")
    else:
        fire("unknown_currency", f"no rate for {cur} in the policy")
        return Check(tuple(fired), True, amount)
    if vendor is not None and vendor.casefold() in policy.blocked_vendors:
        fire("blocked_vendor", f"vendor {vendor!r} is blocked")
        return Check(tuple(fired), True, value)
    if cost_centre in policy.budgets:
        left = policy.budgets[cost_centre]
        if value > left:
            fire("over_budget", f"{value} {policy.currency} > {left} left in {cost_centre}")
            return Check(tuple(fired), True, value)
        fire("budget", f"{value} of {left} {policy.currency} left in {cost_centre}")
    elif kind != "access":
        fire("unknown_cost_centre", f"no budget for cost centre {cost_centre!r}")
        return Check(tuple(fired), True, value)
    rule = next((r for r in policy.rules if r.fits(kind, value)), None)
    if rule is None:
        fire("no_rule", f"no rule covers a {kind} of {value} {policy.currency}")
        return Check(tuple(fired), True, value)
    limit = "no limit" if rule.max_amount is None else f"<= {rule.max_amount}"
    fire(f"threshold:{rule.index}", f"{kind} {value} {limit}: {len(rule.stages)} stage(s)")
    stages: list[Stage] = []
    for stage in rule.stages:
        users: Sequence[str] = stage.users
        if policy.separation_of_duties and requester in users:
            users = [u for u in users if u != requester]
            fire("separation_of_duties", f"{requester} removed from stage {stage.name}")
            if not users:
                fire("no_approver", f"stage {stage.name} has no approver but the requester")
                return Check(tuple(fired), True, value)
        stages.append(
            Stage(stage.name, stage.mode, tuple(users), stage.due_seconds, stage.escalate_to)
        )
    return Check(tuple(fired), False, value, tuple(stages))
