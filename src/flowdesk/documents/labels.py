"""The words that name invoice fields, in English, German and French.

Labels are matched on words, not characters: the text is folded (lower case, accents
removed) and split into tokens, abbreviations written with dots are joined (``P.O.`` ->
``po``) and the many ways of writing "number" (``No.``, ``Nr.``, ``#``, ``N°``,
``Nummer``, ``numéro``) become one token. A label matches at the start of a segment; the
longest label wins, so ``VAT Reg. No.`` is the tax id's label, not the tax's.

Lists are generic wording from invoices and receipts, never one vendor's.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from flowdesk.documents import locale

NO = "<no>"
# "n" alone is N° whose degree sign the OCR lost.
_NUMBER_WORDS = {"no", "nr", "nro", "num", "number", "nummer", "numero", "#", "n°", "nº", "n"}
# Abbreviations printed on receipts and invoices, read as the word.
_ABBREVIATIONS = {"amt": "amount", "ttl": "total", "tot": "total", "qty": "qty", "incl": "incl"}
_TOKEN_RE = re.compile(r"n[°º]|[^\W_]+|[#°%&@]")


@dataclass(frozen=True)
class Token:
    text: str  # canonical
    start: int
    end: int


def tokens(text: str) -> list[Token]:
    """Canonical tokens of ``text`` with their character spans in it."""
    folded = locale.fold(text)
    raw = [Token(m.group(0), m.start(), m.end()) for m in _TOKEN_RE.finditer(folded)]
    out: list[Token] = []
    i = 0
    while i < len(raw):
        tok = raw[i]
        # Join dotted abbreviations: P.O. -> po, i.e. single letters one character apart.
        if len(tok.text) == 1 and tok.text.isalpha():
            j = i
            joined = tok.text
            while (
                j + 1 < len(raw)
                and len(raw[j + 1].text) == 1
                and raw[j + 1].text.isalpha()
                and raw[j + 1].start - raw[j].end <= 1
                and folded[raw[j].end : raw[j + 1].start] in (".", "")
            ):
                j += 1
                joined += raw[j].text
            if j > i:
                out.append(Token(joined, tok.start, raw[j].end))
                i = j + 1
                continue
        text = NO if tok.text in _NUMBER_WORDS else _ABBREVIATIONS.get(tok.text, tok.text)
        out.append(Token(text, tok.start, tok.end))
        i += 1
    return out


def _phrases(*items: str) -> tuple[tuple[str, ...], ...]:
    out = []
    for item in items:
        out.append(tuple(NO if t == "NO" else t for t in item.split()))
    return tuple(out)


# field -> ((phrase tokens, strength), ...). "NO" stands for any way of writing "number".
_LABELS: dict[str, list[tuple[tuple[str, ...], float]]] = {}


def _add(field: str, strength: float, *phrases: str) -> None:
    for phrase in _phrases(*phrases):
        _LABELS.setdefault(field, []).append((phrase, strength))


_add(
    "invoice_number",
    1.0,
    "invoice NO",
    "invoice id",
    "invoice ref",
    "invoice reference",
    "inv NO",
    "tax invoice NO",
    "bill NO",
    "receipt NO",
    "document NO",
    "doc NO",
    "rechnungsnummer",
    "rechnungs NO",
    "rechnung NO",
    "re NO",
    "rg NO",
    "belegnummer",
    "beleg NO",
    "facture NO",
    "NO de facture",
    "NO facture",
    "NO de la facture",
)
_add("invoice_number", 0.55, "invoice", "rechnung", "facture", "NO", "reference", "ref")
_add(
    "invoice_date",
    1.0,
    "invoice date",
    "date of invoice",
    "date of issue",
    "issue date",
    "issued on",
    "issued",
    "billing date",
    "bill date",
    "invoice dt",
    "rechnungsdatum",
    "belegdatum",
    "ausstellungsdatum",
    "leistungsdatum",
    "date de facture",
    "date de facturation",
    "date d emission",
    "date de la facture",
    "facture du",
)
_add("invoice_date", 0.75, "date", "datum", "dated", "bizdate", "doc date", "txn date")
_add(
    "due_date",
    1.0,
    "due date",
    "payment due",
    "payment due date",
    "date due",
    "due on",
    "due by",
    "pay by",
    "payable by",
    "please pay by",
    "fallig am",
    "fallig",
    "falligkeit",
    "falligkeitsdatum",
    "zahlbar bis",
    "zahlungsziel",
    "date d echeance",
    "echeance",
    "a payer avant le",
    "payable avant le",
    "date limite de paiement",
    "date limite de reglement",
)
_add("due_date", 0.7, "due")
_add(
    "po_number",
    1.0,
    "po NO",
    "po",
    "po ref",
    "po reference",
    "purchase order",
    "purchase order NO",
    "customer po",
    "your po",
    "order NO",
    "your order",
    "your order NO",
    "your ref",
    "bestellnummer",
    "bestell NO",
    "bestellung NO",
    "ihre bestellung",
    "ihre bestellnummer",
    "auftragsnummer",
    "auftrag NO",
    "bon de commande",
    "NO de commande",
    "NO commande",
    "ref commande",
    "reference commande",
    "votre commande",
    "commande",
)
_add(
    "subtotal",
    1.0,
    "subtotal",
    "sub total",
    "net amount",
    "total net",
    "amount before tax",
    "total before tax",
    "total before vat",
    "total excl vat",
    "total excl tax",
    "total excluding vat",
    "total excluding tax",
    "total exclusive of vat",
    "excl vat",
    "zwischensumme",
    "nettobetrag",
    "summe netto",
    "netto",
    "gesamt netto",
    "nettosumme",
    "warenwert",
    "total ht",
    "sous total",
    "montant ht",
    "total hors taxes",
    "montant hors taxes",
    "total excl",
    "total excluding",
    "total exclusive",
    "total exclusive of gst",
    "total excl gst",
    "total excluding gst",
    "total before gst",
    "amount excl",
    "amount excluding",
    "amount before",
    "amount exclusive",
    "excl gst",
    "excl tax",
)
_add("subtotal", 0.7, "gross amount", "gross total", "gross")
_add("subtotal", 0.6, "net total", "nett total", "net", "total sales", "net amount")
_add(
    "tax",
    1.0,
    "tax",
    "vat",
    "sales tax",
    "gst",
    "hst",
    "pst",
    "total tax",
    "total vat",
    "total gst",
    "tax amount",
    "vat amount",
    "gst amount",
    "plus vat",
    "mwst",
    "ust",
    "umsatzsteuer",
    "mehrwertsteuer",
    "zzgl mwst",
    "zzgl ust",
    "zzgl",
    "tva",
    "montant tva",
    "total tva",
    "taxe",
    "taxes",
)
_add(
    "total",
    1.0,
    "total due",
    "amount due",
    "balance due",
    "grand total",
    "total amount",
    "total amount due",
    "amount payable",
    "total payable",
    "total to pay",
    "invoice total",
    "invoice amount",
    "total invoice",
    "total incl vat",
    "total incl tax",
    "total inc vat",
    "total including vat",
    "total including tax",
    "total incl",
    "total inclusive",
    "rounded total",
    "total rounded",
    "total round",
    "total after adj",
    "gesamtbetrag",
    "rechnungsbetrag",
    "endbetrag",
    "gesamtsumme",
    "zu zahlen",
    "zahlbetrag",
    "bruttobetrag",
    "gesamt brutto",
    "summe brutto",
    "total ttc",
    "montant ttc",
    "net a payer",
    "total a payer",
    "montant total",
    "montant du",
    "reste a payer",
)
_add("total", 0.75, "total", "gesamt", "summe", "brutto", "amount", "total sales incl")
_add("total", 0.65, "net total", "nett total", "total sales", "net amount")
_add(
    "vendor_tax_id",
    1.0,
    "vat NO",
    "vat reg NO",
    "vat reg",
    "vat registration NO",
    "vat registration",
    "vat id",
    "vat id NO",
    "tax id",
    "tax id NO",
    "tax NO",
    "tax reg NO",
    "tin",
    "ein",
    "federal tax id",
    "gst id",
    "gst id NO",
    "gst reg NO",
    "gst NO",
    "gst registration NO",
    "gst ref NO",
    "gst reg",
    "tax ref",
    "vat ref",
    "abn",
    "ust idnr",
    "ust id",
    "ust id NO",
    "ustid",
    "ustidnr",
    "ust NO",
    "steuernummer",
    "steuer NO",
    "st NO",
    "uid",
    "uid NO",
    "mwst NO",
    "NO tva",
    "NO de tva",
    "tva intracom",
    "NO tva intracom",
    "tva intracommunautaire",
    "NO tva intracommunautaire",
    "identifiant tva",
)
_add("iban", 1.0, "iban")
# A rounding adjustment between the computed and the payable total.
_add(
    "rounding",
    1.0,
    "rounding",
    "rounding adj",
    "rounding adjustment",
    "round adj",
    "round adjustment",
    "round off",
    "rounding off",
    "rundung",
    "arrondi",
)
# Summary tables (tax per rate) below the totals: their "Total" is not the invoice's.
_add(
    "summary",
    1.0,
    "gst summary",
    "gst analysis",
    "tax summary",
    "vat summary",
    "vat analysis",
    "tax analysis",
    "recapitulatif tva",
    "mwst zusammenfassung",
    "gstsummary",
    "taxsummary",
    "vatsummary",
)
# Labels that look like a field's but are something else: they block the shorter match.
_add(
    "ignore",
    1.0,
    "total qty",
    "total quantity",
    "total items",
    "total item",
    "item count",
    "total discount",
    "total savings",
    "total includes",
    "cash",
    "change",
    "change due",
    "cash tendered",
    "tendered",
    "payment",
    "paid",
    "amount paid",
    "total paid",
    "total tendered",
    "amount tendered",
    "total cash",
    "total points",
    "points",
    "balance",
    "opening balance",
    "closing balance",
    "total savings",
    "you saved",
    "customer vat",
    "customer vat NO",
    "your vat NO",
    "ihre ust idnr",
    "tax invoice",
    "tax rate",
    "vat rate",
    "tax %",
    "vat %",
    "total weight",
    "invoice to",
    "company NO",
    "company reg NO",
    "company registration NO",
    "co NO",
    "co reg NO",
    "reg NO",
    "registration NO",
    "roc NO",
    "business reg NO",
    "handelsregister",
    "siret",
    "siren",
    "rcs",
    "page",
    "seite",
)

# Words that open the customer's address block.
BILL_TO = _phrases(
    "bill to",
    "billed to",
    "invoice to",
    "sold to",
    "ship to",
    "deliver to",
    "delivery address",
    "customer",
    "client",
    "recipient",
    "rechnungsempfanger",
    "rechnungsadresse",
    "lieferadresse",
    "kunde",
    "an",
    "facture a",
    "adresse de facturation",
    "livrer a",
    "destinataire",
)
# Greetings and closing lines: never a vendor's name.
CLOSINGS = _phrases(
    "thank you",
    "thanks",
    "thank",
    "please come again",
    "welcome",
    "please",
    "danke",
    "vielen dank",
    "merci",
    "bienvenue",
    "have a nice day",
    "goods sold",
)
# Titles: never a vendor's name.
TITLES = _phrases(
    "invoice",
    "tax invoice",
    "commercial invoice",
    "receipt",
    "official receipt",
    "cash receipt",
    "cash bill",
    "bill",
    "statement",
    "credit note",
    "proforma invoice",
    "rechnung",
    "quittung",
    "gutschrift",
    "facture",
    "avoir",
    "recu",
    "simplified tax invoice",
)


@dataclass(frozen=True)
class LabelHit:
    """A label at the start of a segment."""

    field: str
    strength: float
    length: int  # tokens matched
    end: int  # character offset in the segment's text where the label ends


@functools.lru_cache(maxsize=65536)
def similar(read: str, word: str) -> bool:
    """``read`` is ``word``, or an OCR misreading of it: one wrong, missing or extra
    letter in a word of 5 letters or more, two in one of 9 or more."""
    if read == word:
        return True
    allowed = 2 if len(word) >= 9 else 1 if len(word) >= 5 else 0
    if not allowed or abs(len(read) - len(word)) > allowed:
        return False
    prev = list(range(len(word) + 1))
    for i, ca in enumerate(read, 1):
        cur = [i]
        for j, cb in enumerate(word, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        if min(cur) > allowed:
            return False
        prev = cur
    return prev[-1] <= allowed


def _starts(words: list[str], phrase: tuple[str, ...]) -> bool:
    if len(phrase) > len(words):
        return False
    return all(similar(w, p) for w, p in zip(words, phrase, strict=False))


def match(text: str, toks: list[Token] | None = None) -> LabelHit | None:
    """The longest label at the start of ``text``, or None (OCR slips allowed, see
    `similar`)."""
    toks = tokens(text) if toks is None else toks
    if not toks:
        return None
    words = [t.text for t in toks]
    best: LabelHit | None = None
    for field, phrases in _LABELS.items():
        for phrase, strength in phrases:
            n = len(phrase)
            if _starts(words, phrase):
                if _glued(text, toks[n - 1].end):
                    continue
                exact = tuple(words[:n]) == phrase
                better = (
                    best is None
                    or n > best.length
                    or (n == best.length and strength > best.strength)
                )
                if better:
                    best = LabelHit(
                        field, strength if exact else strength * 0.95, n, toks[n - 1].end
                    )
    return best


def _glued(text: str, end: int) -> bool:
    """``PO-2025-17``: the label word is part of a longer token, so it is not a label."""
    return end + 1 < len(text) and text[end] in "-/_" and text[end + 1].isalnum()


def starts_with(text: str, phrases: tuple[tuple[str, ...], ...]) -> int:
    """How many tokens of the longest phrase ``text`` starts with (0: none)."""
    words = [t.text for t in tokens(text)]
    best = 0
    for phrase in phrases:
        if len(phrase) <= len(words) and tuple(words[: len(phrase)]) == phrase:
            best = max(best, len(phrase))
    return best


def is_exactly(text: str, phrases: tuple[tuple[str, ...], ...]) -> bool:
    """``text`` is one of ``phrases`` and nothing else."""
    words = tuple(t.text for t in tokens(text))
    return words in phrases


# Column headers of line-item tables.
COLUMNS: dict[str, tuple[tuple[str, ...], ...]] = {
    "desc": _phrases(
        "description",
        "item description",
        "item",
        "items",
        "service",
        "services",
        "details",
        "product",
        "products",
        "article",
        "particulars",
        "bezeichnung",
        "beschreibung",
        "artikel",
        "leistung",
        "artikelbezeichnung",
        "designation",
        "libelle",
        "produit",
        "prestation",
        "description des prestations",
    ),
    "qty": _phrases(
        "qty",
        "quantity",
        "units",
        "menge",
        "anzahl",
        "qte",
        "quantite",
        "hours",
        "hrs",
        "stk",
        "qty ordered",
        "nb",
    ),
    "price": _phrases(
        "unit price",
        "price",
        "rate",
        "unit cost",
        "price per unit",
        "einzelpreis",
        "e preis",
        "preis",
        "stuckpreis",
        "ep",
        "prix unitaire",
        "pu ht",
        "pu",
        "prix unit",
        "prix",
        "prix ht",
        "unit price excl vat",
    ),
    "amount": _phrases(
        "amount",
        "total",
        "line total",
        "sum",
        "betrag",
        "gesamt",
        "gesamtpreis",
        "montant",
        "montant ht",
        "total ht",
        "net",
        "net amount",
        "summe",
        "amount excl vat",
        "ext price",
        "extended",
    ),
    "code": _phrases(
        "code",
        "sku",
        "item NO",
        "art NO",
        "artikel NO",
        "artikelnr",
        "ref",
        "reference",
        "product code",
        "part NO",
    ),
    "pos": _phrases("NO", "pos", "position", "line"),
    "unit": _phrases("unit", "uom", "einheit", "unite", "me"),
    "tax": _phrases("tax", "vat", "mwst", "ust", "tva", "tax %", "vat %", "gst"),
}
