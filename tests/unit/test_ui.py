"""The web UI (`flowdesk.server.ui`) over HTTP, in process, on both stores: sign-in and
sessions, CSRF, what each role sees, the inbox, the invoice review page (context,
document preview, generated form, validation), run pages, dashboard and audit."""

from __future__ import annotations

import contextlib
import html
import io
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import ui_invoice

import flowdesk
from flowdesk import RunStatus
from flowdesk.documents import archive as archive_mod
from flowdesk.governance import audit as audit_log
from flowdesk.governance import identity
from flowdesk.server import app as server
from flowdesk.server.ui import preview
from flowdesk.store import audit as store_audit
from flowdesk.store import base, people, sql_models

BASE = "https://flowdesk.test"
_CSRF = re.compile(r'name="csrf" value="([^"]+)"')


@dataclass
class Env:
    app: flowdesk.App
    api: Any
    archive: archive_mod.Archive
    wait_until: Any
    wait_status: Any

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self.api), base_url=BASE, follow_redirects=False
        )

    async def review_task(self) -> tuple[str, str]:
        """Start an invoice run; its review task id once it is waiting for a person."""
        run = await self.app.start("ui_test.invoice", {"path": str(ui_invoice.SAMPLE)})

        async def found() -> str | None:
            page = await self.app.store.list_tasks(people.TaskQuery(run_id=run.id))
            return page.items[0].id if page.items else None

        task_id: str = await self.wait_until(found, what=f"the review task of {run.id}")
        return run.id, task_id


@pytest.fixture
async def env(app, tmp_path, wait_until, wait_status) -> AsyncIterator[Env]:
    archive = archive_mod.Archive(tmp_path / "documents")
    ui_invoice.register(app, archive)
    async with app:
        await ui_invoice.create_users(app)
        api = server.create_app(
            app,
            audit=audit_log.AuditLog(app, tmp_path / "audit.key"),
            documents=archive,
            session_key="test-session-key-0123456789",
        )
        async with app.worker(concurrency=4):
            yield Env(app, api, archive, wait_until, wait_status)


def csrf_of(page: httpx.Response) -> str:
    found = _CSRF.search(page.text)
    assert found, f"no CSRF token in {page.request.url}"
    return html.unescape(found.group(1))


async def sign_in(
    client: httpx.AsyncClient, user: str, password: str = ui_invoice.PASSWORD
) -> httpx.Response:
    form = await client.get("/ui/login")
    assert form.status_code == 200
    return await client.post(
        "/ui/login",
        data={"user": user, "password": password, "csrf": csrf_of(form), "next": "/ui/inbox"},
    )


@contextlib.asynccontextmanager
async def signed_in(env: Env, user: str) -> AsyncIterator[httpx.AsyncClient]:
    async with env.client() as client:
        r = await sign_in(client, user)
        assert r.status_code == 303, r.text
        yield client


def text_of(r: httpx.Response) -> str:
    """The page's visible text, roughly (tags dropped, whitespace folded)."""
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", r.text)).split())


# -- sign-in, sessions, CSRF -------------------------------------------------------------------


async def test_sign_in_opens_a_secure_session_and_refuses_wrong_passwords(env):
    async with env.client() as client:
        r = await client.get("/ui/inbox")
        assert r.status_code == 303 and r.headers["location"].startswith("/ui/login?next=")
        root = await client.get("/", headers={"Accept": "text/html"})
        assert root.status_code == 307 and root.headers["location"] == "/ui/"

        bad = await sign_in(client, "anna", "not the password")
        assert bad.status_code == 401 and "Unknown user or wrong password" in bad.text
        unknown = await sign_in(client, "nobody", ui_invoice.PASSWORD)
        assert unknown.status_code == 401 and "Unknown user or wrong password" in unknown.text
        assert "flowdesk_session" not in client.cookies

        ok = await sign_in(client, "anna")
        assert ok.status_code == 303 and ok.headers["location"] == "/ui/inbox"
        cookie = ok.headers["set-cookie"]
        assert "flowdesk_session=" in cookie
        for attribute in ("HttpOnly", "Secure", "SameSite=lax", "Path=/ui"):
            assert attribute.lower() in cookie.lower(), cookie
        inbox = await client.get("/ui/inbox")
        assert inbox.status_code == 200 and "anna" in inbox.text
        again = await client.get("/ui/login?next=/ui/audit")  # signed in: straight on
        assert again.status_code == 303 and again.headers["location"] == "/ui/audit"
        away = await client.get("/ui/login?next=https://evil.example/")
        assert away.headers["location"] == "/ui/inbox"  # never to another site

    rows = await env.app.store.audit_rows(0, 10_000)
    assert any(r[3] == "user.signed_in" and r[4] == "user:anna" for r in rows)


