"""`flowdesk documents extract` and `flowdesk demo-data invoices`, run as subprocesses the
way a user runs them."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from reportlab.lib.pdfencrypt import StandardEncryption
from reportlab.pdfgen import canvas

from flowdesk.documents import FIELD_NAMES

from .conftest import FLOWDESK, Procs

DATA = Path(__file__).resolve().parent.parent / "data" / "invoices"


def flowdesk(
    procs: Procs, cwd: Path, *args: str, timeout: float = 60.0
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWDESK_")}
    return procs.run((*FLOWDESK, *args), env=env, cwd=cwd, timeout=timeout)


def sample(layout: int, kind: str) -> tuple[Path, dict[str, object]]:
    for path in sorted(DATA.glob(f"*-L{layout}-*.json")):
        truth = json.loads(path.read_text("utf-8"))
        files = truth["files"]
        assert isinstance(files, dict)
        if kind in files:
            return DATA / files[kind], truth
    raise AssertionError(f"no {kind} of layout {layout}")


def test_extract_json_from_a_digital_pdf(procs: Procs, tmp_path: Path) -> None:
    path, truth = sample(3, "pdf")
    done = flowdesk(procs, tmp_path, "documents", "extract", str(path), "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert list(result["fields"]) == list(FIELD_NAMES)
    fields = truth["fields"]
    assert isinstance(fields, dict)
    for name in FIELD_NAMES:
        entry = result["fields"][name]
        assert entry["value"] == fields[name], name
        assert set(entry) >= {"value", "confidence", "page", "bbox"}
    assert len(result["line_items"]) == len(truth["line_items"])  # type: ignore[arg-type]
    assert isinstance(result["validation"], list)


def test_extract_from_a_scan_prints_a_readable_summary(procs: Procs, tmp_path: Path) -> None:
    path, truth = sample(1, "scan")
    done = flowdesk(procs, tmp_path, "documents", "extract", str(path), timeout=120)
    assert done.returncode == 0, done.stderr
    fields = truth["fields"]
    assert isinstance(fields, dict)
    assert "by OCR" in done.stdout
    for name in ("invoice_number", "total"):
        line = next(line for line in done.stdout.splitlines() if line.strip().startswith(name))
        assert str(fields[name]) in line


def test_bad_documents_exit_with_a_reason(procs: Procs, tmp_path: Path) -> None:
    empty = tmp_path / "empty.pdf"
    empty.write_bytes(b"")
    locked = tmp_path / "locked.pdf"
    pdf = canvas.Canvas(str(locked), encrypt=StandardEncryption("secret", ownerPassword="o"))
    pdf.drawString(72, 700, "Invoice 1")
    pdf.save()
    for path, code in ((empty, "empty_file"), (locked, "encrypted_pdf")):
        done = flowdesk(procs, tmp_path, "documents", "extract", str(path), "--json")
        assert done.returncode == 2, done.stderr
        assert json.loads(done.stdout) == {
            "error": {"code": code, "message": done.stderr[7:].strip()}
        }
        assert done.stderr.startswith("error: ")
        assert "Traceback" not in done.stderr
    done = flowdesk(procs, tmp_path, "documents", "extract", str(empty))
    assert done.returncode == 2 and "empty (0 bytes)" in done.stderr and done.stdout == ""


def test_demo_data_writes_invoices_with_their_truth(procs: Procs, tmp_path: Path) -> None:
    out = tmp_path / "samples"
    done = flowdesk(
        procs, tmp_path, "demo-data", "invoices", "--out", str(out), "--count", "3", "--seed", "11"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith(f"3 invoices in {out}")
    truths = sorted(out.glob("*.json"))
    assert len(truths) == 3
    for path in truths:
        truth = json.loads(path.read_text("utf-8"))
        assert (out / truth["files"]["pdf"]).exists() and (out / truth["files"]["scan"]).exists()
    # The same seed gives the same invoices.
    again = tmp_path / "again"
    flowdesk(
        procs,
        tmp_path,
        "demo-data",
        "invoices",
        "--out",
        str(again),
        "--count",
        "3",
        "--seed",
        "11",
        "--no-scans",
    )
    assert [p.read_text("utf-8").split('"files"')[0] for p in truths] == [
        p.read_text("utf-8").split('"files"')[0] for p in sorted(again.glob("*.json"))
    ]
    done = flowdesk(procs, tmp_path, "demo-data", "invoices", "--layouts", "9", "--out", str(out))
    assert done.returncode == 1 and "unknown layouts [9]" in done.stderr
