"""The synthetic invoice generator: reproducible, eight layouts, several locales and
fonts, multi-page tables, scan-like copies, and true values that are consistent."""

from __future__ import annotations

import json
from collections import Counter
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

from PIL import Image
from stdnum import iban

from flowdesk.documents import generate, load_document

DATA = Path(__file__).resolve().parent.parent / "data" / "invoices"


def truths(folder: Path) -> dict[str, dict[str, Any]]:
    return {p.name: json.loads(p.read_text("utf-8")) for p in sorted(folder.glob("*.json"))}


def test_the_sample_set_is_what_the_generator_writes_for_its_seed(tmp_path: Path) -> None:
    generate.generate(tmp_path, count=16, seed=2025, scans=False)
    fresh = truths(tmp_path)
    stored = truths(DATA)
    assert fresh.keys() == stored.keys()
    for name, truth in stored.items():
        truth = dict(truth, files={"pdf": truth["files"]["pdf"]})
        assert fresh[name] == truth, name


def test_the_same_seed_writes_the_same_files(tmp_path: Path) -> None:
    first = generate.generate(tmp_path / "a", count=2, seed=9)
    second = generate.generate(tmp_path / "b", count=2, seed=9)
    for a, b in zip(first, second, strict=True):
        assert a.pdf.read_bytes() == b.pdf.read_bytes()
        assert a.truth.read_bytes() == b.truth.read_bytes()
        assert a.scan is not None and b.scan is not None
        assert a.scan.read_bytes() == b.scan.read_bytes()


def test_layouts_locales_fonts_and_pages_vary() -> None:
    stored = list(truths(DATA).values())
    assert sorted({t["layout"] for t in stored}) == list(range(1, 9))
    assert len(generate.LAYOUTS) >= 8 and generate.HELD_OUT_LAYOUTS == {7, 8}
    assert {t["held_out"] for t in stored if t["layout"] in (7, 8)} == {True}
    assert len({t["locale"] for t in stored}) >= 4
    assert len({t["fields"]["currency"] for t in stored}) >= 3
    assert len({t["font"] for t in stored}) >= 3
    assert any(t["pages"] > 1 for t in stored)
    assert generate.available_fonts()  # TrueType fonts, else the PDF base fonts


def test_true_values_are_consistent() -> None:
    for truth in truths(DATA).values():
        fields = truth["fields"]
        items = truth["line_items"]
        for item in items:
            quantity, price = Decimal(item["quantity"]), Decimal(item["unit_price"])
            amount = (quantity * price).quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)
            assert amount == Decimal(item["amount"])
        lines = sum(Decimal(i["amount"]) for i in items)
        assert lines == Decimal(fields["subtotal"])
        assert Decimal(fields["subtotal"]) + Decimal(fields["tax"]) == Decimal(fields["total"])
        assert fields["invoice_date"] < fields["due_date"]
        if fields["iban"] is not None:
            assert iban.is_valid(fields["iban"])


def test_every_true_value_is_printed_in_the_pdf() -> None:
    for truth in truths(DATA).values():
        text = load_document(DATA / truth["files"]["pdf"]).text()
        fields = truth["fields"]
        for name in ("vendor_name", "invoice_number", "po_number"):
            if fields[name] is not None:
                assert fields[name] in text, (truth["key"], name)
        assert truth["line_items"][0]["description"].split()[0] in text


def test_scans_come_in_several_formats() -> None:
    scans = [DATA / t["files"]["scan"] for t in truths(DATA).values() if "scan" in t["files"]]
    suffixes = Counter(p.suffix for p in scans)
    assert set(suffixes) == {".jpg", ".png", ".tiff", ".pdf"}
    png = next(p for p in scans if p.suffix == ".png")
    with Image.open(png) as image:
        assert image.mode == "1"  # a black-and-white scan
    multi = [t for t in truths(DATA).values() if "scan" in t["files"] and t["pages"] > 1]
    for truth in multi:
        path = DATA / truth["files"]["scan"]
        if path.suffix == ".tiff":
            with Image.open(path) as image:
                assert image.n_frames == truth["pages"]