async def test_the_sign_in_form_needs_its_own_token(env):
    async with env.client() as client:
        r = await client.post(
            "/ui/login", data={"user": "anna", "password": ui_invoice.PASSWORD, "csrf": "forged"}
        )
        assert r.status_code == 403 and "flowdesk_session" not in client.cookies


async def test_posts_without_the_session_csrf_token_are_refused(env):
    _, task_id = await env.review_task()
    async with signed_in(env, "anna") as client:
        r = await client.post(f"/ui/tasks/{task_id}/claim", data={})
        assert r.status_code == 403 and "token" in text_of(r)
        r = await client.post(f"/ui/tasks/{task_id}/claim", data={"csrf": "wrong"})
        assert r.status_code == 403
        assert (await env.app.store.get_task(task_id)).assignee is None
        page = await client.get(f"/ui/tasks/{task_id}")
        r = await client.post(f"/ui/tasks/{task_id}/claim", data={"csrf": csrf_of(page)})
        assert r.status_code == 303
        assert (await env.app.store.get_task(task_id)).assignee == "anna"


async def test_sessions_end_on_the_server(env):
    async with signed_in(env, "anna") as client:
        cookie = client.cookies["flowdesk_session"]
        page = await client.get("/ui/inbox")
        r = await client.post("/ui/logout", data={"csrf": csrf_of(page)})
        assert r.status_code == 303
    async with env.client() as replay:  # the copied cookie is worthless after sign-out
        replay.cookies.set("flowdesk_session", cookie, domain="flowdesk.test", path="/ui")
        assert (await replay.get("/ui/inbox")).status_code == 303
        tampered = cookie[:-2] + ("AA" if not cookie.endswith("AA") else "BB")
        replay.cookies.set("flowdesk_session", tampered, domain="flowdesk.test", path="/ui")
        assert (await replay.get("/ui/inbox")).status_code == 303

    async with signed_in(env, "anna") as client:  # a new password ends sessions
        assert (await client.get("/ui/inbox")).status_code == 200
        await identity.Identity(env.app).set_password("anna", "another good password")
        assert (await client.get("/ui/inbox")).status_code == 303

    async with signed_in(env, "bob") as client:  # so does the expiry the store keeps
        assert (await client.get("/ui/inbox")).status_code == 200
        await env.app.submit(
            lambda tx: tx._run("UPDATE ui_sessions SET expires_at = 1 WHERE user_id = 'bob'")
        )
        assert (await client.get("/ui/inbox")).status_code == 303

    async def sessions() -> list[tuple[str, int]]:
        rows = await env.app.store._read("SELECT user_id, expires_at FROM ui_sessions")
        return sorted((str(r[0]), int(r[1])) for r in rows)

    assert ("bob", 1) in await sessions()  # kept a week after it ended, then forgotten:
    async with signed_in(env, "bob"):
        assert ("bob", 1) not in await sessions()

    async with signed_in(env, "vera") as client:  # and disabling the user
        await identity.Identity(env.app).update_user("vera", disabled=True)
        assert (await client.get("/ui/inbox")).status_code == 303


# -- what each role sees -----------------------------------------------------------------------


