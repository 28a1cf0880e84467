"""The invoice assistant end to end: what the orchestration costs beside the OCR.

Sends generated invoices (scans and digital PDFs, from the same fixed-seed set as
``benchmarks/invoices.py``) through the whole assistant on the embedded default (SQLite,
one process, one worker slot so documents go one after another): archive, extraction,
ERP lookups (a SQLite ERP through the SQL connector), validation, the risk model through
the gateway, the policy, the ledger post, the archive record and every durable step and
audit record. The vendor master and purchase orders hold what the invoices refer to; the
policy lets through anything without a validation error. A person is played by a loop that
rejects what lands in the inbox; the time a task waited for it is left out.

It prints documents per minute, the time inside OCR (Tesseract and its image preparation),
inside the rest of extraction (both measured by the reader process that does them), and
outside extraction: the orchestration, including handing the file to the reader process.
The target is an orchestration overhead under 5 % of the OCR time.

    python benchmarks/invoice_assistant.py [--count 64] [--seed 4242] [--scans 16] [--pdfs 16]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

import invoices as extraction_bench  # noqa: E402  (benchmarks/invoices.py: the shared set)

import flowdesk  # noqa: E402
from flowdesk.assistants import invoices as inv  # noqa: E402
from flowdesk.connectors import sql  # noqa: E402
from flowdesk.documents.archive import Archive  # noqa: E402
from flowdesk.humans.inbox import Inbox  # noqa: E402
from flowdesk.models.gateway import Gateway  # noqa: E402
from flowdesk.store.people import Person  # noqa: E402


class Clock:
    """Seconds spent in OCR and in extraction, summed over the documents (as each run's
    record reports them: the reader process times itself)."""

    def __init__(self) -> None:
        self.ocr = 0.0
        self.extract = 0.0


PERMISSIVE = inv.InvoicePolicy(
    max_total=Decimal("1e12"),
    min_field_confidence=0.0,
    require_known_vendor=False,
    require_po=False,
    max_risk="high",
    min_risk_confidence=0.0,
)


async def reviewer(inbox: Inbox, stop: asyncio.Event, waited: list[float]) -> None:
    """Rejects every task as soon as it shows, and notes how long it had waited."""
    person = Person("reviewer", groups=("ap",))
    while not stop.is_set():
        for task in (await inbox.tasks(None, status=["open"])).items:
            await inbox.complete(task.id, person, {"decision": "reject"})
            done = await inbox.get(task.id, None)
            assert done.completed_at is not None
            waited.append((done.completed_at - done.created_at).total_seconds())
        await asyncio.sleep(0.02)


async def seed(erp: inv.Erp, truths: list[dict[str, Any]]) -> None:
    """The vendor master and the open purchase orders the invoices refer to."""
    for number, truth in enumerate(truths, start=1):
        facts = truth["fields"]
        await erp.add_vendor(
            f"V-{number:03d}", facts["vendor_name"], tax_id=facts["vendor_tax_id"],
            iban=facts["iban"],
        )  # fmt: skip
        if facts["po_number"]:
            await erp.add_purchase_order(
                facts["po_number"], Decimal(facts["total"]), facts["currency"], f"V-{number:03d}"
            )


async def run(
    files: list[Path], truths: list[dict[str, Any]], work: Path, clock: Clock
) -> dict[str, Any]:
    config = work / "models.toml"
    config.write_text(inv.train_risk_model(ROOT / "data" / "invoices" / "risk.csv", work))
    app = flowdesk.App(f"sqlite:///{work / 'flowdesk.db'}")
    app.gateway = Gateway.from_toml(config)
    async with sql.SqlConnector("erp", app, f"sqlite:///{work / 'erp.db'}") as connector:
        erp = inv.Erp(connector)
        await erp.create_tables()
        await seed(erp, truths)
        invoices = inv.Invoices(app, Archive(work / "documents"), erp, policy=PERMISSIVE)
        stop, waited = asyncio.Event(), []
        async with app, app.worker(concurrency=1):
            people = asyncio.create_task(reviewer(Inbox(app), stop, waited))
            started = time.perf_counter()
            handles = [await invoices.submit(f.read_bytes(), f.name) for f in files]
            outcomes = [await app.wait(h.id, timeout=3600) for h in handles]
            wall = time.perf_counter() - started
            stop.set()
            await people
        await app.gateway.close()  # type: ignore[attr-defined]
        ledger = await erp.ledger()
    timings = [o.output.get("timing") or {} for o in outcomes if o.output]
    clock.ocr = sum(float(t.get("ocr_s") or 0.0) for t in timings)
    clock.extract = sum(float(t.get("extract_s") or 0.0) for t in timings)
    return {
        "documents": len(files),
        "wall": wall,
        "human_wait": sum(waited),
        "reviewed": len(waited),
        "posted": len(ledger),
        "failed": sum(1 for o in outcomes if o.status != flowdesk.RunStatus.SUCCEEDED),
    }


def show(label: str, out: dict[str, Any], clock: Clock) -> None:
    machine = out["wall"] - out["human_wait"]
    orchestration = max(0.0, machine - clock.extract)
    n = out["documents"]
    print(f"\n{label}: {n} documents, {n / machine * 60:.1f} documents/minute")
    print(f"  posted to the ledger {out['posted']}, rejected in review {out['reviewed']}, "
          f"runs failed {out['failed']}")  # fmt: skip
    print(f"  per document: {machine / n * 1000:8.1f} ms in all, "
          f"{clock.ocr / n * 1000:8.1f} ms OCR, "
          f"{(clock.extract - clock.ocr) / n * 1000:7.1f} ms rest of extraction, "
          f"{orchestration / n * 1000:6.1f} ms orchestration")  # fmt: skip
    print(f"  share of time outside OCR: {(machine - clock.ocr) / machine:.1%}")
    if clock.ocr > 0:
        print(f"  orchestration / OCR time: {orchestration / clock.ocr:.2%}   (target < 5 %)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=64)
    parser.add_argument("--seed", type=int, default=4242)
    parser.add_argument("--scans", type=int, default=16)
    parser.add_argument("--pdfs", type=int, default=16)
    args = parser.parse_args(argv)
    folder = ROOT / ".bench" / "invoices" / f"seed-{args.seed}-{args.count}"
    folder.mkdir(parents=True, exist_ok=True)
    truths = extraction_bench.ensure_set(folder, args.count, args.seed)
    clock = Clock()
    for kind, n in (("scan", args.scans), ("pdf", args.pdfs)):
        chosen = [t for t in truths if kind in t["files"]][:n]
        if not chosen:
            continue
        files = [folder / t["files"][kind] for t in chosen]
        with tempfile.TemporaryDirectory() as work:
            out = asyncio.run(run(files, chosen, Path(work), clock))
        show("scans" if kind == "scan" else "digital PDFs", out, clock)
        print("  " + json.dumps({k: round(v, 3) for k, v in out.items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
