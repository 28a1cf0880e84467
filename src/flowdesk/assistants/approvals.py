"""The approvals assistant: purchase, access and expense requests, decided by a policy
written as data (`flowdesk.assistants.approvals_policy`) and by people.

::

    approvals = Approvals(app, "data/approvals/policy.toml", mail=smtp, notify=["fin@x.test"])
    handle = await approvals.submit(ApprovalRequest(type="purchase", amount=800, ...))

One request is one run of ``approvals.request``:

1. ``load_policy`` (a step) records the policy file's text and SHA-256: the run decides
   under that text even if the file changes while it waits (new requests read the new one);
2. the policy's checks (currency, blocked vendor, budget left in the cost centre, amount
   threshold -> approval chain, separation of duties) run on the recorded text;
3. each stage of the chain runs in order. A stage starts one ``approvals.vote`` child per
   approver at once, each holding one human task (four-eyes: the requester, who is the
   run's initiator, cannot complete it; SLA: ``due_seconds`` then reassignment to
   ``escalate_to``; delegation: the inbox's ``delegate``). ``mode="any"``: the first vote
   decides and the other children (and their tasks) are cancelled. ``mode="all"``: every
   approver must approve; the first rejection decides and cancels the rest;
4. the decision and its explanation (rules fired, who decided what and when, the policy's
   hash) are the run's output and an ``approval.decided`` audit record;
5. an e-mail tells the requester's addresses and the configured ones (SMTP connector).
"""

from __future__ import annotations

import dataclasses
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from flowdesk import errors
from flowdesk.assistants import approvals_policy as pol
from flowdesk.assistants import installed
from flowdesk.connectors import email as mail
from flowdesk.engine import context as ctx_mod
from flowdesk.engine import tasks
from flowdesk.engine.app import App, RunHandle
from flowdesk.engine.context import Context
from flowdesk.store import base as store_base

__all__ = ["ApprovalRequest", "Approvals", "Vote", "REQUEST_WORKFLOW", "VOTE_WORKFLOW"]

REQUEST_WORKFLOW = "approvals.request"
VOTE_WORKFLOW = "approvals.vote"


class ApprovalRequest(BaseModel):
    """What a requester asks for."""

    type: Literal["purchase", "access", "expense"]
    amount: float = Field(ge=0, le=1e12)
    currency: str = Field(pattern=r"^[A-Za-z]{3}$")
    cost_centre: str = Field(min_length=1, max_length=200)
    requester: str = Field(min_length=1, max_length=200)
    justification: str = Field(min_length=1, max_length=4000)
    vendor: str | None = Field(default=None, max_length=200)
    notify: list[str] = Field(default_factory=list, max_length=20)
    """E-mail addresses told of the decision (with the assistant's own list)."""


class Vote(BaseModel):
    """The form an approver fills in."""

    approve: bool
    comment: str = ""


class VoteInput(BaseModel):
    approver: str
    stage: str
    summary: dict[str, Any]
    due_seconds: float | None = None
    escalate_to: list[str] = Field(default_factory=list)


def _summary(request: ApprovalRequest, amount: float, currency: str) -> dict[str, Any]:
    return {
        "type": request.type,
        "amount": request.amount,
        "currency": request.currency,
        "amount_in_policy_currency": amount,
        "policy_currency": currency,
        "cost_centre": request.cost_centre,
        "requester": request.requester,
        "justification": request.justification,
        "vendor": request.vendor,
    }