async def test_what_a_user_sees_follows_their_roles(env):
    run_id, task_id = await env.review_task()
    async with signed_in(env, "anna") as anna:
        inbox = await anna.get("/ui/inbox")
        assert 'href="/ui/runs"' not in inbox.text and 'href="/ui/audit"' not in inbox.text
        missing = await anna.get("/ui/no-such-page")
        assert missing.status_code == 404 and "There is no page at this address" in missing.text
        for path in ("/ui/runs", f"/ui/runs/{run_id}", "/ui/dashboard", "/ui/audit"):
            r = await anna.get(path)
            assert r.status_code == 403, path
            assert "Not allowed" in r.text and "operator" in text_of(r)
        r = await anna.post(f"/ui/runs/{run_id}/cancel", data={"csrf": csrf_of(inbox)})
        assert r.status_code == 403
        assert (await env.app.get_run(run_id)).status == RunStatus.WAITING

    async with signed_in(env, "bob") as bob:  # an approver of another group
        r = await bob.get(f"/ui/tasks/{task_id}")
        assert r.status_code == 403 and "not offered to you" in text_of(r)
        assert task_id not in (await bob.get("/ui/inbox")).text
        r = await bob.get(f"/ui/tasks/{task_id}/pages/1.png")
        assert r.status_code == 403

    async with signed_in(env, "vera") as vera:  # a viewer reads, never acts
        page = await vera.get(f"/ui/tasks/{task_id}")
        assert page.status_code == 200 and "Complete task" not in page.text
        r = await vera.post(
            f"/ui/tasks/{task_id}/complete", data={"csrf": csrf_of(page), "decision": "approve"}
        )
        assert r.status_code == 403
        assert "Send signal" not in (await vera.get(f"/ui/runs/{run_id}")).text

    async with signed_in(env, "olga") as olga:  # operators see and press the buttons
        page = await olga.get(f"/ui/runs/{run_id}")
        assert page.status_code == 200
        for button in ("Send signal", "Cancel run", "Retry from failed step"):
            assert button in page.text
        for path in ("/ui/dashboard", "/ui/audit", f"/ui/tasks/{task_id}"):
            assert (await olga.get(path)).status_code == 200, path


# -- inbox and the review task -----------------------------------------------------------------


async def test_the_inbox_shows_my_and_my_groups_tasks_overdue_first(env):
    _, first = await env.review_task()
    _, second = await env.review_task()
    await env.app.submit(  # the second one is overdue
        lambda tx: tx._run("UPDATE tasks SET due_at = 1000 WHERE id = ?", (second,))
    )
    async with signed_in(env, "anna") as anna:
        page = await anna.get("/ui/inbox")
        assert page.status_code == 200
        assert page.text.index(second) < page.text.index(first)
        assert "overdue" in text_of(page)
        overdue = await anna.get("/ui/inbox?overdue=true")
        assert second in overdue.text and first not in overdue.text
        mine = await anna.get("/ui/inbox?view=mine")
        assert first not in mine.text  # nobody claimed it yet
        groups = await anna.get("/ui/inbox?view=groups")
        assert first in groups.text and second in groups.text
        await anna.post(f"/ui/tasks/{first}/claim", data={"csrf": csrf_of(page)})
        assert first in (await anna.get("/ui/inbox?view=mine")).text
        bad = await anna.get("/ui/inbox?view=everything")
        assert bad.status_code == 422


