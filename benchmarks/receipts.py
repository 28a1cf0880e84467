"""Key fields of real receipts no one here wrote: SROIE 2019 (ICDAR), training split.

Each receipt's ground-truth text lines and boxes go through `Document.from_words` into the
same extractor the invoices use (no receipt-specific rules); its vendor name, invoice date
and total are compared with the annotated company, date and total.

A fixed 30% of the receipts (by a hash of their key) is held back: it was never looked at
while the extractor was tuned, and its figures are the ones that count. The other 70% is
the tuning part, printed for comparison.

    python benchmarks/receipts.py [--data DIR] [--part held-out|tuning|all]

Exact match: the company after collapsing spaces (case and punctuation kept; a relaxed
figure ignores them), the date as a calendar date (day first, the receipts are
Malaysian: locale hint en_MY), the total as a number.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import time
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from flowdesk.documents import Document, extract_invoice
from flowdesk.documents import locale as loc

DEFAULT_DATA = Path("/work/shared/data/sroie-train")
HELD_OUT_SHARE = 3  # out of 10
FIELDS = {"company": "vendor_name", "date": "invoice_date", "total": "total"}


def held_out(key: str) -> bool:
    """The fixed split: a receipt is held out when its key's SHA-256 ends in 0, 1 or 2
    (mod 10)."""
    return int(hashlib.sha256(key.encode()).hexdigest(), 16) % 10 < HELD_OUT_SHARE


def norm_company(text: str | None, relaxed: bool = False) -> str | None:
    if text is None:
        return None
    out = re.sub(r"\s+", " ", text).strip()
    if relaxed:
        out = re.sub(r"[^A-Z0-9]", "", out.upper())
    return out or None


def norm_date(text: str | None) -> str | None:
    if not text:
        return None
    found = loc.parse_date(text, "DMY")
    return found.isoformat() if found else None


def norm_total(text: str | None) -> Decimal | None:
    if not text:
        return None
    try:
        return Decimal(re.sub(r"[^0-9.\-]", "", text)).quantize(Decimal("0.01"))
    except InvalidOperation:
        return None


@dataclass
class Score:
    predicted: int = 0
    truth: int = 0
    correct: int = 0
    misses: list[str] = field(default_factory=list)

    def add(self, key: str, got: Any, want: Any) -> None:
        if got is not None:
            self.predicted += 1
        if want is not None:
            self.truth += 1
        if got is not None and want is not None and got == want:
            self.correct += 1
        elif want is not None or got is not None:
            self.misses.append(f"{key}: got {got!r}, want {want!r}")

    def prf(self) -> tuple[float, float, float]:
        p = self.correct / self.predicted if self.predicted else 0.0
        r = self.correct / self.truth if self.truth else 0.0
        f = 2 * p * r / (p + r) if p + r else 0.0
        return p, r, f


def run(rows: list[dict[str, Any]], show_misses: int = 0) -> dict[str, Score]:
    scores = {name: Score() for name in (*FIELDS, "company (relaxed)")}
    for row in rows:
        words = list(zip(row["words"], row["bboxes"], strict=True))
        size = row["image_size"]
        doc = Document.from_words(words, size["width"], size["height"], path=row["key"])
        result = extract_invoice(doc, locale="en_MY")
        fields = result["fields"]
        truth = row["entities"]
        scores["company"].add(
            row["key"],
            norm_company(fields["vendor_name"]["value"]),
            norm_company(truth.get("company")),
        )
        scores["company (relaxed)"].add(
            row["key"],
            norm_company(fields["vendor_name"]["value"], True),
            norm_company(truth.get("company"), True),
        )
        scores["date"].add(
            row["key"], fields["invoice_date"]["value"], norm_date(truth.get("date"))
        )
        scores["total"].add(
            row["key"], norm_total(fields["total"]["value"]), norm_total(truth.get("total"))
        )
    return scores


def report(
    title: str,
    rows: list[dict[str, Any]],
    seconds: float,
    scores: dict[str, Score],
    show_misses: int,
) -> None:
    print(f"\n{title}: {len(rows)} receipts, {len(rows) / seconds:.0f} receipts/s")
    print(f"  {'field':<20} {'precision':>9} {'recall':>7} {'F1':>6}")
    for name, score in scores.items():
        p, r, f = score.prf()
        print(f"  {name:<20} {p:9.3f} {r:7.3f} {f:6.3f}")
        for miss in score.misses[:show_misses]:
            print(f"      {miss}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--part", choices=("held-out", "tuning", "all"), default="held-out")
    parser.add_argument("--show-misses", type=int, default=0)
    args = parser.parse_args(argv)
    path = args.data / "metadata.jsonl"
    if not path.exists():
        print(f"no SROIE data at {path}", file=sys.stderr)
        return 2
    rows = [json.loads(line) for line in path.read_text("utf-8").splitlines() if line.strip()]
    parts = {
        "held-out": [r for r in rows if held_out(r["key"])],
        "tuning": [r for r in rows if not held_out(r["key"])],
    }
    wanted = ["held-out", "tuning"] if args.part == "all" else [args.part]
    for name in wanted:
        started = time.perf_counter()
        scores = run(parts[name])
        seconds = time.perf_counter() - started
        label = (
            "held-out part (never looked at while tuning)"
            if name == "held-out"
            else ("tuning part")
        )
        report(label, parts[name], seconds, scores, args.show_misses)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
