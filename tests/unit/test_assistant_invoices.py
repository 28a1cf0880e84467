"""The invoice assistant (`flowdesk.assistants.invoices`) end to end, on both stores: real
sample invoices (PDFs from the fixed-seed set in tests/data/invoices), the real extractor,
a real risk classifier (TF-IDF, trained here on data/invoices/risk.csv) behind the model
gateway, an ERP database of the test's own store kind (a SQLite file, or a PostgreSQL
database) written through the SQL connector, and the REST API in process."""

from __future__ import annotations

import asyncio
import email.message
import json
from collections.abc import AsyncIterator, Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from httpserver import serving
from reportlab.lib.pdfencrypt import StandardEncryption
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from test_documents_bad_input import bomb_png, pdf_with_text

import flowdesk
from flowdesk import RunStatus
from flowdesk.assistants import invoices as inv
from flowdesk.connectors import sql
from flowdesk.documents.archive import Archive
from flowdesk.engine import tasks
from flowdesk.governance import audit as audit_log
from flowdesk.governance import identity
from flowdesk.humans.inbox import Inbox
from flowdesk.models.gateway import Gateway
from flowdesk.server import app as server
from flowdesk.store.people import Person

ROOT = Path(__file__).parents[2]
SAMPLES = ROOT / "tests" / "data" / "invoices"
CLEAN = "inv-2025-0012-L4-en_IE"  # a PO, an IBAN, EUR 6,099.18
OTHER = "inv-2025-0002-L2-de_DE"  # no PO; its vendor is not in the test's vendor master


def truth(key: str) -> dict[str, Any]:
    fields: dict[str, Any] = json.loads((SAMPLES / f"{key}.json").read_text())["fields"]
    return fields


# -- pure parts ---------------------------------------------------------------------------------
def test_the_sample_risk_data_is_the_one_shipped_and_the_rule_it_encodes() -> None:
    shipped = (ROOT / "data" / "invoices" / "risk.csv").read_text(encoding="utf-8").splitlines()
    assert shipped[0] == "text,label"
    assert [tuple(line.rsplit(",", 1)) for line in shipped[1:]] == inv.sample_risk_examples()
    assert inv._judge({"vendor_known", "iban_changed", "po_match"}) == "high"
    assert inv._judge({"vendor_unknown", "iban_ok", "po_match"}) == "medium"
    assert inv._judge({"vendor_known", "iban_ok", "po_match", "amount_1k_10k"}) == "low"


def _field(value: Any, confidence: float = 0.95) -> dict[str, Any]:
    return {"value": value, "confidence": confidence, "page": 1, "bbox": [0, 0, 1, 1]}


def test_policy_names_every_reason_a_person_must_look() -> None:
    fields = {name: _field(v) for name, v in truth(CLEAN).items()}
    found = {"vendor": {"id": "V1"}, "purchase_order": {"number": "4500030877"}, "known": []}
    low = {"label": "low", "confidence": 0.9}
    policy = inv.InvoicePolicy()
    assert inv.decide(policy, fields, [], found, low) == inv.Decision(auto=True, reasons=[])
    fields["total"] = _field("6099.18", 0.4)
    errors_ = [{"code": "iban_changed", "severity": "error", "message": "the IBAN changed"}]
    decision = inv.decide(
        policy, fields, errors_, {**found, "vendor": None}, {"label": "high", "confidence": 0.8}
    )
    assert not decision.auto
    assert decision.reasons == [
        "the IBAN changed",
        "vendor 'Calric Consulting DAC' is not in the vendor master",
        "read with low confidence: total",
        "the risk model rates it high (80%)",
    ]
    assert "total 6099.18 is at or above" in " ".join(
        inv.decide(inv.InvoicePolicy(max_total=Decimal(5000)), fields, [], found, low).reasons
    )


def test_the_review_form_refuses_an_approval_without_the_ledger_fields() -> None:
    with pytest.raises(ValueError, match="to approve, fill in: invoice_number, total"):
        inv.InvoiceReview(decision="approve", vendor_name="X", invoice_date="2025-01-02",
                          currency="EUR")  # fmt: skip
    with pytest.raises(ValueError, match="total"):
        inv.InvoiceReview(decision="reject", total="12,50")
    assert inv.InvoiceReview(decision="reject").decision == "reject"