async def test_the_review_page_shows_the_context_the_document_and_the_form(env):
    _, task_id = await env.review_task()
    task = await env.app.store.get_task(task_id)
    fields = task.context["fields"]
    async with signed_in(env, "anna") as anna:
        page = await anna.get(f"/ui/tasks/{task_id}")
        assert page.status_code == 200
        text = text_of(page)
        assert task.context["summary"] in text
        for reason in task.context["reasons"]:
            assert reason in text
        assert "review" in text and "72%" in text and "medium" in text  # the suggestion
        # every field is outlined where it was read, in percent of its page
        width, height = (task.context["document"]["pages"][0][k] for k in ("width", "height"))
        x0, y0 = fields["total"]["bbox"][:2]
        assert (
            f'data-box="total" style="left:{x0 / width * 100:.3f}%;top:{y0 / height * 100:.3f}%'
            in page.text
        )
        # the form is generated from the schema, prefilled from the extraction
        assert '<label for="f-vendor_name">' in page.text
        assert f'value="{fields["vendor_name"]["value"]}"' in page.text
        assert '<select id="f-decision" name="decision"' in page.text
        assert re.findall(r'<label for="([^"]+)"', page.text).count("f-total") == 1
        # each page of the document as a PNG, only through the task
        png = await anna.get(f"/ui/tasks/{task_id}/pages/1.png")
        assert png.status_code == 200 and png.headers["content-type"] == "image/png"
        assert png.content.startswith(b"\x89PNG\r\n\x1a\n")
        assert (await anna.get(f"/ui/tasks/{task_id}/pages/2.png")).status_code == 404
        original = await anna.get(f"/ui/tasks/{task_id}/document")
        assert original.content == ui_invoice.SAMPLE.read_bytes()


async def test_completing_validates_the_form_then_advances_the_run(env):
    run_id, task_id = await env.review_task()
    async with signed_in(env, "anna") as anna:
        page = await anna.get(f"/ui/tasks/{task_id}")
        token = csrf_of(page)
        bad = await anna.post(
            f"/ui/tasks/{task_id}/complete",
            data={
                "csrf": token,
                "decision": "",
                "vendor_name": "Dextal SARL",
                "invoice_number": "RE-12359",
                "total": "-5",
                "note": "",
            },
        )
        assert bad.status_code == 422
        text = text_of(bad)
        assert "Some fields need your attention" in text
        assert 'aria-invalid="true"' in bad.text
        assert 'id="f-total-err">Must be more than 0.<' in bad.text
        assert 'id="f-decision-err">Please choose.<' in bad.text
        assert 'value="-5"' in bad.text  # what was typed stays
        assert (await env.app.get_run(run_id)).status == RunStatus.WAITING
        notnumber = await anna.post(
            f"/ui/tasks/{task_id}/complete",
            data={
                "csrf": token,
                "decision": "approve",
                "vendor_name": "Dextal SARL",
                "invoice_number": "RE-12359",
                "total": "a lot",
            },
        )
        assert notnumber.status_code == 422 and "'a lot' is not a number" in text_of(notnumber)

        draft = await anna.post(
            f"/ui/tasks/{task_id}/complete",
            data={"csrf": token, "intent": "draft", "decision": "approve", "total": "51000"},
        )
        assert draft.status_code == 303
        assert (await env.app.store.get_task(task_id)).draft == {
            "decision": "approve",
            "total": 51000,
        }

        done = await anna.post(
            f"/ui/tasks/{task_id}/complete",
            data={
                "csrf": token,
                "decision": "approve",
                "vendor_name": "Dextal S.A.R.L.",
                "invoice_number": "RE-12359",
                "total": "51633.87",
                "note": "checked",
            },
        )
        assert done.status_code == 303 and done.headers["location"].endswith("?done=1")
        run = await env.wait_status(env.app, run_id, RunStatus.SUCCEEDED)
        assert run.output["vendor_name"] == "Dextal S.A.R.L." and run.output["total"] == 51633.87
        after = await anna.get(f"/ui/tasks/{task_id}")
        assert "Completed by anna" in text_of(after)
        progress = await anna.get(f"/ui/tasks/{task_id}/progress")
        assert 'id="run-status">succeeded' in progress.text
        assert "ui_test.post_invoice" in progress.text
        assert "hx-trigger" not in progress.text  # a finished run is not polled any more


