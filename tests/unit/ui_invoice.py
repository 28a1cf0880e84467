"""A small invoice workflow with the review task the invoice assistant creates (same
context shape), for the web UI's tests: read a sample invoice for real (text layer,
fields with bounding boxes), ask finance to review it, then post what they decided.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

import flowdesk
from flowdesk.documents import archive as archive_mod
from flowdesk.documents import extract_invoice, load

DATA = Path(__file__).parents[1] / "data" / "invoices"
SAMPLE = DATA / "inv-2025-0001-L1-fr_FR.pdf"
PASSWORD = "correct horse battery"

# user id -> (roles, groups)
USERS: dict[str, tuple[list[str], list[str]]] = {
    "root": (["admin"], []),
    "olga": (["operator"], ["ops"]),
    "anna": (["approver"], ["finance"]),
    "bob": (["approver"], ["legal"]),
    "vera": (["viewer"], ["finance"]),
}


class InvoiceReview(BaseModel):
    """What the reviewer decides: the decision and the corrected key fields."""

    decision: Literal["approve", "reject"]
    vendor_name: str = Field(min_length=1, max_length=200)
    invoice_number: str = Field(min_length=1, max_length=64)
    total: float = Field(gt=0, description="The amount to pay, with tax.")
    note: str = Field(default="", max_length=500)


def review_context(archive: archive_mod.Archive, path: Path) -> dict[str, Any]:
    """The review task's context for one document, exactly in the assistant's shape."""
    data = path.read_bytes()
    doc_id = archive.put(data)
    extraction = extract_invoice(path)
    document = load.load_document(path)
    fields = {
        name: {
            "value": f["value"],
            "confidence": f["confidence"],
            "page": f["page"],
            "bbox": f["bbox"],
        }
        for name, f in extraction["fields"].items()
    }
    total = fields["total"]["value"]
    return {
        "summary": f"Invoice {fields['invoice_number']['value']} from "
        f"{fields['vendor_name']['value']} for {total} {fields['currency']['value']}.",
        "reasons": [
            "The total is above the 10,000 EUR review threshold.",
            "The vendor is new: no earlier invoice from them.",
        ],
        "suggestion": {"decision": "review", "risk": "medium", "confidence": 0.72},
        "document": {
            "id": doc_id,
            "name": path.name,
            "media_type": archive.media_type(doc_id),
            "pages": [{"width": p.width, "height": p.height} for p in document.pages],
        },
        "fields": fields,
    }


def register(app: flowdesk.App, archive: archive_mod.Archive) -> None:
    @app.step(name="ui_test.read_invoice")
    def read_invoice(path: str) -> dict[str, Any]:
        return review_context(archive, Path(path))

    @app.step(name="ui_test.post_invoice")
    async def post_invoice(review: dict[str, Any]) -> str:
        return f"posted {review['invoice_number']} for {review['total']:.2f}"

    @app.workflow("ui_test.invoice")
    async def invoice(ctx: flowdesk.Context, path: str) -> dict[str, Any]:
        context = await ctx.step(read_invoice, path)
        review = await ctx.human_task(
            "invoice-review",
            title=f"Review invoice {context['fields']['invoice_number']['value']}",
            form=InvoiceReview,
            context=context,
            candidates=flowdesk.Assignees(groups=["finance"]),
            due=timedelta(hours=4),
            four_eyes=True,
        )
        if review.decision == "reject":
            return {"decision": "reject", "note": review.note}
        posted = await ctx.step(post_invoice, review.model_dump())
        return {
            "decision": review.decision,
            "vendor_name": review.vendor_name,
            "total": review.total,
            "posted": posted,
        }

    @app.workflow("ui_test.assistant_form")
    async def assistant_form(ctx: flowdesk.Context, path: str) -> dict[str, Any]:
        """The same review, with the invoice assistant's own form."""
        from flowdesk.assistants import invoices

        context = await ctx.step(read_invoice, path)
        review = await ctx.human_task(
            "invoices.review",
            title="Review with the assistant's form",
            form=invoices.InvoiceReview,
            context=context,
            candidates=flowdesk.Assignees(groups=["finance"]),
        )
        return review.model_dump(mode="json")

    @app.workflow("ui_test.ask")
    async def ask(ctx: flowdesk.Context) -> Any:
        """An escalation with a free-form context (no document, no suggestion)."""
        return await ctx.human_task(
            "escalation",
            title="Customer asks for a refund",
            form=InvoiceReview,
            context={
                "title": "Refund for order 1234",
                "customer": "ACME",
                "amount": 99.5,
                "message": '<script>alert("x")</script> "quoted"',
            },
            candidates=flowdesk.Assignees(users=["anna"]),
        )

    @app.step(name="ui_test.boom")
    async def boom() -> None:
        raise RuntimeError("the ledger refused the posting")

    @app.workflow("ui_test.broken")
    async def broken(ctx: flowdesk.Context) -> None:
        await ctx.step(boom)


async def create_users(app: flowdesk.App) -> None:
    from flowdesk.governance import identity

    ids = identity.Identity(app)
    for uid, (roles, groups) in USERS.items():
        await ids.create_user(uid, roles=roles, groups=groups)
        await ids.set_password(uid, PASSWORD)