def test_attachments_of_an_email() -> None:
    raw = _email(("a.pdf", (SAMPLES / f"{CLEAN}.pdf").read_bytes()), ("notes.txt", b"hello"))
    assert [name for name, _ in inv.attachments(raw)] == ["a.pdf"]
    with pytest.raises(flowdesk.errors.DocumentError, match="not an e-mail"):
        inv.attachments(b"\x00\x01 not mail")


def _email(*files: tuple[str, bytes]) -> bytes:
    msg = email.message.EmailMessage()
    msg["From"] = "billing@vendor.example"
    msg["To"] = "invoices@buyer.example"
    msg["Subject"] = "Invoices"
    msg.set_content("Please find our invoices attached.")
    for name, data in files:
        if name.endswith(".pdf"):
            msg.add_attachment(data, maintype="application", subtype="pdf", filename=name)
        else:
            msg.add_attachment(data, maintype="text", subtype="plain", filename=name)
    return msg.as_bytes()


# -- the assistant on a real ERP database ---------------------------------------------------------
@pytest.fixture(scope="module")
def risk_toml(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("risk-model")
    config = folder / "models.toml"
    config.write_text(inv.train_risk_model(ROOT / "data" / "invoices" / "risk.csv", folder))
    return config


class FlakyErp(inv.Erp):
    """Loses the answer of its first post after the row is written: a crash between the
    ERP's commit and the step's record."""

    posts = 0

    async def post(self, row: inv.ApRow, key: str) -> dict[str, Any]:
        written = await super().post(row, key)
        type(self).posts += 1
        if type(self).posts == 1:
            raise ConnectionResetError("the ERP connection dropped after the commit")
        return written


@pytest.fixture
async def erp(app: flowdesk.App, new_db_url: Callable[..., str]) -> AsyncIterator[inv.Erp]:
    FlakyErp.posts = 0
    async with sql.SqlConnector("erp", app, new_db_url(migrated=False)) as connector:
        erp = FlakyErp(connector)
        await erp.create_tables()
        facts = truth(CLEAN)
        await erp.add_vendor(
            "V-100", facts["vendor_name"], tax_id=facts["vendor_tax_id"], iban=facts["iban"]
        )
        await erp.add_purchase_order(facts["po_number"], Decimal(facts["total"]), "EUR", "V-100")
        yield erp


@pytest.fixture
def build(
    app: flowdesk.App, risk_toml: Path, erp: inv.Erp, tmp_path: Path
) -> Callable[..., inv.Invoices]:
    def make(**kw: Any) -> inv.Invoices:
        app.gateway = Gateway.from_toml(risk_toml)
        kw.setdefault("reviewers", tasks.Assignees(groups=["ap"]))
        return inv.Invoices(app, Archive(tmp_path / "documents"), erp, **kw)

    return make


async def _api(app: flowdesk.App, tmp_path: Path) -> tuple[httpx.AsyncClient, dict[str, str]]:
    ids = identity.Identity(app)
    await ids.create_user("olga", roles=["operator"])
    await ids.create_user("rita", roles=["approver"], groups=["ap"])
    api = server.create_app(app, audit=audit_log.AuditLog(app, tmp_path / "audit.key"))
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=api), base_url="http://t")
    tokens = {u: (await ids.create_token(u))[1] for u in ("olga", "rita")}
    return client, {u: f"Bearer {t}" for u, t in tokens.items()}