async def test_whoever_asked_for_the_work_may_not_approve_it(env):
    token = store_audit.ACTOR.set("anna")  # anna started this run herself
    try:
        run = await env.app.start("ui_test.invoice", {"path": str(ui_invoice.SAMPLE)})
    finally:
        store_audit.ACTOR.reset(token)

    async def task_id() -> str | None:
        items = (await env.app.store.list_tasks(people.TaskQuery(run_id=run.id))).items
        return items[0].id if items else None

    found = await env.wait_until(task_id, what="the review task")
    async with signed_in(env, "anna") as anna:
        page = await anna.get(f"/ui/tasks/{found}")
        r = await anna.post(
            f"/ui/tasks/{found}/complete",
            data={
                "csrf": csrf_of(page),
                "decision": "approve",
                "vendor_name": "Dextal SARL",
                "invoice_number": "RE-12359",
                "total": "51633.87",
            },
        )
        assert r.status_code == 403 and "needs a second person" in text_of(r)
        assert 'value="51633.87"' in r.text  # the page stays as it was, with her values
    assert (await env.app.get_run(run.id)).status == RunStatus.WAITING


async def test_the_invoice_assistants_own_review_form(env):
    run = await env.app.start("ui_test.assistant_form", {"path": str(ui_invoice.SAMPLE)})

    async def task_id() -> str | None:
        items = (await env.app.store.list_tasks(people.TaskQuery(run_id=run.id))).items
        return items[0].id if items else None

    found = await env.wait_until(task_id, what="the review task")
    async with signed_in(env, "anna") as anna:
        page = await anna.get(f"/ui/tasks/{found}")
        assert page.status_code == 200
        for label in ("Vendor tax ID", "Invoice date", "PO number", "IBAN", "Total"):
            assert f">{label}</label>" in page.text or f">{label} <" in page.text, label
        assert re.search(
            r'id="f-invoice_date" name="invoice_date"[^>]*value="2024-03-20"', page.text
        )
        token = csrf_of(page)
        # the form's own rule (approving needs a total) comes back as a message
        r = await anna.post(
            f"/ui/tasks/{found}/complete",
            data={
                "csrf": token,
                "decision": "approve",
                "vendor_name": "Dextal SARL",
                "invoice_number": "RE-12359",
                "invoice_date": "2024-03-20",
                "currency": "EUR",
                "total": "",
            },
        )
        assert r.status_code == 422 and "to approve, fill in: total" in text_of(r)
        r = await anna.post(
            f"/ui/tasks/{found}/complete",
            data={
                "csrf": token,
                "decision": "approve",
                "vendor_name": "Dextal SARL",
                "invoice_number": "RE-12359",
                "invoice_date": "2024-03-20",
                "currency": "EUR",
                "total": "51633.87",
                "comment": "ok",
            },
        )
        assert r.status_code == 303, text_of(r)
    done = await env.wait_status(env.app, run.id, RunStatus.SUCCEEDED)
    assert done.output["total"] == "51633.87" and done.output["invoice_date"] == "2024-03-20"


async def test_claim_delegate_and_comment(env):
    _, task_id = await env.review_task()
    async with signed_in(env, "anna") as anna:
        token = csrf_of(await anna.get(f"/ui/tasks/{task_id}"))
        assert (
            await anna.post(f"/ui/tasks/{task_id}/claim", data={"csrf": token})
        ).status_code == 303
        r = await anna.post(
            f"/ui/tasks/{task_id}/comment", data={"csrf": token, "text": "VAT looks off"}
        )
        assert r.status_code == 303
        empty = await anna.post(f"/ui/tasks/{task_id}/comment", data={"csrf": token, "text": " "})
        assert empty.status_code == 422 and "empty comment" in text_of(empty)
        nobody = await anna.post(
            f"/ui/tasks/{task_id}/delegate", data={"csrf": token, "to": "ghost"}
        )
        assert nobody.status_code == 422
        r = await anna.post(f"/ui/tasks/{task_id}/delegate", data={"csrf": token, "to": "vera"})
        assert r.status_code == 303
    task = await env.app.store.get_task(task_id)
    assert task.assignee == "vera"
    async with signed_in(env, "olga") as olga:
        page = text_of(await olga.get(f"/ui/tasks/{task_id}"))
        assert "VAT looks off" in page and "delegated" in page