class Approvals:
    """Registers the assistant's workflows and steps on ``app``."""

    def __init__(
        self,
        app: App,
        policy_path: str | Path,
        *,
        mail_connector: mail.SmtpConnector | None = None,
        notify: list[str] | None = None,
    ) -> None:
        self.app = app
        self.policy_path = Path(policy_path)
        self.mail = mail_connector
        self.notify = list(notify or [])
        pol.parse(self.policy_path.read_text(encoding="utf-8"))  # fail now, not in a run
        self._register()
        installed.of(app).approvals = self

    async def submit(
        self, request: ApprovalRequest, *, idempotency_key: str | None = None
    ) -> RunHandle:
        """Start deciding ``request``; the requester is the run's initiator (four-eyes)."""
        return await self.app.start(
            REQUEST_WORKFLOW,
            request,
            idempotency_key=idempotency_key,
            initiator=request.requester,
        )

    # -- workflows and steps -------------------------------------------------------------
    def _register(self) -> None:
        app = self.app
        decided = app.metrics.counter(
            "approvals_decisions_total",
            "Approval requests decided, by type and decision (approved, rejected)",
            ["type", "decision"],
        )
        time_to_decision = app.metrics.histogram(
            "approvals_time_to_decision_seconds",
            "From the request to its decision",
            ["type"],
        )

        @app.step(name="approvals.load_policy")
        def load_policy() -> dict[str, str]:
            text = self.policy_path.read_text(encoding="utf-8")
            policy = pol.parse(text)
            return {"name": policy.name, "hash": pol.policy_hash(text), "text": text}

        @app.step(name="approvals.task_outcome")
        async def task_outcome(task_id: str) -> dict[str, Any]:
            task = await app.store.get_task(task_id)
            if task is None:
                raise errors.TaskNotFound(task_id)
            return {
                "task_id": task_id,
                "approver": task.completed_by,
                "at": None if task.completed_at is None else task.completed_at.isoformat(),
                "escalation_level": task.escalation_level,
            }

        @app.step(name="approvals.cancel_votes")
        async def cancel_votes(run_ids: list[str]) -> list[str]:
            cancelled = []
            for run_id in run_ids:
                try:
                    await app.cancel(run_id, "the stage was decided by another vote")
                    cancelled.append(run_id)
                except (errors.InvalidState, errors.RunNotFound):
                    pass  # already finished
            return cancelled

        @app.step(name="approvals.record_decision")
        async def record_decision(run_id: str, explanation: dict[str, Any]) -> str:
            await app.submit(lambda tx: _audit(tx, run_id, explanation), actor="system:approvals")
            return "approval.decided"

        @app.step(name="approvals.notify")
        async def notify(to: list[str], subject: str, text: str) -> mail.Sent | None:
            if self.mail is None or not to:
                return None
            return await self.mail.call(mail.SEND, {"to": to, "subject": subject, "text": text})

        @app.workflow(VOTE_WORKFLOW)
        async def vote(ctx: Context, ask: VoteInput) -> dict[str, Any]:
            seq = ctx.position[0] + 1
            escalation = (
                tasks.Escalation.reassign(users=ask.escalate_to, reason="approval SLA passed")
                if ask.escalate_to
                else None
            )
            answer = await ctx.human_task(
                "approval",
                title=(
                    f"Approve {ask.summary['type']} of {ask.summary['amount']} "
                    f"{ask.summary['currency']} for {ask.summary['requester']} ({ask.stage})"
                ),
                form=Vote,
                context=ask.summary,
                candidates=tasks.Assignees(users=[ask.approver]),
                due=None if ask.due_seconds is None else timedelta(seconds=ask.due_seconds),
                escalation=escalation,
                four_eyes=True,
            )
            outcome: dict[str, Any] = await ctx.step(task_outcome, f"{ctx.run_id}-t{seq}")
            return {
                "stage": ask.stage,
                "asked": ask.approver,
                **outcome,
                "approve": answer.approve,
                "comment": answer.comment,
            }

        async def run_stage(
            ctx: Context, stage: pol.Stage, summary: dict[str, Any]
        ) -> list[dict[str, Any]]:
            branches = [
                ctx_mod.Child(
                    VOTE_WORKFLOW,
                    VoteInput(
                        approver=user,
                        stage=stage.name,
                        summary=summary,
                        due_seconds=stage.due_seconds,
                        escalate_to=list(stage.escalate_to),
                    ),
                )
                for user in stage.users
            ]
            seq = ctx.position[0] + 1
            child_ids = [f"{ctx.run_id}-{seq}-{i}" for i in range(len(branches))]
            if stage.mode == "any":
                first = await ctx.wait_any(branches)  # the losers are cancelled
                return [first.value]
            # all-of: every task is open at once; the first vote comes from wait_any, the
            # others from their children's completion signals, which wait for us.
            first = await ctx.wait_any(branches, cancel_others=False)
            votes = [first.value]
            rest = [cid for i, cid in enumerate(child_ids) if i != first.index]
            while votes[-1]["approve"] and rest:
                done = await ctx.wait_signal(ctx_mod.CHILD_SIGNAL + rest.pop(0))
                if done.get("status") != "succeeded":
                    raise errors.StepFailed(
                        f"child:{VOTE_WORKFLOW}", seq, str(done.get("status")), str(done)
                    )
                votes.append(done["output"])
            if rest:
                _cancelled: list[str] = await ctx.step(cancel_votes, rest)
            return votes

        @app.workflow(REQUEST_WORKFLOW)
        async def request(ctx: Context, request: ApprovalRequest) -> dict[str, Any]:
            # Runs already past this point when it was added keep their recorded history.
            submitted = ctx.now() if ctx.version("time-to-decision", 1) else None
            loaded = await ctx.step(load_policy)
            policy = pol.parse(loaded["text"])
            checked = pol.check(
                policy,
                kind=request.type,
                amount=request.amount,
                currency=request.currency,
                cost_centre=request.cost_centre,
                requester=request.requester,
                vendor=request.vendor,
            )
            summary = _summary(request, checked.amount, policy.currency)
            approvals: list[dict[str, Any]] = []
            decision = "rejected" if checked.rejected else "approved"
            if not checked.rejected:
                for stage in checked.stages:
                    votes = await run_stage(ctx, stage, summary)
                    approvals.extend(votes)
                    if not all(v["approve"] for v in votes):
                        decision = "rejected"
                        break
            explanation: dict[str, Any] = {
                "decision": decision,
                "request": request.model_dump(mode="json"),
                "amount_in_policy_currency": checked.amount,
                "policy": {"name": loaded["name"], "hash": loaded["hash"]},
                "rules_fired": list(checked.fired),
                "chain": [dataclasses.asdict(s) for s in checked.stages],
                "approvals": approvals,
                "decided_at": ctx.now().isoformat(),
            }
            ctx.metric(decided, 1, type=request.type, decision=decision)
            if submitted is not None:
                at = datetime.fromisoformat(explanation["decided_at"])
                ctx.metric(time_to_decision, (at - submitted).total_seconds(), type=request.type)
            _recorded: str = await ctx.step(record_decision, ctx.run_id, explanation)
            to = sorted(set(request.notify) | set(self.notify))
            who = ", ".join(
                f"{a['approver']} ({'yes' if a['approve'] else 'no'})" for a in approvals
            )
            text = (
                f"Your {request.type} request of {request.amount} {request.currency} "
                f"({request.cost_centre}) was {decision}.\n"
                f"Rules: {'; '.join(f['rule'] + ': ' + f['detail'] for f in checked.fired)}\n"
                f"Approvers: {who or 'none'}\nPolicy: {loaded['name']} {loaded['hash'][:12]}\n"
                f"Reference: {ctx.run_id}\n"
            )
            sent: mail.Sent | None = await ctx.step(
                notify, to, f"Request {decision}: {request.type}", text
            )
            explanation["notified"] = None if sent is None else {"to": to, **sent.model_dump()}
            return explanation


async def _audit(tx: store_base.Tx, run_id: str, explanation: dict[str, Any]) -> None:
    """The explanation record, appended to the audit chain in its own transaction."""
    tx.audit("approval.decided", f"run:{run_id}", explanation)
