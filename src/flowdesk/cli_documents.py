"""The ``flowdesk`` commands for documents: ``documents extract`` reads an invoice (PDF,
PNG, JPEG or TIFF) and prints its fields; ``demo-data invoices`` writes synthetic invoices
with their ground truth.

They register themselves on `flowdesk.cli`'s Typer app when this module is imported
(`flowdesk.cli` imports it last). Reading documents needs the ``documents`` extra, the
generator the ``demo`` extra; both are imported only when a command runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from flowdesk import errors
from flowdesk.cli import JsonOpt, _fail, cli

documents_cli = typer.Typer(help="Read invoices: fields, line items, checks.", no_args_is_help=True)
demo_cli = typer.Typer(help="Write sample data to try flowdesk with.", no_args_is_help=True)

EXIT_BAD_DOCUMENT = 2


def _missing(extra: str, exc: ImportError) -> None:
    _fail(
        f"this command needs the {extra!r} extra ({exc.name or exc}): "
        f"pip install 'flowdesk[{extra}]'"
    )


@documents_cli.command("extract")
def extract(
    file: Annotated[Path, typer.Argument(help="A PDF, PNG, JPEG or TIFF file.")],
    json_out: JsonOpt = False,
    locale: Annotated[
        str | None,
        typer.Option(
            "--locale",
            help="The vendor's locale when known (de_DE, en_US...): decides 03/04/2025 and 1.234.",
        ),
    ] = None,
    max_pages: Annotated[
        int, typer.Option("--max-pages", min=1, help="Refuse documents with more pages.")
    ] = 50,
    ocr_timeout: Annotated[
        float, typer.Option("--ocr-timeout", min=0.1, help="Seconds Tesseract may spend on a page.")
    ] = 60.0,
    languages: Annotated[
        str, typer.Option("--languages", help="Tesseract languages, +-joined.")
    ] = "eng+deu+fra",
) -> None:
    """Extract the invoice fields of FILE: vendor, number, dates, amounts, tax id, PO,
    IBAN, line items, each with a confidence and where it was read; then the checks."""
    try:
        from flowdesk.documents import extract as extract_mod
        from flowdesk.documents import limits as limits_mod
    except ImportError as exc:
        _missing("documents", exc)
        raise
    limits = limits_mod.Limits(
        max_pages=max_pages, ocr_timeout=ocr_timeout, ocr_languages=languages
    )
    try:
        result = extract_mod.extract_invoice(file, locale=locale, limits=limits)
    except errors.DocumentError as exc:
        if json_out:
            typer.echo(json.dumps({"error": {"code": exc.code, "message": exc.message}}))
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(EXIT_BAD_DOCUMENT) from None
    if json_out:
        typer.echo(json.dumps(result, indent=2, ensure_ascii=False))
        return
    _print_result(result)


def _print_result(result: dict[str, Any]) -> None:
    doc = result["document"]
    typer.echo(f"{doc['path']}: {doc['kind']}, {doc['pages']} page(s), {doc['ocr_pages']} by OCR")
    typer.echo("")
    for name, entry in result["fields"].items():
        value = "-" if entry["value"] is None else entry["value"]
        where = f"p{entry['page']}" if entry["page"] else ""
        flag = "  (check)" if entry["low_confidence"] else ""
        typer.echo(f"  {name:<15} {value:<40} {entry['confidence']:.2f} {where}{flag}")
    items = result["line_items"]
    if items:
        typer.echo("")
        typer.echo(f"  {'#':>3}  {'description':<40} {'qty':>8} {'unit price':>12} {'amount':>12}")
        for n, item in enumerate(items, start=1):
            desc = (item["description"] or "-")[:40]
            flag = "  (check)" if item["low_confidence"] else ""
            typer.echo(
                f"  {n:>3}  {desc:<40} {item['quantity'] or '-':>8} "
                f"{item['unit_price'] or '-':>12} {item['amount'] or '-':>12}{flag}"
            )
    if result["validation"]:
        typer.echo("")
        for issue in result["validation"]:
            field = f" [{issue['field']}]" if issue["field"] else ""
            typer.echo(f"  {issue['severity']:<7} {issue['code']}{field}: {issue['message']}")


@demo_cli.command("invoices")
def demo_invoices(
    out: Annotated[
        Path, typer.Option("--out", help="The folder to write to (created if missing).")
    ] = Path("sample-invoices"),
    count: Annotated[int, typer.Option("--count", min=0, help="How many invoices.")] = 16,
    seed: Annotated[int, typer.Option("--seed", help="The same seed, the same invoices.")] = 7,
    scans: Annotated[
        bool, typer.Option("--scans/--no-scans", help="Also write a scan-like copy of each.")
    ] = True,
    layouts: Annotated[
        str | None,
        typer.Option("--layouts", help="Only these layouts, comma-separated (1-8)."),
    ] = None,
) -> None:
    """Write synthetic invoices: a digital PDF, a scan-like image and the true values
    (JSON) for each, in eight layouts, several languages, currencies and fonts."""
    try:
        from flowdesk.documents import generate
    except ImportError as exc:
        _missing("demo", exc)
        raise
    chosen: list[int] | None = None
    if layouts:
        try:
            chosen = [int(part) for part in layouts.split(",") if part.strip()]
        except ValueError:
            _fail(f"--layouts {layouts!r}: use numbers from 1 to {len(generate.LAYOUTS)}")
    try:
        written = generate.generate(out, count=count, seed=seed, layouts=chosen, scans=scans)
    except ImportError as exc:
        _missing("demo", exc)
        raise
    except ValueError as exc:
        _fail(str(exc))
    for item in written:
        files = [item.pdf.name] + ([item.scan.name] if item.scan else []) + [item.truth.name]
        typer.echo(f"{item.key}  layout {item.layout}  {'  '.join(files)}")
    typer.echo(f"{len(written)} invoices in {out}")


cli.add_typer(documents_cli, name="documents")
cli.add_typer(demo_cli, name="demo-data")