async def test_a_task_with_a_free_form_context_is_shown_as_key_values(env):
    run = await env.app.start("ui_test.ask")

    async def task_id() -> str | None:
        items = (await env.app.store.list_tasks(people.TaskQuery(run_id=run.id))).items
        return items[0].id if items else None

    found = await env.wait_until(task_id, what="the escalation task")
    async with signed_in(env, "anna") as anna:
        r = await anna.get(f"/ui/tasks/{found}")
        assert r.status_code == 200
        text = text_of(r)
        assert "Refund for order 1234" in text and "Customer ACME" in text and "99.5" in text
        assert "Source document" not in text and "data-box" not in r.text
        assert "<script>alert" not in r.text  # what a context says is text, never markup
        assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in r.text


def test_page_previews_of_pdfs_and_scans(tmp_path):
    from PIL import Image

    archive = archive_mod.Archive(tmp_path)
    for name, pages in (
        ("inv-2025-0001-L1-fr_FR.pdf", 1),
        ("inv-2025-0001-L1-fr_FR.scan.jpg", 1),
        ("inv-2025-0002-L2-de_DE.scan.png", 1),
        ("inv-2025-0005-L5-de_DE.scan.tiff", 2),
        ("inv-2025-0004-L4-fr_FR.scan.pdf", 1),
    ):
        doc_id = archive.put((ui_invoice.DATA / name).read_bytes())
        for page in range(1, pages + 1):
            png = preview.render(archive, doc_id, page)
            with Image.open(io.BytesIO(png)) as image:
                assert image.format == "PNG" and image.width == preview.WIDTH, name
                assert 1.2 < image.height / image.width < 1.6, name  # an A4 page
        with pytest.raises(preview.NoPreview, match=f"has {pages} page"):
            preview.render(archive, doc_id, pages + 1)
    with pytest.raises(preview.NoPreview):
        preview.render(archive, "0" * 64, 1)
    with pytest.raises(preview.NoPreview):
        preview.render(archive, "../../etc/passwd", 1)


# -- runs, dashboard, audit --------------------------------------------------------------------


async def test_runs_list_filters_and_a_failed_runs_timeline(env):
    broken = await env.app.start("ui_test.broken")
    await env.wait_status(env.app, broken.id, RunStatus.FAILED)
    waiting, _ = await env.review_task()
    async with signed_in(env, "olga") as olga:
        every = await olga.get("/ui/runs")
        assert broken.id in every.text and waiting in every.text
        failed = await olga.get("/ui/runs?status=failed")
        assert broken.id in failed.text and waiting not in failed.text
        by_flow = await olga.get("/ui/runs?workflow=ui_test.invoice&since=15m")
        assert waiting in by_flow.text and broken.id not in by_flow.text
        page = await olga.get(f"/ui/runs/{broken.id}")
        text = text_of(page)
        # Without payload:read an operator sees what failed, not the failure's payload.
        assert "RuntimeError" in text and "ui_test.boom" in text
        assert "the ledger refused the posting" not in text
        assert 'File "' not in text  # no line of the traceback either
        assert "needs the payload:read permission" in text
        token = csrf_of(page)
        before = (await env.app.get_run(broken.id)).attempts
        r = await olga.post(f"/ui/runs/{broken.id}/retry", data={"csrf": token})
        assert r.status_code == 303

        async def failed_again() -> bool:
            run = await env.app.get_run(broken.id)
            return run.status == RunStatus.FAILED and run.attempts > before

        await env.wait_until(failed_again, what="the retried run to fail again")

        timeline = await olga.get(f"/ui/runs/{waiting}")
        assert "human task" in text_of(timeline) and "invoice-review" in timeline.text
        r = await olga.post(
            f"/ui/runs/{waiting}/signal", data={"csrf": token, "name": "poke", "payload": "{bad"}
        )
        assert r.status_code == 409 and "not valid JSON" in text_of(r)
        r = await olga.post(
            f"/ui/runs/{waiting}/cancel", data={"csrf": token, "reason": "duplicate"}
        )
        assert r.status_code == 303
        await env.wait_status(env.app, waiting, RunStatus.CANCELLED)
    # An admin holds payload:read: the error and its traceback, and the read is audited.
    async with signed_in(env, "root") as root:
        text = text_of(await root.get(f"/ui/runs/{broken.id}"))
        assert "RuntimeError: the ledger refused the posting" in text and "Traceback" in text
    reads = [r for r in await env.app.store.audit_rows(0, 100_000) if r[3] == "payload.read"]
    assert reads and reads[-1][2] == "root" and reads[-1][4] == f"run:{broken.id}"


