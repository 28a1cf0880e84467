"""The approvals assistant (`flowdesk.assistants.approvals`) on both stores: policy checks
as data, sequential and parallel (any-of, all-of) approval stages, four-eyes, delegation,
SLA escalation, the explanation record (run output and audit record), the e-mail through a
real local SMTP server (aiosmtpd), a policy changed while a request is in flight, and the
whole path from an HTTP request to the final record with decisions made through the API."""

from __future__ import annotations

import asyncio
import email
import email.message
import email.policy
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session

import flowdesk
from flowdesk import RunStatus, errors
from flowdesk.assistants import approvals_policy as pol
from flowdesk.assistants.approvals import ApprovalRequest, Approvals
from flowdesk.connectors import base
from flowdesk.connectors import email as mail
from flowdesk.governance import audit as audit_log
from flowdesk.governance import identity
from flowdesk.humans.inbox import Inbox
from flowdesk.server import app as server
from flowdesk.store.people import Person

POLICY = Path(__file__).parents[2] / "data" / "approvals" / "policy.toml"


class Box:
    def __init__(self) -> None:
        self.messages: list[email.message.EmailMessage] = []

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        parsed = email.message_from_bytes(
            envelope.original_content or b"", policy=email.policy.default
        )
        assert isinstance(parsed, email.message.EmailMessage)
        self.messages.append(parsed)
        return "250 2.0.0 accepted"


@pytest.fixture
async def smtp_port() -> AsyncIterator[tuple[Box, int]]:
    box = Box()
    loop = asyncio.get_running_loop()
    srv = await loop.create_server(lambda: SMTP(box, hostname="mx.flowdesk.test"), "127.0.0.1", 0)
    try:
        yield box, srv.sockets[0].getsockname()[1]
    finally:
        srv.close()
        await srv.wait_closed()


def assistant(app: flowdesk.App, port: int, policy: Path = POLICY) -> Approvals:
    smtp = mail.SmtpConnector(
        "approvals-mail",
        app,
        "127.0.0.1",
        port,
        sender="approvals@flowdesk.test",
        security="none",
        timeout=10,
        retry=base.TransportRetry(retries=2, delay=0.01),
    )
    return Approvals(app, policy, mail_connector=smtp, notify=["finance@flowdesk.test"])


def request(**kw: Any) -> ApprovalRequest:
    base_req: dict[str, Any] = {
        "type": "purchase",
        "amount": 500,
        "currency": "EUR",
        "cost_centre": "CC-100",
        "requester": "olga",
        "justification": "New laptop",
        "notify": ["olga@flowdesk.test"],
    }
    return ApprovalRequest(**{**base_req, **kw})


async def open_tasks(app: flowdesk.App, wait_until: Any, n: int) -> list[Any]:
    async def found() -> list[Any] | None:
        page = await Inbox(app).tasks(status=["open", "claimed"])
        return page.items if len(page.items) == n else None

    result: list[Any] = await wait_until(found, what=f"{n} open tasks")
    return result


# -- the policy as data (no store) -----------------------------------------------------------
def test_policy_checks_fire_in_order_and_explain_themselves() -> None:
    policy = pol.parse(POLICY.read_text())
    small = pol.check(
        policy, kind="purchase", amount=500, currency="EUR", cost_centre="CC-100", requester="olga"
    )
    assert not small.rejected and [s.name for s in small.stages] == ["manager"]
    mid = pol.check(
        policy, kind="expense", amount=5000, currency="USD", cost_centre="CC-100", requester="anna"
    )
    assert [f["rule"] for f in mid.fired] == [
        "currency",
        "budget",
        "threshold:1",
        "separation_of_duties",
    ]
    assert mid.amount == 4600.0 and mid.stages[0].users == ("bob",)  # anna cannot approve
    assert [(s.name, s.mode) for s in mid.stages] == [("manager", "any"), ("finance", "all")]
    big = pol.check(
        policy, kind="purchase", amount=30000, currency="EUR", cost_centre="CC-100", requester="x"
    )
    assert [s.name for s in big.stages] == ["manager", "finance", "cfo"]
    for kw, rule in [
        ({"vendor": "shady supplies ltd"}, "blocked_vendor"),
        ({"cost_centre": "CC-200", "amount": 6000}, "over_budget"),
        ({"currency": "JPY"}, "unknown_currency"),
        ({"cost_centre": "CC-999"}, "unknown_cost_centre"),
    ]:
        args: dict[str, Any] = {
            "kind": "purchase",
            "amount": 500,
            "currency": "EUR",
            "cost_centre": "CC-100",
            "requester": "x",
            **kw,
        }
        found = pol.check(policy, **args)
        assert found.rejected and found.fired[-1]["rule"] == rule, found
    with pytest.raises(errors.ConfigurationError, match="mode"):
        pol.parse('[[rule]]\n[[rule.stage]]\nmode = "most"\nusers = ["a"]\n')