async def test_a_clean_invoice_is_posted_once_without_a_person(
    app, build, erp, tmp_path, wait_status
) -> None:
    invoices = build()
    data = (SAMPLES / f"{CLEAN}.pdf").read_bytes()
    try:
        async with app, app.worker(concurrency=4):
            client, auth = await _api(app, tmp_path)
            async with client:
                send = {"headers": {"Authorization": auth["olga"],
                                    "Content-Type": "application/pdf"}}  # fmt: skip
                r = await client.post("/invoices?name=calric.pdf", content=data, **send)
                assert r.status_code == 201, r.text
                (run,) = r.json()["runs"]
                assert run["created"] and run["name"] == "calric.pdf"
                again = await client.post("/invoices?name=copy.pdf", content=data, **send)
                assert again.json()["runs"][0]["run_id"] == run["run_id"]
                assert not again.json()["runs"][0]["created"]
                # what is refused, and why
                bad = await client.post(
                    "/invoices", content=b"a,b\n", headers={**send["headers"],
                                                            "Content-Type": "text/csv"}
                )  # fmt: skip
                assert bad.status_code == 415 and "text/csv" in bad.json()["message"]
                empty = await client.post("/invoices", content=b"", **send)
                assert empty.status_code == 422 and "empty" in empty.json()["message"]
                anonymous = await client.post("/invoices", content=data)
                assert anonymous.status_code == 401
                done = await wait_status(app, run["run_id"], RunStatus.SUCCEEDED, timeout=60)
                metrics = (await client.get("/metrics")).text
        # the business metrics the assistant declares
        assert 'invoices_total{outcome="approved",route="auto"} 1.0' in metrics
        assert "invoices_auto_approved_total 1.0" in metrics
        assert 'invoices_time_to_resolution_seconds_count{route="auto"} 1.0' in metrics
        out = done.output
        assert out["outcome"] == "approved" and out["decision"]["auto"] is True
        assert out["risk"]["label"] == "low" and out["reasons"] == []
        assert out["document_id"] == invoices.archive.put(data)
        facts = truth(CLEAN)
        (row,) = await erp.ledger()
        assert (row["vendor_name"], row["invoice_number"], row["invoice_date"][:10]) == (
            facts["vendor_name"],
            facts["invoice_number"],
            facts["invoice_date"],
        )
        assert Decimal(str(row["total"])) == Decimal(facts["total"]) and row["approval"] == "auto"
        assert row["vendor_id"] == "V-100" and row["run_id"] == run["run_id"]
        # the ERP lost the first answer after its commit: the retried post wrote no 2nd row
        assert FlakyErp.posts == 2 and out["ledger"]["inserted"] is False
        steps = {s.name: s for s in await app.steps(run["run_id"])}
        assert steps["invoices.post"].attempts == 2
        archived = json.loads(Path(out["archived"]).read_text())
        assert archived["outcome"] == "approved" and archived["fields"]["total"] == facts["total"]
    finally:
        await app.gateway.close()  # type: ignore[union-attr]


async def test_an_exception_goes_to_a_person_who_corrects_it_through_the_api(
    app, build, erp, tmp_path, wait_until, wait_status
) -> None:
    invoices = build()
    inbox = Inbox(app)
    try:
        async with app, app.worker(concurrency=4):
            client, auth = await _api(app, tmp_path)
            async with client:
                r = await client.post(
                    "/invoices?name=roskin.pdf",
                    content=(SAMPLES / f"{OTHER}.pdf").read_bytes(),
                    headers={"Authorization": auth["olga"], "Content-Type": "application/pdf"},
                )
                run_id = r.json()["runs"][0]["run_id"]
                page = await wait_until(lambda: _open(inbox), timeout=60, what="review task")
                (task,) = page.items
                assert task.kind == "invoices.review" and task.groups == ["ap"]
                ctx = task.context
                assert "not in the vendor master" in " ".join(ctx["reasons"])
                assert "the invoice names no purchase order" in ctx["reasons"]
                assert ctx["document"]["media_type"] == "application/pdf"
                assert ctx["document"]["pages"][0]["width"] > 0
                assert ctx["fields"]["total"]["bbox"] and ctx["fields"]["total"]["page"] == 1
                assert ctx["suggestion"]["risk"] in inv.RISK_LABELS
                facts = truth(OTHER)
                answer = {**facts, "decision": "approve", "invoice_number": "2025/7032-A"}
                answer = {k: v for k, v in answer.items() if v is not None}
                refused = await client.post(
                    f"/tasks/{task.id}/complete",
                    headers={"Authorization": auth["rita"]},
                    json={"data": {**answer, "total": "lots"}},
                )
                assert refused.status_code == 422 and "total" in refused.text
                done_ = await client.post(
                    f"/tasks/{task.id}/complete",
                    headers={"Authorization": auth["rita"]},
                    json={"data": answer},
                )
                assert done_.status_code == 200, done_.text
                done = await wait_status(app, run_id, RunStatus.SUCCEEDED, timeout=60)
                metrics = (await client.get("/metrics")).text
            assert 'invoices_exceptions_total{kind="unknown_vendor"} 1.0' in metrics
            assert 'invoices_total{outcome="approved",route="review"} 1.0' in metrics
            report = await audit_log.AuditLog(app, tmp_path / "audit.key").verify()
        assert report.ok
        out = done.output
        assert out["outcome"] == "approved" and out["decision"]["by"] == "rita"
        (row,) = await erp.ledger()
        assert row["invoice_number"] == "2025/7032-A" and row["approved_by"] == "rita"
        assert row["approval"] == "review"
        examples = await erp.labelled_examples()
        fixed = [e for e in examples if e["field"] == "invoice_number"]
        assert [(e["extracted"], e["corrected"]) for e in fixed] == [("2025/7032", "2025/7032-A")]
        assert json.loads(fixed[0]["bbox"]) == ctx["fields"]["invoice_number"]["bbox"]
        (risk,) = [e for e in examples if e["field"] == "risk"]
        assert risk["corrected"] == "low" and "vendor_unknown" in risk["extracted"]
        assert invoices.archive.read(out["document_id"])[:4] == b"%PDF"
    finally:
        await app.gateway.close()  # type: ignore[union-attr]


