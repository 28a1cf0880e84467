"""The invoice assistant in the demo: sample invoices flow in from a watched folder.

`install` sets up the ERP (SQLite ``./erp.db``: ``ap_invoices``, a vendor master and open
purchase orders, seeded from the sample invoices' true values), the document archive
(``./flowdesk-documents``) and a file drop on ``./invoices-inbox``, and copies the sample
set from tests/data/invoices into that folder on the first start, each invoice once: as a
scan (JPEG, PNG, TIFF, image-only PDF) where the set has one, else as a digital PDF. About
half are approved by policy and posted to the ledger; the others land in the review inbox
of the ``ap`` group (paula): a vendor missing from the master, no purchase order, a bank
account that differs from the one on file, a total over the limit, a medium or high risk.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from contextlib import AsyncExitStack
from decimal import Decimal
from pathlib import Path

import flowdesk
from flowdesk.assistants import invoices as inv
from flowdesk.connectors import sql
from flowdesk.documents.archive import Archive
from flowdesk.engine import tasks
from flowdesk.governance.identity import Identity
from flowdesk.triggers import filedrop

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "tests" / "data" / "invoices"
INBOX = Path("invoices-inbox")
NOT_IN_MASTER = {"inv-2025-0002", "inv-2025-0008"}  # their vendors are new to the company
OTHER_IBAN = {"inv-2025-0014": "CH9300762011623852957"}  # the master has another account


def models_config(support_toml: Path) -> Path:
    """The support model's gateway config joined with the invoice risk model's (trained
    once, in a second or two, on data/invoices/risk.csv)."""
    joined = support_toml.parent / "assistants.toml"
    if joined.exists():
        return joined
    risk = inv.train_risk_model(ROOT / "data" / "invoices" / "risk.csv", support_toml.parent)
    joined.write_text(support_toml.read_text(encoding="utf-8") + "\n" + risk, encoding="utf-8")
    return joined


async def _seed(erp: inv.Erp) -> None:
    for number, truth_file in enumerate(sorted(SAMPLES.glob("*.json")), start=1):
        truth = json.loads(truth_file.read_text(encoding="utf-8"))
        if truth["key"] in NOT_IN_MASTER:
            continue
        facts = truth["fields"]
        vendor_id = f"V-{number:03d}"
        iban = OTHER_IBAN.get(truth["key"], facts["iban"])
        await erp.add_vendor(
            vendor_id, facts["vendor_name"], tax_id=facts["vendor_tax_id"], iban=iban,
            locale=truth["locale"],
        )  # fmt: skip
        if facts["po_number"]:
            amount = Decimal(facts["total"])
            await erp.add_purchase_order(facts["po_number"], amount, facts["currency"], vendor_id)


def _drop_samples() -> int:
    """Copy the sample set into the watched folder, once (written under a .part name,
    then renamed, so the watcher never reads half a file)."""
    INBOX.mkdir(exist_ok=True)
    marker = INBOX / ".samples-dropped"
    if marker.exists():
        return 0
    count = 0
    scanned = {p.name.split(".")[0] for p in SAMPLES.glob("*.scan.*")}
    for path in sorted(SAMPLES.iterdir()):
        key = path.name.split(".")[0]
        # each invoice once: as its scan where the set has one, else as its PDF
        wanted = ".scan." in path.name if key in scanned else path.suffix == ".pdf"
        if wanted:
            part = INBOX / (path.name + ".part")
            shutil.copyfile(path, part)
            part.rename(INBOX / path.name)
            count += 1
    marker.write_text("the sample invoices were copied here once\n", encoding="utf-8")
    return count


def keep_watching(watcher: filedrop.FileDrop, stack: AsyncExitStack) -> None:
    """Run ``watcher`` in the background until ``stack`` closes."""
    watching = asyncio.create_task(watcher.run())

    async def stop() -> None:
        watcher.stop()
        await watching

    stack.push_async_callback(stop)


async def install(app: flowdesk.App, stack: AsyncExitStack) -> inv.Invoices:
    """The invoice assistant on ``app``, watching ./invoices-inbox until ``stack`` closes."""
    identity = Identity(app)
    if "paula" not in {u.id for u in await app.store.list_users()}:
        await identity.create_user("paula", roles=["approver"], groups=["ap"])
    erp_file = await asyncio.to_thread(lambda: Path("erp.db").resolve())
    connector = await stack.enter_async_context(
        sql.SqlConnector("erp", app, f"sqlite:///{erp_file}")
    )
    erp = inv.Erp(connector)
    await erp.create_tables()
    await _seed(erp)
    invoices = inv.Invoices(
        app,
        Archive("flowdesk-documents"),
        erp,
        policy=inv.InvoicePolicy(max_total=Decimal("100000")),
        reviewers=tasks.Assignees(groups=["ap"]),
    )
    dropped = await asyncio.to_thread(_drop_samples)
    keep_watching(invoices.watch(INBOX, interval=1.0, settle=0.5), stack)
    print(
        f"invoice assistant: watching {INBOX}/ ({dropped} sample invoices dropped in); "
        "ledger in erp.db (table ap_invoices); reviews go to paula (group ap)"
    )
    return invoices