async def test_model_calls_show_on_the_run_and_the_dashboard(env):
    run_id, _ = await env.review_task()
    now = base.now_ms()
    calls = [
        sql_models.LedgerRow(
            at=now,
            run_id=run_id,
            seq=1,
            workflow="ui_test.invoice",
            task="invoice.classify",
            model="local:clf",
            provider="local",
            version="v1",
            role="current",
            status="ok",
            error=None,
            tokens_in=120,
            tokens_out=3,
            cost_usd=cost,
            latency_ms=latency,
            confidence=confidence,
        )
        for cost, latency, confidence in ((0.0012, 42.0, 0.87), (0.0008, 58.0, 0.31))
    ]
    await env.app.submit(lambda tx: sql_models.models_tx(tx).record_model_calls(calls))
    async with signed_in(env, "olga") as olga:
        page = text_of(await olga.get(f"/ui/runs/{run_id}"))
        assert "model invoice.classify · local:clf · 42 ms · confidence 87% · $0.00120" in page
        assert "confidence 31%" in page and "$0.0020" in page  # the run's total
        board = await olga.get("/ui/dashboard?window=15m")
        text = text_of(board)
        assert "invoice.classify · local:clf 2 42 ms 58 ms 58 ms" in text  # p50 p95 p99
        assert "invoice.classify 2 $0.0020 $0.00100" in text  # calls, total, per call
        assert "ui_test.invoice 1 $0.00200" in text  # per run
        assert "Model confidence of 2 answers" in board.text


async def test_dashboard_and_audit_pages(env):
    run_id, task_id = await env.review_task()
    broken = await env.app.start("ui_test.broken")
    await env.wait_status(env.app, broken.id, RunStatus.FAILED)
    async with signed_in(env, "olga") as olga:
        board = await olga.get("/ui/dashboard?window=15m")
        assert board.status_code == 200
        assert re.search(r'id="stat-failed">1<', board.text)
        assert re.search(r'id="stat-backlog">1<', board.text)
        assert '<svg class="chart"' in board.text and "Runs per minute" in board.text
        assert "ui_test.read_invoice" in board.text  # step latency table
        panels = await olga.get("/ui/dashboard/panels?window=1h")
        assert panels.status_code == 200 and "<html" not in panels.text

        audit = await olga.get("/ui/audit")
        assert audit.status_code == 200 and "task.created" in audit.text
        only = await olga.get("/ui/audit?actor=olga&action=user.signed")
        assert "user.signed_in" in only.text and "task.created" not in only.text
        verdict = await olga.post("/ui/audit/verify", data={"csrf": csrf_of(audit)})
        assert verdict.status_code == 200 and "The chain is intact" in verdict.text

        await env.app.submit(  # now break it, as an intruder editing the table would
            lambda tx: tx._run("UPDATE audit SET actor = 'mallory' WHERE seq = 2")
        )
        verdict = await olga.post("/ui/audit/verify", data={"csrf": csrf_of(audit)})
        assert "The chain is broken at record #2" in text_of(verdict)


async def test_an_erased_subjects_run_shows_its_metadata_and_erased_payloads(env):
    from flowdesk.governance import privacy

    broken = await env.app.start("ui_test.broken", subjects=["customer:9"])
    await env.wait_status(env.app, broken.id, RunStatus.FAILED)
    await privacy.erase(env.app, "customer:9", reason="request 17", actor="root")
    async with signed_in(env, "root") as root:
        text = text_of(await root.get(f"/ui/runs/{broken.id}"))
    assert "ui_test.broken" in text and "failed" in text and "ui_test.boom" in text
    assert "$erased" in text and "the ledger refused the posting" not in text
