"""The synthetic invoices' contents: vendors, customers, items and amounts drawn from a
seeded random generator, and how each locale prints them (labels, numbers, dates).

`make_invoice` draws one invoice; `Fmt` prints its values the way its locale does. The
generator (`flowdesk.documents.generate`) lays them out and writes the files.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date, timedelta
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

# Layouts the extractor was not tuned on: the benchmark reports them separately.
HELD_OUT_LAYOUTS = frozenset({7, 8})

LOCALES = ("en_US", "en_GB", "en_IE", "de_DE", "de_CH", "fr_FR")

CENT = Decimal("0.01")


# -- the invoice -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Party:
    name: str
    street: str
    city: str
    country: str
    email: str
    phone: str


@dataclass(frozen=True)
class Item:
    code: str
    description: str
    quantity: Decimal
    unit: str
    unit_price: Decimal
    amount: Decimal


@dataclass(frozen=True)
class Invoice:
    """One synthetic invoice: what is printed and what the extractor should find."""

    key: str
    layout: int
    locale: str
    language: str
    currency: str
    vendor: Party
    customer: Party
    number: str
    invoice_date: date
    due_date: date
    po_number: str | None
    vendor_tax_id: str | None
    iban: str | None
    bic: str | None
    items: tuple[Item, ...]
    tax_rate: Decimal
    subtotal: Decimal
    tax: Decimal
    total: Decimal
    font: str
    long_dates: bool

    def truth(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "layout": self.layout,
            "held_out": self.layout in HELD_OUT_LAYOUTS,
            "locale": self.locale,
            "font": self.font,
            "fields": {
                "vendor_name": self.vendor.name,
                "invoice_number": self.number,
                "invoice_date": self.invoice_date.isoformat(),
                "due_date": self.due_date.isoformat(),
                "currency": self.currency,
                "subtotal": str(self.subtotal),
                "tax": str(self.tax),
                "total": str(self.total),
                "vendor_tax_id": self.vendor_tax_id,
                "po_number": self.po_number,
                "iban": self.iban,
            },
            "line_items": [
                {
                    "description": i.description,
                    "quantity": _plain(i.quantity),
                    "unit_price": str(i.unit_price),
                    "amount": str(i.amount),
                }
                for i in self.items
            ],
        }


def _plain(value: Decimal) -> str:
    text = f"{value.normalize():f}"
    return text


# -- locale conventions ----------------------------------------------------------------------
@dataclass(frozen=True)
class Style:
    language: str
    currency: str
    decimal: str
    group: str
    symbol: str
    symbol_after: bool
    date_fmt: str  # "MDY/", "DMY/", "DMY."
    tax_rates: tuple[str, ...]
    country: str
    paper: tuple[float, float]


A4 = (595.28, 841.89)
LETTER = (612.0, 792.0)
STYLES: dict[str, Style] = {
    "en_US": Style(
        "en", "USD", ".", ",", "$", False, "MDY/", ("0.0625", "0.0725", "0.08"), "USA", LETTER
    ),
    "en_GB": Style("en", "GBP", ".", ",", "£", False, "DMY/", ("0.20",), "United Kingdom", A4),
    "en_IE": Style("en", "EUR", ".", ",", "€", False, "DMY/", ("0.23", "0.135"), "Ireland", A4),
    "de_DE": Style("de", "EUR", ",", ".", "€", True, "DMY.", ("0.19", "0.07"), "Deutschland", A4),
    "de_CH": Style("de", "CHF", ".", "'", "CHF", False, "DMY.", ("0.081",), "Schweiz", A4),
    "fr_FR": Style("fr", "EUR", ",", "\u00a0", "€", True, "DMY/", ("0.20", "0.10"), "France", A4),
}

LABELS: dict[str, dict[str, tuple[str, ...]]] = {
    "en": {
        "title": ("INVOICE", "Invoice", "TAX INVOICE"),
        "number": ("Invoice No.", "Invoice #", "Invoice Number", "Invoice no:"),
        "date": ("Invoice Date", "Date", "Date of Issue", "Issue Date"),
        "due": ("Due Date", "Payment Due", "Due"),
        "po": ("PO Number", "P.O. No.", "Purchase Order", "PO Ref."),
        "bill_to": ("Bill To", "Billed To", "Invoice To", "Customer"),
        "subtotal": ("Subtotal", "Net Amount", "Sub-total"),
        "tax": ("Tax", "VAT", "Sales Tax"),
        "total": ("Total", "Total Due", "Amount Due", "Balance Due", "Grand Total"),
        "tax_id": ("VAT Reg. No.", "VAT No.", "Tax ID"),
        "desc": ("Description", "Item", "Service"),
        "qty": ("Qty", "Quantity", "Units"),
        "price": ("Unit Price", "Rate", "Price"),
        "amount": ("Amount", "Line Total", "Total"),
        "code": ("Code", "SKU", "Item No."),
        "unit": ("Unit",),
        "page": ("Page",),
        "bank": ("Bank details", "Payment details", "Please pay to"),
        "thanks": ("Thank you for your business.", "Payment terms: net {days} days."),
        "continued": ("continued",),
        "pos": ("#",),
    },
    "de": {
        "title": ("RECHNUNG", "Rechnung"),
        "number": ("Rechnungsnummer", "Rechnungs-Nr.", "Rechnung Nr."),
        "date": ("Rechnungsdatum", "Datum"),
        "due": ("Fällig am", "Zahlbar bis", "Fälligkeitsdatum"),
        "po": ("Bestellnummer", "Ihre Bestellung", "Bestell-Nr."),
        "bill_to": ("Rechnungsempfänger", "Kunde", "An"),
        "subtotal": ("Zwischensumme", "Nettobetrag", "Summe netto"),
        "tax": ("MwSt.", "USt.", "zzgl. MwSt."),
        "total": ("Gesamtbetrag", "Rechnungsbetrag", "Endbetrag", "Gesamtsumme"),
        "tax_id": ("USt-IdNr.", "USt-ID", "UID"),
        "desc": ("Bezeichnung", "Beschreibung", "Artikel"),
        "qty": ("Menge", "Anzahl"),
        "price": ("Einzelpreis", "E-Preis", "Preis"),
        "amount": ("Gesamtpreis", "Betrag", "Gesamt"),
        "code": ("Art.-Nr.", "Artikelnr."),
        "unit": ("Einheit",),
        "page": ("Seite",),
        "bank": ("Bankverbindung", "Zahlung an"),
        "thanks": ("Vielen Dank für Ihren Auftrag.", "Zahlbar innerhalb von {days} Tagen."),
        "continued": ("Fortsetzung",),
        "pos": ("Pos.",),
    },
    "fr": {
        "title": ("FACTURE", "Facture"),
        "number": ("Facture N°", "N° de facture", "Numéro de facture"),
        "date": ("Date de facture", "Date", "Date d'émission"),
        "due": ("Date d'échéance", "Échéance", "À payer avant le"),
        "po": ("Bon de commande", "N° de commande", "Réf. commande"),
        "bill_to": ("Facturé à", "Client", "Adresse de facturation"),
        "subtotal": ("Total HT", "Sous-total", "Montant HT"),
        "tax": ("TVA",),
        "total": ("Total TTC", "Net à payer", "Montant TTC"),
        "tax_id": ("N° TVA intracom.", "N° TVA", "TVA intracommunautaire"),
        "desc": ("Désignation", "Description"),
        "qty": ("Qté", "Quantité"),
        "price": ("Prix unitaire", "P.U. HT", "Prix unit."),
        "amount": ("Montant HT", "Total HT", "Montant"),
        "code": ("Réf.", "Code"),
        "unit": ("Unité",),
        "page": ("Page",),
        "bank": ("Coordonnées bancaires", "Règlement par virement"),
        "thanks": ("Merci de votre confiance.", "Paiement à {days} jours."),
        "continued": ("suite",),
        "pos": ("N°",),
    },
}

# Where a country words a label its own way.
LOCALE_LABELS: dict[str, dict[str, tuple[str, ...]]] = {
    "en_US": {"tax": ("Sales Tax", "Tax"), "tax_id": ("Tax ID", "EIN", "Federal Tax ID")},
    "en_GB": {"tax": ("VAT",), "tax_id": ("VAT Reg. No.", "VAT No.", "VAT Registration No.")},
    "en_IE": {"tax": ("VAT",), "tax_id": ("VAT No.", "VAT Reg. No.")},
    "de_CH": {"tax": ("MWST", "MwSt."), "tax_id": ("UID", "MWST-Nr.")},
}

_MONTHS = {
    "en": "January February March April May June July August September October November "
    "December".split(),
    "de": "Januar Februar März April Mai Juni Juli August September Oktober November "
    "Dezember".split(),
    "fr": "janvier février mars avril mai juin juillet août septembre octobre novembre "
    "décembre".split(),
}

_SYLLABLES = (
    "nor ax ven tor lum bri cal dex sol mar kin tal ber gen fal ros win har lin mon "
    "vel tra cor den sta ric pel oro quin zan"
).split()
_SUFFIX = {
    "en_US": ("Inc.", "LLC", "Corp.", "Co."),
    "en_GB": ("Ltd", "Limited", "LLP", "plc"),
    "en_IE": ("Ltd", "Teoranta", "DAC"),
    "de_DE": ("GmbH", "AG", "KG", "GmbH & Co. KG", "e.K."),
    "de_CH": ("AG", "GmbH", "SA"),
    "fr_FR": ("SARL", "SAS", "S.A.", "EURL"),
}
_TRADES = {
    "en": (
        "Consulting",
        "Supplies",
        "Logistics",
        "Systems",
        "Engineering",
        "Print Works",
        "Office Solutions",
        "Software",
        "Trading",
        "Facilities",
    ),
    "de": (
        "Beratung",
        "Bürotechnik",
        "Logistik",
        "Systemhaus",
        "Maschinenbau",
        "Druckerei",
        "Handel",
        "Software",
        "Gebäudeservice",
        "Elektrotechnik",
    ),
    "fr": (
        "Conseil",
        "Fournitures",
        "Logistique",
        "Informatique",
        "Imprimerie",
        "Services",
        "Distribution",
        "Ingénierie",
        "Négoce",
        "Bureautique",
    ),
}
_STREETS = {
    "en": (
        "Market Street",
        "High Street",
        "Oak Avenue",
        "Station Road",
        "Mill Lane",
        "King Street",
        "Harbour Way",
        "Park Road",
    ),
    "de": (
        "Hauptstraße",
        "Bahnhofstraße",
        "Gartenweg",
        "Industriestraße",
        "Lindenallee",
        "Marktplatz",
        "Mühlenweg",
        "Schillerstraße",
    ),
    "fr": (
        "rue de la Paix",
        "avenue Victor Hugo",
        "boulevard Voltaire",
        "rue du Commerce",
        "place de la Gare",
        "rue des Lilas",
        "chemin des Vignes",
        "quai de la Loire",
    ),
}
_CITIES = {
    "en_US": (
        "Springfield, IL 62701",
        "Austin, TX 78701",
        "Denver, CO 80202",
        "Portland, OR 97204",
        "Columbus, OH 43215",
    ),
    "en_GB": ("Leeds LS1 4AP", "Bristol BS1 5TR", "Manchester M2 3WQ", "Reading RG1 2LU"),
    "en_IE": ("Dublin D02 XE81", "Cork T12 RW26", "Galway H91 E2K3"),
    "de_DE": ("10115 Berlin", "80331 München", "50667 Köln", "20095 Hamburg", "04109 Leipzig"),
    "de_CH": ("8001 Zürich", "3011 Bern", "4051 Basel", "6003 Luzern"),
    "fr_FR": ("75002 Paris", "69002 Lyon", "13001 Marseille", "31000 Toulouse", "44000 Nantes"),
}
_PEOPLE = (
    "Meridian Health Partners",
    "Blue Harbor Foods",
    "Alder & Finch",
    "Cobalt Retail Group",
    "Northwind Clinics",
    "Stadtwerke Emsland",
    "Hotel Seeblick",
    "Praxis Dr. Weber",
    "Boulangerie Martin",
    "Cabinet Lefèvre",
    "Atelier Moreau",
    "Kanzlei Braun",
    "Riverside Dental",
    "Greenway Schools",
    "Maison Dubois",
    "Bergbahn Flims",
)
_ITEMS = {
    "en": (
        "Consulting hours",
        "Laptop stand, aluminium",
        "Printer toner cartridge, black",
        "Annual software licence",
        "Cloud storage 1 TB (monthly)",
        "On-site installation",
        "Network switch 24-port",
        "Office chair, ergonomic",
        "A4 copy paper, 5 reams",
        "Maintenance contract Q3",
        "Project management",
        "Data migration service",
        "USB-C docking station",
        "Training workshop (half day)",
        "Travel expenses",
        "Shipping and handling",
        "Wireless keyboard",
        "Monitor 27 inch",
        "Support hours",
        "Design review",
    ),
    "de": (
        "Beratungsstunden",
        "Laptopständer Aluminium",
        "Tonerkartusche schwarz",
        "Softwarelizenz (jährlich)",
        "Cloud-Speicher 1 TB (monatlich)",
        "Montage vor Ort",
        "Netzwerk-Switch 24 Port",
        "Bürostuhl ergonomisch",
        "Kopierpapier A4, 5 Pakete",
        "Wartungsvertrag Q3",
        "Projektleitung",
        "Datenmigration",
        "USB-C Dockingstation",
        "Schulung (halber Tag)",
        "Reisekosten",
        "Versandkosten",
        "Funktastatur",
        "Monitor 27 Zoll",
        "Supportstunden",
        "Entwurfsprüfung",
    ),
    "fr": (
        "Heures de conseil",
        "Support pour ordinateur portable",
        "Cartouche de toner noir",
        "Licence logicielle annuelle",
        "Stockage cloud 1 To (mensuel)",
        "Installation sur site",
        "Commutateur réseau 24 ports",
        "Chaise de bureau",
        "Papier A4, 5 ramettes",
        "Contrat de maintenance T3",
        "Gestion de projet",
        "Migration de données",
        "Station d'accueil USB-C",
        "Formation (demi-journée)",
        "Frais de déplacement",
        "Frais de port",
        "Clavier sans fil",
        "Écran 27 pouces",
        "Heures de support",
        "Revue de conception",
    ),
}
_UNITS = {"en": ("pcs", "h", "ea"), "de": ("Stk.", "Std.", "Pkt."), "fr": ("pce", "h", "u")}
_IBAN_FORMATS = {
    "GB": (22, "GB"),
    "IE": (22, "IE"),
    "DE": (22, "DE"),
    "CH": (21, "CH"),
    "FR": (27, "FR"),
}


def _q(value: Decimal) -> Decimal:
    return value.quantize(CENT, rounding=ROUND_HALF_UP)


def iban_for(country: str, rng: random.Random) -> str:
    """A random IBAN with a valid checksum (ISO 13616, mod 97)."""
    length, _ = _IBAN_FORMATS[country]
    if country in ("GB", "IE"):
        bban = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(4))
        bban += "".join(rng.choice("0123456789") for _ in range(length - 8))
    else:
        bban = "".join(rng.choice("0123456789") for _ in range(length - 4))
    numeric = "".join(str(int(ch, 36)) for ch in bban + country + "00")
    check = 98 - int(numeric) % 97
    return f"{country}{check:02d}{bban}"


def _tax_id(locale: str, rng: random.Random) -> str | None:
    digits = "".join(rng.choice("0123456789") for _ in range(12))
    if locale == "en_US":
        return f"{digits[:2]}-{digits[2:9]}"
    if locale == "en_GB":
        return f"GB{digits[:3]} {digits[3:7]} {digits[7:9]}"
    if locale == "en_IE":
        return f"IE{digits[:7]}{rng.choice('ABCDEFGHW')}"
    if locale == "de_DE":
        return f"DE{digits[:9]}"
    if locale == "de_CH":
        return f"CHE-{digits[:3]}.{digits[3:6]}.{digits[6:9]} MWST"
    return f"FR{digits[:2]}{digits[2:11]}"


def _name(rng: random.Random, locale: str) -> str:
    style = STYLES[locale]
    word = "".join(rng.choice(_SYLLABLES) for _ in range(rng.choice((2, 2, 3)))).capitalize()
    trade = rng.choice(_TRADES[style.language])
    pattern = rng.random()
    if pattern < 0.45:
        return f"{word} {trade} {rng.choice(_SUFFIX[locale])}"
    if pattern < 0.75:
        return f"{word} {rng.choice(_SUFFIX[locale])}"
    other = "".join(rng.choice(_SYLLABLES) for _ in range(2)).capitalize()
    joiner = {"en": "&", "de": "&", "fr": "et"}[style.language]
    return f"{word} {joiner} {other} {rng.choice(_SUFFIX[locale])}"


def _party(rng: random.Random, locale: str, name: str) -> Party:
    style = STYLES[locale]
    number = rng.randint(1, 240)
    street = rng.choice(_STREETS[style.language])
    street_line = f"{number} {street}" if style.language in ("en", "fr") else f"{street} {number}"
    slug = "".join(ch for ch in name.lower() if ch.isalpha())[:12] or "mail"
    phone = f"+{rng.randint(1, 49)} {rng.randint(100, 999)} {rng.randint(100000, 999999)}"
    return Party(
        name,
        street_line,
        rng.choice(_CITIES[locale]),
        style.country,
        f"billing@{slug}.example",
        phone,
    )


def make_invoice(
    key: str, layout: int, locale: str, rng: random.Random, fonts: Sequence[str]
) -> Invoice:
    """Draw every value of one invoice from ``rng``."""
    style = STYLES[locale]
    vendor = _party(rng, locale, _name(rng, locale))
    customer_locale = locale
    customer = _party(rng, customer_locale, rng.choice(_PEOPLE))
    year = rng.choice((2024, 2025))
    issued = date(year, 1, 1) + timedelta(days=rng.randint(0, 364))
    due = issued + timedelta(days=rng.choice((7, 10, 14, 30, 30, 45, 60)))
    number = rng.choice(
        (
            f"INV-{year}-{rng.randint(1, 9999):04d}",
            f"{year}/{rng.randint(100, 9999)}",
            f"RE-{rng.randint(10000, 99999)}",
            f"F{year}-{rng.randint(1, 999):03d}",
            f"A-{rng.randint(1000, 9999)}",
            f"{rng.randint(100000, 999999)}",
        )
    )
    po = None
    if rng.random() < 0.6:
        po = rng.choice(
            (
                f"PO-{year}-{rng.randint(100, 9999)}",
                f"45000{rng.randint(10000, 99999)}",
                f"BE-{rng.randint(10000, 99999)}",
                f"PO{rng.randint(100000, 999999)}",
            )
        )
    n_items = rng.choice((1, 2, 3, 3, 4, 5, 6, 8)) if rng.random() < 0.8 else rng.randint(22, 60)
    names = _ITEMS[style.language]
    items: list[Item] = []
    for _ in range(n_items):
        desc = rng.choice(names)
        if rng.random() < 0.3:
            desc = f"{desc} ({rng.choice(('rev.', 'Ref', 'No.'))} {rng.randint(10, 999)})"
        qty = Decimal(rng.choice((1, 1, 1, 2, 3, 4, 5, 10, 12, 20, 25)))
        if rng.random() < 0.12:
            qty = Decimal(rng.choice(("0.5", "1.5", "2.5", "7.5")))
        price = _q(Decimal(rng.randint(250, 250000)) / 100)
        if rng.random() < 0.5:
            price = _q(Decimal(rng.randint(5, 900)))
        items.append(
            Item(
                code=f"{rng.choice('ABCDEFGHKMP')}{rng.randint(1000, 99999)}",
                description=desc,
                quantity=qty,
                unit=rng.choice(_UNITS[style.language]),
                unit_price=price,
                amount=_q(qty * price),
            )
        )
    subtotal = sum((i.amount for i in items), Decimal("0.00"))
    rate = Decimal(rng.choice(style.tax_rates))
    tax = _q(subtotal * rate)
    country = locale[-2:]
    iban = iban_for(country, rng) if country in _IBAN_FORMATS else None
    bic = None
    if iban:
        bic = (
            "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(4))
            + country
            + (rng.choice(("XX", "MM", "2L", "FF")))
        )
    return Invoice(
        key=key,
        layout=layout,
        locale=locale,
        language=style.language,
        currency=style.currency,
        vendor=vendor,
        customer=customer,
        number=number,
        invoice_date=issued,
        due_date=due,
        po_number=po,
        vendor_tax_id=_tax_id(locale, rng) if rng.random() < 0.9 else None,
        iban=iban,
        bic=bic,
        items=tuple(items),
        tax_rate=rate,
        subtotal=subtotal,
        tax=tax,
        total=subtotal + tax,
        font=rng.choice(list(fonts)),
        long_dates=rng.random() < 0.25,
    )


# -- formatting ------------------------------------------------------------------------------
@dataclass
class Fmt:
    """How one invoice prints numbers, money and dates, and which labels it uses."""

    inv: Invoice
    rng: random.Random
    chosen: dict[str, str] = field(default_factory=dict)

    @property
    def style(self) -> Style:
        return STYLES[self.inv.locale]

    def label(self, key: str) -> str:
        if key not in self.chosen:
            options = LOCALE_LABELS.get(self.inv.locale, {}).get(key)
            self.chosen[key] = self.rng.choice(options or LABELS[self.inv.language][key])
        return self.chosen[key]

    def number(self, value: Decimal, decimals: int = 2) -> str:
        style = self.style
        quantized = value.quantize(Decimal(1).scaleb(-decimals)) if decimals else value
        sign = "-" if quantized < 0 else ""
        whole, _, frac = f"{abs(quantized):f}".partition(".")
        groups: list[str] = []
        while len(whole) > 3:
            groups.insert(0, whole[-3:])
            whole = whole[:-3]
        groups.insert(0, whole)
        text = style.group.join(groups)
        return f"{sign}{text}{style.decimal + frac if frac else ''}"

    def qty(self, value: Decimal) -> str:
        if value == value.to_integral_value():
            return str(int(value))
        return self.number(value, 1 if value * 10 == (value * 10).to_integral_value() else 2)

    def money(self, value: Decimal, symbol: bool = True) -> str:
        text = self.number(value)
        if not symbol:
            return text
        style = self.style
        if style.symbol_after:
            return f"{text} {style.symbol}"
        if style.symbol.isalpha():
            return f"{style.symbol} {text}"
        return f"{style.symbol}{text}"

    def date(self, value: date) -> str:
        style = self.style
        if self.inv.long_dates:
            month = _MONTHS[style.language][value.month - 1]
            if style.language == "en" and style.date_fmt.startswith("MDY"):
                return f"{month} {value.day}, {value.year}"
            if style.language == "de":
                return f"{value.day}. {month} {value.year}"
            return f"{value.day} {month} {value.year}"
        if style.date_fmt == "MDY/":
            return f"{value.month:02d}/{value.day:02d}/{value.year}"
        if style.date_fmt == "DMY.":
            return f"{value.day:02d}.{value.month:02d}.{value.year}"
        return f"{value.day:02d}/{value.month:02d}/{value.year}"

    def tax_label(self) -> str:
        rate = self.inv.tax_rate * 100
        shown = f"{rate.normalize():f}".replace(".", self.style.decimal)
        base = self.label("tax")
        if self.inv.language == "fr":
            return f"{base} {shown} %"
        return f"{base} {shown}%" if self.rng.random() < 0.5 else f"{base} ({shown}%)"