# -- 7: from an HTTP request to the final record, decisions through the REST API -------------
async def test_request_to_decision_through_the_rest_api(
    app, smtp_port, tmp_path, wait_until, wait_status
) -> None:
    box, port = smtp_port
    assistant(app, port)
    async with app:
        ids = identity.Identity(app)
        tokens = {}
        for uid, roles in [
            ("olga", ["operator"]),
            ("bob", ["approver"]),
            ("anna", ["approver"]),
            ("fiona", ["approver"]),
            ("owen", ["approver"]),
            ("dave", ["approver"]),
        ]:
            await ids.create_user(uid, roles=roles)
            tokens[uid] = (await ids.create_token(uid))[1]
        api = server.create_app(app, audit=audit_log.AuditLog(app, tmp_path / "audit.key"))
        async with (
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=api), base_url="http://t"
            ) as client,
            app.worker(concurrency=20),
        ):

            def h(who: str) -> dict[str, str]:
                return {"Authorization": f"Bearer {tokens[who]}"}

            r = await client.post(
                "/approvals",
                headers=h("olga"),
                json={
                    "type": "purchase",
                    "amount": 5000,
                    "currency": "EUR",
                    "cost_centre": "CC-100",
                    "justification": "Two servers",
                    "vendor": "Good Parts",
                    "notify": ["olga@flowdesk.test"],
                },
            )
            assert r.status_code == 201, r.text
            run_id = r.json()["run_id"]
            # stage 1, any-of: anna and bob are asked at once
            manager = await open_tasks(app, wait_until, 2)
            assert sorted(u for t in manager for u in t.users) == ["anna", "bob"]
            bob_task = next(t for t in manager if t.users == ["bob"])
            # four-eyes: the requester (an operator, who may act on any task) cannot approve
            r = await client.post(
                f"/tasks/{bob_task.id}/complete",
                headers=h("olga"),
                json={"data": {"approve": True}},
            )
            assert r.status_code == 403 and r.json()["error"] == "FourEyesViolation", r.text
            r = await client.post(
                f"/tasks/{bob_task.id}/complete",
                headers=h("bob"),
                json={"data": {"approve": True, "comment": "ok"}},
            )
            assert r.status_code == 200, r.text

            # stage 2, all-of: fiona and owen both have an open task at the same time
            async def finance() -> list[Any] | None:
                page = await Inbox(app).tasks(status=["open", "claimed"])
                items = [t for t in page.items if t.users[0] in ("fiona", "owen")]
                return items if len(items) == 2 else None

            tasks_now = await wait_until(finance, what="both finance tasks open")
            anna_task = await Inbox(app).get(next(t for t in manager if t.users == ["anna"]).id)
            assert anna_task.status == "cancelled"  # the any-of loser
            fiona_task = next(t for t in tasks_now if t.users == ["fiona"])
            owen_task = next(t for t in tasks_now if t.users == ["owen"])
            # delegation: fiona hands hers to dave, who decides
            r = await client.post(
                f"/tasks/{fiona_task.id}/delegate", headers=h("fiona"), json={"user": "dave"}
            )
            assert r.status_code == 200, r.text
            r = await client.post(
                f"/tasks/{fiona_task.id}/complete",
                headers=h("dave"),
                json={"data": {"approve": True}},
            )
            assert r.status_code == 200, r.text
            assert (
                await app.get_run(run_id)
            ).status is not RunStatus.SUCCEEDED  # owen still to vote
            r = await client.post(
                f"/tasks/{owen_task.id}/complete",
                headers=h("owen"),
                json={"data": {"approve": True}},
            )
            assert r.status_code == 200, r.text
            run = await wait_status(app, run_id, RunStatus.SUCCEEDED)
            metrics = (await client.get("/metrics")).text
    # the business metrics the assistant declares
    assert 'approvals_decisions_total{decision="approved",type="purchase"} 1.0' in metrics
    assert 'approvals_time_to_decision_seconds_count{type="purchase"} 1.0' in metrics
    out = run.output
    assert out["decision"] == "approved"
    assert out["request"]["requester"] == "olga"
    assert out["policy"]["hash"] == pol.policy_hash(POLICY.read_text())
    assert [f["rule"] for f in out["rules_fired"]] == ["budget", "threshold:1"]
    assert [(a["stage"], a["approver"], a["approve"]) for a in out["approvals"]] == [
        ("manager", "bob", True),
        ("finance", "dave", True),
        ("finance", "owen", True),
    ]
    assert all(a["at"] for a in out["approvals"])
    async with flowdesk.App(app.database_url) as reader:
        rows = await reader.store.audit_rows(0, 10_000, f"run:{run_id}")
    decided = [json.loads(r[5]) for r in rows if r[3] == "approval.decided"]
    assert len(decided) == 1 and decided[0]["decision"] == "approved"
    assert decided[0]["approvals"] == out["approvals"]
    assert len(box.messages) == 1
    msg = box.messages[0]
    assert msg["Subject"] == "Request approved: purchase"
    assert sorted(a.strip() for a in str(msg["To"]).split(",")) == [
        "finance@flowdesk.test",
        "olga@flowdesk.test",
    ]
    assert "bob (yes)" in msg.get_content() and run_id in msg.get_content()
    assert out["notified"]["message_id"] == str(msg["Message-ID"])


