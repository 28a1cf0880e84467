"""The eight invoice layouts, drawn with reportlab on a `Pen` (top-left origin).

Each layout function draws one invoice, page after page: long line-item tables run over
several pages with their header repeated, totals and footers move to a new page when the
table leaves no room.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from flowdesk.documents import synthetic

LAYOUTS: dict[int, str] = {
    1: "classic: meta block right, labels left of values",
    2: "banner: centred vendor, meta in a row with labels above values",
    3: "letter: sender line, information block, footer columns (DIN 5008 style)",
    4: "boxed: ruled grid table, meta boxes with labels above values",
    5: "minimal: vendor right, stacked label/value pairs, amount due",
    6: "sidebar: vendor and bank details in a grey side column",
    7: "compact: several label/value pairs on one line, quantity first",
    8: "statement: item codes and unit columns, totals before tax",
}


class Pen:
    """A reportlab canvas with the origin at the top left and a font family."""

    def __init__(self, canvas: Any, size: tuple[float, float], regular: str, bold: str) -> None:
        self.c = canvas
        self.width, self.height = size
        self.regular = regular
        self.bold = bold
        self.page = 1

    def text(
        self,
        x: float,
        y: float,
        text: str,
        size: float = 9.0,
        *,
        bold: bool = False,
        align: str = "left",
        grey: float = 0.0,
    ) -> None:
        font = self.bold if bold else self.regular
        self.c.setFont(font, size)
        self.c.setFillGray(grey)
        base = self.height - y - size
        if align == "right":
            self.c.drawRightString(x, base, text)
        elif align == "center":
            self.c.drawCentredString(x, base, text)
        else:
            self.c.drawString(x, base, text)
        self.c.setFillGray(0.0)

    def width_of(self, text: str, size: float = 9.0, bold: bool = False) -> float:
        from reportlab.pdfbase.pdfmetrics import stringWidth

        return float(stringWidth(text, self.bold if bold else self.regular, size))

    def line(
        self, x0: float, y0: float, x1: float, y1: float, width: float = 0.6, grey: float = 0.0
    ) -> None:
        self.c.setLineWidth(width)
        self.c.setStrokeGray(grey)
        self.c.line(x0, self.height - y0, x1, self.height - y1)
        self.c.setStrokeGray(0.0)

    def rect(
        self,
        x: float,
        y: float,
        w: float,
        h: float,
        *,
        fill: float | None = None,
        stroke: bool = True,
    ) -> None:
        if fill is not None:
            self.c.setFillGray(fill)
        self.c.rect(
            x,
            self.height - y - h,
            w,
            h,
            stroke=1 if stroke else 0,
            fill=1 if fill is not None else 0,
        )
        self.c.setFillGray(0.0)

    def new_page(self) -> None:
        self.c.showPage()
        self.page += 1


@dataclass
class Column:
    key: str  # code, desc, qty, unit, price, amount, pos, taxrate
    title: str
    x: float  # left edge, or right edge when right-aligned
    right: bool


def wrap(pen: Pen, text: str, width: float, size: float) -> list[str]:
    """``text`` broken into lines no wider than ``width``."""
    lines: list[str] = []
    current = ""
    for word in text.split():
        candidate = f"{current} {word}".strip()
        if current and pen.width_of(candidate, size) > width:
            lines.append(current)
            current = word
        else:
            current = candidate
    if current:
        lines.append(current)
    return lines or [""]


def draw_table(
    pen: Pen,
    fmt: synthetic.Fmt,
    columns: Sequence[Column],
    y: float,
    *,
    left: float,
    right: float,
    bottom: float,
    grid: bool = False,
    band: bool = True,
    size: float = 9.0,
    on_new_page: Callable[[], float],
) -> float:
    """The line-item table from ``y`` down, with its header repeated on each new page;
    long descriptions wrap onto more lines."""
    inv = fmt.inv
    row_h = size * 1.9
    line_h = size * 1.25

    def header(top: float) -> float:
        if band:
            pen.rect(left, top, right - left, row_h, fill=0.88, stroke=False)
        for col in columns:
            pen.text(
                col.x,
                top + (row_h - size) / 2,
                col.title,
                size,
                bold=True,
                align="right" if col.right else "left",
            )
        if grid:
            pen.rect(left, top, right - left, row_h)
        else:
            pen.line(left, top + row_h, right, top + row_h, 0.8)
        return top + row_h

    y = header(y)
    desc_col = next(c for c in columns if c.key == "desc")
    desc_next = min(
        (c.x - (45 if c.right else 8) for c in columns if c.x > desc_col.x), default=right
    )
    for n, item in enumerate(inv.items, start=1):
        lines = wrap(pen, item.description, desc_next - desc_col.x, size)
        height = row_h + (len(lines) - 1) * line_h
        if y + height > bottom:
            pen.text(right, y + 4, f"{fmt.label('continued')} …", size - 1, align="right", grey=0.3)
            pen.new_page()
            y = header(on_new_page())
        values = {
            "pos": str(n),
            "code": item.code,
            "desc": lines[0],
            "qty": fmt.qty(item.quantity),
            "unit": item.unit,
            "price": fmt.number(item.unit_price),
            "amount": fmt.number(item.amount),
            "taxrate": f"{(inv.tax_rate * 100).normalize():f}%",
        }
        top = y + (row_h - size) / 2
        for col in columns:
            pen.text(col.x, top, values[col.key], size, align="right" if col.right else "left")
        for k, extra in enumerate(lines[1:], start=1):
            pen.text(desc_col.x, top + k * line_h, extra, size)
        if grid:
            pen.rect(left, y, right - left, height)
        y += height
    if not grid:
        pen.line(left, y + 2, right, y + 2, 0.6)
    return y + 6


def draw_totals(
    pen: Pen,
    fmt: synthetic.Fmt,
    y: float,
    *,
    label_x: float,
    value_x: float,
    size: float = 9.5,
    boxed: bool = False,
    labels: tuple[str, str, str] | None = None,
    currency_suffix: bool = False,
) -> float:
    inv = fmt.inv
    sub_label, tax_label, total_label = labels or (
        fmt.label("subtotal"),
        fmt.tax_label(),
        fmt.label("total"),
    )
    rows = [
        (sub_label, fmt.money(inv.subtotal, symbol=currency_suffix), False),
        (tax_label, fmt.money(inv.tax, symbol=currency_suffix), False),
        (total_label, fmt.money(inv.total), True),
    ]
    for label, value, bold in rows:
        if boxed:
            pen.rect(label_x - 4, y - 3, value_x - label_x + 8, size + 8)
        pen.text(label_x, y, label, size + (1 if bold else 0), bold=bold)
        pen.text(value_x, y, value, size + (1 if bold else 0), bold=bold, align="right")
        y += size * 2.0
    return y


def _address(
    pen: Pen,
    party: synthetic.Party,
    x: float,
    y: float,
    size: float = 9.0,
    name_bold: bool = True,
    align: str = "left",
) -> float:
    pen.text(x, y, party.name, size + 0.5, bold=name_bold, align=align)
    y += size * 1.45
    for line in (party.street, party.city, party.country):
        pen.text(x, y, line, size, align=align)
        y += size * 1.35
    return y


def _bank_lines(fmt: synthetic.Fmt) -> list[str]:
    inv = fmt.inv
    out = []
    if inv.iban:
        out.append(f"IBAN: {_group4(inv.iban, fmt.rng)}")
        if inv.bic:
            out.append(f"BIC: {inv.bic}")
    return out


def _group4(iban: str, rng: random.Random) -> str:
    if rng.random() < 0.6:
        return " ".join(iban[i : i + 4] for i in range(0, len(iban), 4))
    return iban


def _tax_line(fmt: synthetic.Fmt) -> str | None:
    if not fmt.inv.vendor_tax_id:
        return None
    return f"{fmt.label('tax_id')}: {fmt.inv.vendor_tax_id}"


def _meta(fmt: synthetic.Fmt) -> list[tuple[str, str]]:
    inv = fmt.inv
    rows = [
        (fmt.label("number"), inv.number),
        (fmt.label("date"), fmt.date(inv.invoice_date)),
        (fmt.label("due"), fmt.date(inv.due_date)),
    ]
    if inv.po_number:
        rows.append((fmt.label("po"), inv.po_number))
    return rows


def _continuation(pen: Pen, fmt: synthetic.Fmt, margin: float) -> Callable[[], float]:
    def header() -> float:
        pen.text(margin, 40, fmt.inv.vendor.name, 9, bold=True)
        pen.text(
            pen.width - margin,
            40,
            f"{fmt.label('number')} {fmt.inv.number} · {fmt.label('page')} {pen.page}",
            8.5,
            align="right",
        )
        pen.line(margin, 56, pen.width - margin, 56, 0.5)
        return 70.0

    return header


def _ensure_room(
    pen: Pen, fmt: synthetic.Fmt, y: float, needed: float, margin: float, bottom: float
) -> float:
    if y + needed > bottom:
        pen.new_page()
        return _continuation(pen, fmt, margin)()
    return y


# Each layout draws one invoice on the pen, page after page.
def layout_classic(pen: Pen, fmt: synthetic.Fmt) -> None:
    inv, m = fmt.inv, 48.0
    w = pen.width
    pen.text(m, 44, inv.vendor.name, 17, bold=True)
    y = 68.0
    for line in (inv.vendor.street, inv.vendor.city, inv.vendor.email):
        pen.text(m, y, line, 8.5)
        y += 12
    pen.text(w - m, 44, fmt.label("title"), 20, bold=True, align="right")
    my = 80.0
    for label, value in _meta(fmt):
        pen.text(w - m - 190, my, label, 9)
        pen.text(w - m, my, value, 9, align="right")
        my += 15
    y = max(y, my) + 20
    pen.text(m, y, fmt.label("bill_to"), 9, bold=True, grey=0.35)
    y = _address(pen, inv.customer, m, y + 14) + 18
    cols = [
        Column("desc", fmt.label("desc"), m + 6, False),
        Column("qty", fmt.label("qty"), w - m - 190, True),
        Column("price", fmt.label("price"), w - m - 100, True),
        Column("amount", fmt.label("amount"), w - m - 6, True),
    ]
    bottom = pen.height - 90
    y = draw_table(
        pen,
        fmt,
        cols,
        y,
        left=m,
        right=w - m,
        bottom=bottom,
        on_new_page=_continuation(pen, fmt, m),
    )
    y = _ensure_room(pen, fmt, y, 70, m, bottom)
    draw_totals(pen, fmt, y + 6, label_x=w - m - 200, value_x=w - m - 6)
    fy = pen.height - 70
    pen.line(m, fy - 6, w - m, fy - 6, 0.4, grey=0.5)
    footer = [fmt.label("bank") + ":", *_bank_lines(fmt)]
    pen.text(m, fy, "   ".join(footer) if inv.iban else fmt.label("thanks").format(days=30), 8)
    tax = _tax_line(fmt)
    if tax:
        pen.text(m, fy + 12, tax, 8)


def layout_banner(pen: Pen, fmt: synthetic.Fmt) -> None:
    inv, m = fmt.inv, 50.0
    w = pen.width
    pen.rect(0, 0, w, 6, fill=0.3, stroke=False)
    pen.text(w / 2, 30, inv.vendor.name, 18, bold=True, align="center")
    pen.text(
        w / 2,
        54,
        f"{inv.vendor.street} · {inv.vendor.city} · {inv.vendor.phone}",
        8.5,
        align="center",
    )
    pen.text(m, 90, fmt.label("title"), 15, bold=True)
    meta = _meta(fmt)
    colw = (w - 2 * m) / 4
    for n, (label, value) in enumerate(meta):
        x = m + n * colw
        pen.text(x, 116, label, 8, grey=0.35)
        pen.text(x, 129, value, 10, bold=True)
    pen.line(m, 148, w - m, 148, 0.5)
    pen.text(m, 160, fmt.label("bill_to"), 8, grey=0.35)
    y = _address(pen, inv.customer, m, 173) + 16
    cols = [
        Column("pos", fmt.label("pos"), m + 4, False),
        Column("desc", fmt.label("desc"), m + 30, False),
        Column("qty", fmt.label("qty"), w - m - 200, True),
        Column("price", fmt.label("price"), w - m - 100, True),
        Column("amount", fmt.label("amount"), w - m - 4, True),
    ]
    bottom = pen.height - 100
    y = draw_table(
        pen,
        fmt,
        cols,
        y,
        left=m,
        right=w - m,
        bottom=bottom,
        on_new_page=_continuation(pen, fmt, m),
    )
    y = _ensure_room(pen, fmt, y, 70, m, bottom)
    draw_totals(pen, fmt, y + 6, label_x=w - m - 220, value_x=w - m - 4, currency_suffix=True)
    fy = pen.height - 62
    bank = _bank_lines(fmt)
    if bank:
        pen.text(w / 2, fy, "  |  ".join(bank), 8, align="center")
    tax = _tax_line(fmt)
    if tax:
        pen.text(w / 2, fy + 12, tax, 8, align="center")


def layout_letter(pen: Pen, fmt: synthetic.Fmt) -> None:
    inv, m = fmt.inv, 56.0
    w = pen.width
    pen.text(w - m, 40, inv.vendor.name, 15, bold=True, align="right")
    pen.text(w - m, 60, inv.vendor.street, 8.5, align="right")
    pen.text(w - m, 71, inv.vendor.city, 8.5, align="right")
    sender = f"{inv.vendor.name} · {inv.vendor.street} · {inv.vendor.city}"
    pen.text(m, 120, sender, 6.5, grey=0.3)
    pen.line(m, 130, m + 240, 130, 0.3)
    _address(pen, inv.customer, m, 138, 10, name_bold=False)
    y = 140.0
    for label, value in _meta(fmt):
        pen.text(w - m - 200, y, f"{label}:", 9)
        pen.text(w - m - 95, y, value, 9)
        y += 14
    y = 250.0
    pen.text(m, y, f"{fmt.label('title')} {inv.number}", 13, bold=True)
    y += 30
    cols = [
        Column("pos", fmt.label("pos"), m, False),
        Column("desc", fmt.label("desc"), m + 34, False),
        Column("qty", fmt.label("qty"), w - m - 175, True),
        Column("price", fmt.label("price"), w - m - 90, True),
        Column("amount", fmt.label("amount"), w - m, True),
    ]
    bottom = pen.height - 110
    y = draw_table(
        pen,
        fmt,
        cols,
        y,
        left=m,
        right=w - m,
        bottom=bottom,
        band=False,
        on_new_page=_continuation(pen, fmt, m),
    )
    y = _ensure_room(pen, fmt, y, 70, m, bottom)
    draw_totals(pen, fmt, y + 6, label_x=w - m - 210, value_x=w - m, currency_suffix=True)
    fy = pen.height - 86
    pen.line(m, fy - 6, w - m, fy - 6, 0.3)
    colw = (w - 2 * m) / 3
    blocks = [
        [inv.vendor.name, inv.vendor.street, inv.vendor.city],
        [fmt.label("bank"), *_bank_lines(fmt)],
        [t for t in (_tax_line(fmt), inv.vendor.email, inv.vendor.phone) if t],
    ]
    for n, block in enumerate(blocks):
        for k, line in enumerate(block):
            pen.text(m + n * colw, fy + k * 10, line, 7)


def layout_boxed(pen: Pen, fmt: synthetic.Fmt) -> None:
    inv, m = fmt.inv, 40.0
    w = pen.width
    pen.text(w / 2, 36, inv.vendor.name, 16, bold=True, align="center")
    pen.text(w / 2, 58, f"{inv.vendor.street}, {inv.vendor.city}", 8.5, align="center")
    tax = _tax_line(fmt)
    if tax:
        pen.text(w / 2, 70, tax, 8.5, align="center")
    pen.text(m, 96, fmt.label("title"), 14, bold=True)
    meta = _meta(fmt)
    boxw = (w - 2 * m) / 2
    for n, (label, value) in enumerate(meta):
        x = m + (n % 2) * boxw
        y = 120.0 + (n // 2) * 34
        pen.rect(x, y, boxw, 34)
        pen.text(x + 6, y + 4, label, 7.5, grey=0.35)
        pen.text(x + 6, y + 17, value, 10)
    y = 120.0 + ((len(meta) + 1) // 2) * 34 + 18
    pen.text(m, y, fmt.label("bill_to") + ":", 9, bold=True)
    pen.text(m + 90, y, f"{inv.customer.name}, {inv.customer.street}, {inv.customer.city}", 9)
    y += 26
    cols = [
        Column("code", fmt.label("code"), m + 5, False),
        Column("desc", fmt.label("desc"), m + 80, False),
        Column("qty", fmt.label("qty"), w - m - 190, True),
        Column("price", fmt.label("price"), w - m - 95, True),
        Column("amount", fmt.label("amount"), w - m - 5, True),
    ]
    bottom = pen.height - 80
    y = draw_table(
        pen,
        fmt,
        cols,
        y,
        left=m,
        right=w - m,
        bottom=bottom,
        grid=True,
        band=True,
        on_new_page=_continuation(pen, fmt, m),
    )
    y = _ensure_room(pen, fmt, y, 80, m, bottom)
    draw_totals(pen, fmt, y + 10, label_x=w - m - 200, value_x=w - m - 5, boxed=True)
    bank = _bank_lines(fmt)
    if bank:
        pen.text(m, pen.height - 50, f"{fmt.label('bank')}: " + "   ".join(bank), 8)


def layout_minimal(pen: Pen, fmt: synthetic.Fmt) -> None:
    inv, m = fmt.inv, 60.0
    w = pen.width
    pen.text(m, 50, fmt.label("title"), 26)
    pen.text(w - m, 50, inv.vendor.name, 12, bold=True, align="right")
    y = 68.0
    for line in (inv.vendor.street, inv.vendor.city, inv.vendor.email):
        pen.text(w - m, y, line, 8.5, align="right", grey=0.25)
        y += 12
    y = 130.0
    for label, value in _meta(fmt):
        pen.text(m, y, label, 8, grey=0.4)
        pen.text(m, y + 11, value, 10)
        y += 30
    pen.text(m + 240, 130, fmt.label("bill_to"), 8, grey=0.4)
    _address(pen, inv.customer, m + 240, 141, 9.5)
    y = max(y, 220) + 10
    cols = [
        Column("desc", fmt.label("desc"), m, False),
        Column("qty", fmt.label("qty"), w - m - 170, True),
        Column("price", fmt.label("price"), w - m - 85, True),
        Column("amount", fmt.label("amount"), w - m, True),
    ]
    bottom = pen.height - 120
    y = draw_table(
        pen,
        fmt,
        cols,
        y,
        left=m,
        right=w - m,
        bottom=bottom,
        band=False,
        on_new_page=_continuation(pen, fmt, m),
    )
    y = _ensure_room(pen, fmt, y, 90, m, bottom)
    draw_totals(pen, fmt, y + 8, label_x=w - m - 200, value_x=w - m)
    fy = pen.height - 100
    pen.text(m, fy, fmt.label("bank"), 8, bold=True)
    for k, line in enumerate(_bank_lines(fmt) + [t for t in [_tax_line(fmt)] if t]):
        pen.text(m, fy + 12 + 11 * k, line, 8)


def layout_sidebar(pen: Pen, fmt: synthetic.Fmt) -> None:
    inv = fmt.inv
    w = pen.width
    side = 170.0
    pen.rect(0, 0, side, pen.height, fill=0.9, stroke=False)
    sx = 18.0
    pen.text(
        sx, 40, inv.vendor.name if len(inv.vendor.name) < 24 else inv.vendor.name, 11.5, bold=True
    )
    y = 64.0
    for line in (inv.vendor.street, inv.vendor.city, inv.vendor.phone, inv.vendor.email):
        pen.text(sx, y, line, 7.5)
        y += 11
    y += 16
    if inv.vendor_tax_id:
        pen.text(sx, y, fmt.label("tax_id"), 7.5, bold=True)
        pen.text(sx, y + 11, inv.vendor_tax_id, 7.5)
        y += 34
    if inv.iban:
        pen.text(sx, y, fmt.label("bank"), 7.5, bold=True)
        pen.text(sx, y + 11, "IBAN", 7)
        pen.text(sx, y + 21, _group4(inv.iban, fmt.rng), 7)
        if inv.bic:
            pen.text(sx, y + 33, f"BIC {inv.bic}", 7)
    m = side + 28
    right = w - 36
    pen.text(m, 40, fmt.label("title"), 18, bold=True)
    y = 74.0
    for label, value in _meta(fmt):
        pen.text(m, y, label, 8.5, grey=0.3)
        pen.text(m + 120, y, value, 8.5)
        y += 13
    y += 14
    pen.text(m, y, fmt.label("bill_to"), 8.5, bold=True)
    y = _address(pen, inv.customer, m, y + 13, 8.5) + 14
    cols = [
        Column("desc", fmt.label("desc"), m, False),
        Column("qty", fmt.label("qty"), right - 150, True),
        Column("price", fmt.label("price"), right - 75, True),
        Column("amount", fmt.label("amount"), right, True),
    ]
    bottom = pen.height - 60

    def cont() -> float:
        pen.rect(0, 0, side, pen.height, fill=0.9, stroke=False)
        pen.text(sx, 40, inv.vendor.name, 9, bold=True)
        pen.text(m, 40, f"{fmt.label('number')} {inv.number} · {fmt.label('page')} {pen.page}", 8.5)
        return 66.0

    y = draw_table(
        pen, fmt, cols, y, left=m, right=right, bottom=bottom, size=8.5, on_new_page=cont
    )
    if y + 70 > bottom:
        pen.new_page()
        y = cont()
    draw_totals(pen, fmt, y + 6, label_x=right - 190, value_x=right, size=9)


def layout_compact(pen: Pen, fmt: synthetic.Fmt) -> None:
    inv, m = fmt.inv, 44.0
    w = pen.width
    pen.text(m, 36, inv.vendor.name, 14, bold=True)
    pen.text(m, 55, f"{inv.vendor.street}, {inv.vendor.city}", 8)
    tax = _tax_line(fmt)
    if tax:
        pen.text(m, 66, tax, 8)
    pen.text(w - m, 36, fmt.label("title"), 14, bold=True, align="right")
    pen.text(w - m, 55, fmt.label("bill_to") + ":", 8, align="right", grey=0.35)
    _address(pen, inv.customer, w - m, 66, 8.5, align="right")
    y = 130.0
    pen.line(m, y - 6, w - m, y - 6, 0.4)
    pairs = [f"{label}: {value}" for label, value in _meta(fmt)]
    pen.text(m, y, "      ".join(pairs[:2]), 9)
    pen.text(m, y + 14, "      ".join(pairs[2:]), 9)
    y += 44
    cols = [
        Column("qty", fmt.label("qty"), m + 30, True),
        Column("desc", fmt.label("desc"), m + 50, False),
        Column("price", fmt.label("price"), w - m - 95, True),
        Column("amount", fmt.label("amount"), w - m - 4, True),
    ]
    bottom = pen.height - 70
    y = draw_table(
        pen,
        fmt,
        cols,
        y,
        left=m,
        right=w - m,
        bottom=bottom,
        band=False,
        size=8.5,
        on_new_page=_continuation(pen, fmt, m),
    )
    y = _ensure_room(pen, fmt, y, 70, m, bottom)
    draw_totals(pen, fmt, y + 6, label_x=w - m - 230, value_x=w - m - 4, size=9)
    bank = _bank_lines(fmt)
    if bank:
        pen.text(m, pen.height - 44, "   ".join(bank), 8)


def layout_statement(pen: Pen, fmt: synthetic.Fmt) -> None:
    inv, m = fmt.inv, 42.0
    w = pen.width
    pen.text(m, 40, inv.vendor.name.upper(), 12, bold=True)
    pen.text(m, 58, inv.vendor.phone + "  ·  " + inv.vendor.email, 7.5, grey=0.3)
    pen.text(m, 100, fmt.label("title"), 22, bold=True)
    y = 40.0
    for label, value in _meta(fmt):
        pen.rect(w - m - 220, y - 3, 220, 16, fill=0.93, stroke=False)
        pen.text(w - m - 214, y, label, 8.5, bold=True)
        pen.text(w - m - 6, y, value, 8.5, align="right")
        y += 18
    y = max(y, 130) + 14
    pen.text(m, y, fmt.label("bill_to"), 8.5, bold=True)
    y = _address(pen, inv.customer, m, y + 12, 8.5) + 12
    cols = [
        Column("code", fmt.label("code"), m + 2, False),
        Column("desc", fmt.label("desc"), m + 62, False),
        Column("qty", fmt.label("qty"), w - m - 230, True),
        Column("unit", fmt.label("unit"), w - m - 222, False),
        Column("price", fmt.label("price"), w - m - 120, True),
        Column("taxrate", fmt.label("tax"), w - m - 70, True),
        Column("amount", fmt.label("amount"), w - m - 2, True),
    ]
    bottom = pen.height - 100
    y = draw_table(
        pen,
        fmt,
        cols,
        y,
        left=m,
        right=w - m,
        bottom=bottom,
        size=8,
        on_new_page=_continuation(pen, fmt, m),
    )
    y = _ensure_room(pen, fmt, y, 70, m, bottom)
    draw_totals(pen, fmt, y + 6, label_x=w - m - 230, value_x=w - m - 2, size=9)
    fy = pen.height - 80
    pen.line(m, fy - 8, w - m, fy - 8, 0.4)
    pen.text(m, fy, inv.vendor.name, 8, bold=True)
    pen.text(m, fy + 11, f"{inv.vendor.street}, {inv.vendor.city}, {inv.vendor.country}", 7.5)
    tax = _tax_line(fmt)
    if tax:
        pen.text(m, fy + 22, tax, 7.5)
    bank = _bank_lines(fmt)
    if bank:
        pen.text(w - m, fy, fmt.label("bank"), 8, bold=True, align="right")
        for k, line in enumerate(bank):
            pen.text(w - m, fy + 11 + 11 * k, line, 7.5, align="right")


DRAW: dict[int, Callable[[Pen, synthetic.Fmt], None]] = {
    1: layout_classic,
    2: layout_banner,
    3: layout_letter,
    4: layout_boxed,
    5: layout_minimal,
    6: layout_sidebar,
    7: layout_compact,
    8: layout_statement,
}