async def _open(inbox: Inbox) -> Any:
    page = await inbox.tasks(None, status=["open", "claimed"])
    return page if page.items else None


@pytest.mark.sqlite_only
async def test_dropped_files_and_emails_and_what_cannot_be_read(
    app, build, erp, tmp_path, wait_until, wait_status
) -> None:
    invoices = build()
    inbox = Inbox(app)
    folder = tmp_path / "incoming"
    folder.mkdir()
    clean = (SAMPLES / f"{CLEAN}.pdf").read_bytes()
    (folder / "mail.eml").write_bytes(_email(("calric.pdf", clean), ("note.txt", b"hi")))
    (folder / "broken.pdf").write_bytes(b"%PDF-1.7\n" + bytes(range(256)) * 4)
    (folder / "empty.pdf").write_bytes(b"")
    locked = StandardEncryption("secret", ownerPassword="o")
    (folder / "locked.pdf").write_bytes(pdf_with_text(["Invoice 1", "Total 10.00"], encrypt=locked))
    (folder / "bomb.png").write_bytes(bomb_png(20_000))
    letter = ["Dear neighbours,", "the summer party is on Saturday at four.", "See you there!"]
    (folder / "letter.pdf").write_bytes(pdf_with_text(letter))
    watcher = invoices.watch(folder, interval=0.05, settle=0.0)
    try:
        async with app, app.worker(concurrency=4):
            watching = asyncio.create_task(watcher.run())
            page = await wait_until(
                lambda: _count(inbox, 5), timeout=90, what="five unreadable files in the inbox"
            )
            reasons = {t.context["document"]["name"]: t.context["reasons"] for t in page.items}
            assert set(reasons) == set(UNREADABLE)
            for name, words in UNREADABLE.items():
                (reason,) = reasons[name]
                assert words in reason.lower(), (name, reason)
            for task in page.items:
                await inbox.complete(
                    task.id, Person("rita", groups=("ap",)), {"decision": "reject"}
                )
            runs = await wait_until(
                lambda: _finished(app, folder), timeout=60, what="every run finished"
            )
            watcher.stop()
            await watching
        by_name = {r.input.get("name"): r for r in runs}
        assert by_name["calric.pdf"].output["outcome"] == "approved"
        assert by_name["calric.pdf"].input["source"] == "email"
        assert {by_name[n].output["outcome"] for n in UNREADABLE} == {"rejected"}
        assert len(await erp.ledger()) == 1
        done = sorted(p.name for p in (folder / "done").iterdir())
        assert done == sorted([*UNREADABLE, "mail.eml"])
    finally:
        await app.gateway.close()  # type: ignore[union-attr]


UNREADABLE = {  # file -> what its recorded reason says
    "broken.pdf": "pdf",
    "empty.pdf": "empty",
    "locked.pdf": "encrypted",
    "bomb.png": "pixels",
    "letter.pdf": "does not look like an invoice",
}


async def _count(inbox: Inbox, n: int) -> Any:
    page = await inbox.tasks(None, status=["open"])
    return page if len(page.items) >= n else None


async def _finished(app: flowdesk.App, folder: Path) -> Any:
    """The invoice runs, once they and the intake runs are finished and the watcher has
    moved every file to done/."""
    runs = (await app.list_runs(workflow=inv.PROCESS)).items
    intake = (await app.list_runs(workflow=inv.EMAIL)).items
    done = list((folder / "done").glob("*")) if (folder / "done").exists() else []
    n = len(UNREADABLE) + 1
    if len(runs) == n and len(intake) == n and len(done) == n:
        if all(r.status.finished for r in [*runs, *intake]):
            return [await app.get_run(r.id) for r in runs]
    return None