# -- all-of rejection, blocked vendor ---------------------------------------------------------
async def test_a_rejection_in_an_all_of_stage_decides_and_cancels_the_other_vote(
    app, smtp_port, wait_until, wait_status
) -> None:
    box, port = smtp_port
    approvals = assistant(app, port)
    inbox = Inbox(app)
    async with app, app.worker():
        run = await approvals.submit(request(amount=2000))
        manager = await open_tasks(app, wait_until, 2)
        await inbox.complete(manager[0].id, Person(id=manager[0].users[0]), {"approve": True})

        async def finance() -> list[Any] | None:
            items = [
                t
                for t in (await inbox.tasks(status=["open"])).items
                if t.users[0] in ("fiona", "owen")
            ]
            return items if len(items) == 2 else None

        fiona, owen = sorted(await wait_until(finance), key=lambda t: t.users[0])
        await inbox.complete(
            owen.id, Person(id="owen"), {"approve": False, "comment": "no budget this quarter"}
        )
        done = await wait_status(app, run.id, RunStatus.SUCCEEDED)
        assert (await inbox.get(fiona.id)).status == "cancelled"
        blocked = await approvals.submit(request(vendor="Shady Supplies Ltd"))
        refused = await wait_status(app, blocked.id, RunStatus.SUCCEEDED)
    assert done.output["decision"] == "rejected"
    assert done.output["approvals"][-1] == {
        **done.output["approvals"][-1],
        "approver": "owen",
        "approve": False,
    }
    assert refused.output["decision"] == "rejected" and refused.output["approvals"] == []
    assert refused.output["rules_fired"][-1]["rule"] == "blocked_vendor"
    assert [m["Subject"] for m in box.messages] == ["Request rejected: purchase"] * 2


# -- SLA escalation ---------------------------------------------------------------------------
async def test_an_overdue_approval_is_escalated_to_the_stand_in(
    app, smtp_port, tmp_path, wait_until, wait_status
) -> None:
    _, port = smtp_port
    policy = tmp_path / "sla.toml"
    policy.write_text(
        'name = "sla"\n[budgets]\nCC-100 = 1000\n[[rule]]\n[[rule.stage]]\nname = "manager"\n'
        'users = ["anna"]\ndue_seconds = 0.3\nescalate_to = ["carl"]\n'
    )
    approvals = assistant(app, port, policy)
    inbox = Inbox(app)
    async with app, app.worker():
        run = await approvals.submit(request())
        (task,) = await open_tasks(app, wait_until, 1)
        assert task.users == ["anna"]

        async def escalated() -> Any:
            t = await inbox.get(task.id)
            return t if t.escalation_level >= 1 else None

        moved = await wait_until(escalated, what="the task escalated")
        assert "carl" in moved.users
        await inbox.complete(task.id, Person(id="carl"), {"approve": True})
        done = await wait_status(app, run.id, RunStatus.SUCCEEDED)
    (vote,) = done.output["approvals"]
    assert (vote["asked"], vote["approver"], vote["escalation_level"]) == ("anna", "carl", 1)


# -- 6: a policy change applies to new requests only -------------------------------------------
async def test_a_policy_change_applies_to_new_requests_while_old_ones_finish_under_theirs(
    app, smtp_port, tmp_path, wait_until, wait_status
) -> None:
    _, port = smtp_port
    policy = tmp_path / "policy.toml"
    old = (
        'name = "v1"\n[budgets]\nCC-100 = 1000\n[[rule]]\n[[rule.stage]]\n'
        'name = "manager"\nusers = ["anna"]\n'
    )
    new = old.replace('"v1"', '"v2"').replace('users = ["anna"]', 'users = ["cfo"]')
    policy.write_text(old)
    approvals = assistant(app, port, policy)
    inbox = Inbox(app)
    async with app, app.worker():
        first = await approvals.submit(request())
        (task_a,) = await open_tasks(app, wait_until, 1)
        policy.write_text(new)  # edited while the first request waits
        second = await approvals.submit(request())
        tasks_now = await open_tasks(app, wait_until, 2)
        task_b = next(t for t in tasks_now if t.id != task_a.id)
        assert (task_a.users, task_b.users) == (["anna"], ["cfo"])
        await inbox.complete(task_a.id, Person(id="anna"), {"approve": True})
        a = await wait_status(app, first.id, RunStatus.SUCCEEDED)
        await inbox.complete(task_b.id, Person(id="cfo"), {"approve": True})
        b = await wait_status(app, second.id, RunStatus.SUCCEEDED)
    assert (a.output["policy"]["name"], a.output["policy"]["hash"]) == ("v1", pol.policy_hash(old))
    assert (b.output["policy"]["name"], b.output["policy"]["hash"]) == ("v2", pol.policy_hash(new))
    assert [v["approver"] for v in a.output["approvals"]] == ["anna"]
    assert [v["approver"] for v in b.output["approvals"]] == ["cfo"]
    # the text the first run decided under is in its history, not re-read from the file
    steps = await app.steps(first.id)
    assert any(s.name == "approvals.load_policy" for s in steps)