async def test_two_copies_of_one_invoice_posted_at_once_make_one_ledger_row(erp) -> None:
    facts = truth(CLEAN)
    row = inv.ApRow.model_validate(
        {**facts, "document_id": "d" * 64, "run_id": "r1", "vendor_id": "V-100",
         "approval": "auto", "approved_by": None}
    )  # fmt: skip
    # The same vendor and number, read from another copy (spacing and case differ).
    copy = row.model_copy(
        update={"document_id": "e" * 64, "run_id": "r2", "vendor_tax_id": "ie 7157857 d"}
    )
    base = inv.Erp(erp.connector)
    first, second = await asyncio.gather(base.post(row, "r1-3"), base.post(copy, "r2-3"))
    outcomes = sorted([first, second], key=lambda o: "duplicate_of" in o)
    assert outcomes[0]["inserted"] is True and "duplicate_of" not in outcomes[0]
    assert outcomes[1]["duplicate_of"] == outcomes[0]["idempotency_key"]
    assert len(await erp.ledger()) == 1
    # the winner's own replay is no duplicate: it finds its own row
    again = await base.post(row if first["inserted"] else copy, outcomes[0]["idempotency_key"])
    assert again == {"idempotency_key": outcomes[0]["idempotency_key"], "inserted": False}


# -- low confidence: a second reading by a language model route, then a person ------------------
LLM_SEEN: list[dict[str, Any]] = []
LLM_SAYS = {
    "vendor_name": "Totally Invented Ltd",  # not on the invoice: must be ignored
    "invoice_number": "633762",  # what the extractor read too: confirmed
    "invoice_date": "2025-04-13",  # another reading: replaces it, for a person to check
    "currency": "EUR",
    "total": "6099.18",
}


async def _chat(request: Request) -> JSONResponse:
    body = await request.json()
    LLM_SEEN.append(body)
    content = "Here you are:\n```json\n" + json.dumps(LLM_SAYS) + "\n```"
    return JSONResponse(
        {
            "id": "c1",
            "object": "chat.completion",
            "model": body["model"],
            "choices": [
                {"index": 0, "finish_reason": "stop",
                 "message": {"role": "assistant", "content": content}}
            ],
            "usage": {"prompt_tokens": 900, "completion_tokens": 60, "total_tokens": 960},
        }
    )  # fmt: skip


@pytest.fixture(scope="module")
def llm_url() -> Iterator[str]:
    api = Starlette(routes=[Route("/v1/chat/completions", _chat, methods=["POST"])])
    with serving(api, "llm-service") as url:
        yield url + "/v1"


async def test_unsure_fields_get_a_second_reading_from_a_language_model_route(
    app, erp, risk_toml, llm_url, tmp_path, wait_until
) -> None:
    LLM_SEEN.clear()
    config = tmp_path / "models.toml"
    config.write_text(
        risk_toml.read_text() + f'\n[providers.llm]\ntype = "openai"\nbase_url = "{llm_url}"\n\n'
        '[models.reader]\nprovider = "llm"\nmodel = "reader-1"\ncapabilities = ["generate"]\n\n'
        '[tasks.invoice_reread]\ncapability = "generate"\nchain = ["reader"]\n'
    )
    app.gateway = Gateway.from_toml(config)
    invoices = inv.Invoices(
        app,
        Archive(tmp_path / "documents"),
        erp,
        policy=inv.InvoicePolicy(min_field_confidence=0.99),
    )
    inbox = Inbox(app)
    try:
        async with app, app.worker(concurrency=2):
            await invoices.submit((SAMPLES / f"{CLEAN}.pdf").read_bytes(), "calric.pdf")
            (task,) = (await wait_until(lambda: _open(inbox), timeout=60, what="review")).items
        fields = task.context["fields"]
        assert fields["invoice_number"]["confidence"] == 0.9  # confirmed by the model
        assert fields["invoice_date"]["value"] == "2025-04-13"  # the model's reading...
        assert fields["invoice_date"]["confidence"] == 0.7  # ...for a person to check
        assert fields["vendor_name"]["value"] == "Calric Consulting DAC"  # invention ignored
        assert "read with low confidence" in " ".join(task.context["reasons"])
        (request,) = LLM_SEEN
        prompt = request["messages"][-1]["content"]
        assert "633762" in prompt and "invoice_number" in prompt
        sent = "".join(json.dumps(request).split())
        assert truth(CLEAN)["iban"] not in sent  # redacted before it left
        assert "[IBAN" in prompt or "<IBAN" in prompt or "IBAN_" in prompt, prompt[-400:]
    finally:
        await app.gateway.close()  # type: ignore[union-attr]
