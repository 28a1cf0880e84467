"""`flowdesk models` for local classifiers, run as subprocesses on a real models directory:
train on a small CSV and a small JSONL (slices of Banking77), list, eval --json,
promote and rollback, and the errors a person meets with bad files and names."""

from __future__ import annotations

import csv
import json
import os
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from .conftest import FLOWDESK, Procs

ROOT = Path(__file__).resolve().parents[2]
BANKING = ROOT / "data" / "banking77" / "train.csv"
INTENTS = [
    "activate_my_card",
    "age_limit",
    "atm_support",
    "card_arrival",
    "exchange_rate",
    "lost_or_stolen_card",
    "pin_blocked",
    "top_up_failed",
]


def _rows(per_label: int) -> list[tuple[str, str]]:
    counts: dict[str, int] = {}
    out = []
    with BANKING.open(newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            label = row["category"]
            if label in INTENTS and counts.get(label, 0) < per_label:
                counts[label] = counts.get(label, 0) + 1
                out.append((row["text"], label))
    return out


class Models:
    """Runs ``flowdesk models ...`` in a temporary folder with its own models directory."""

    def __init__(self, root: Path, procs: Procs) -> None:
        self.root = root
        self.procs = procs
        self.dir = root / "models"
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWDESK_")}
        env.update(FLOWDESK_MODELS_DIR=str(self.dir), PYTHONUNBUFFERED="1")
        self.env = env

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.procs.run((*FLOWDESK, "models", *args), env=self.env, cwd=self.root, timeout=90)

    def ok(self, *args: str) -> str:
        result = self.run(*args)
        assert result.returncode == 0, f"models {' '.join(args)}: {result.stderr}"
        return result.stdout

    def json(self, *args: str) -> Any:
        return json.loads(self.ok(*args, "--json"))

    def fails(self, *args: str) -> str:
        result = self.run(*args)
        assert result.returncode == 1, f"models {' '.join(args)} exited {result.returncode}"
        assert result.stderr.startswith("error: "), result.stderr
        assert "Traceback" not in result.stderr, result.stderr
        return result.stderr


@pytest.fixture
def models(tmp_path: Path, procs: Procs) -> Models:
    root = tmp_path / "work"
    root.mkdir()
    return Models(root, procs)


def _write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[str]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def test_train_list_eval_promote_rollback(models: Models) -> None:
    data = _write_csv(models.root / "intents.csv", ["utterance", "intent"], _rows(25))
    out = models.ok(
        "train", "intent", str(data), "--text-column", "utterance", "--label-column", "intent"
    )
    assert "intent v1: trained on 160 examples (8 labels), 40 held back" in out
    assert "features tfidf+embeddings" in out
    assert "held-out accuracy" in out and "macro-F1" in out and "ECE" in out
    assert "v1 is the current version of intent" in out
    assert (models.dir / "intent" / "v1" / "model.joblib").exists()

    listing = models.json("list")
    assert [t["task"] for t in listing["tasks"]] == ["intent"]
    (task,) = listing["tasks"]
    assert task["current"] == "v1" and [v["version"] for v in task["versions"]] == ["v1"]
    assert task["versions"][0]["features"] == "tfidf+embeddings"
    assert task["versions"][0]["metrics"]["accuracy"] >= 0.8

    # the eval columns default to the ones the version was trained with
    report = models.json("eval", "intent", str(data))
    assert report["version"] == "v1" and report["n"] == 200
    assert report["accuracy"] >= 0.9 and report["macro_f1"] >= 0.9
    assert 0.0 <= report["ece"] <= 1.0
    assert report["oos_precision"] is None and report["out_of_scope_label"] is None
    text = models.ok("eval", "intent", str(data))
    assert "accuracy" in text and "macro-F1" in text and "ECE" in text

    out = models.ok(
        "train", "intent", str(data), "--text-column", "utterance", "--label-column", "intent",
        "--features", "tfidf",
    )  # fmt: skip
    assert "intent v2:" in out and "features tfidf;" in out
    assert "v1 stays current; make v2 current with `flowdesk models promote intent v2`" in out

    assert "intent: current v2" in models.ok("promote", "intent", "v2")
    assert models.json("eval", "intent", str(data))["version"] == "v2"
    assert models.json("eval", "intent", str(data), "--version", "v1")["version"] == "v1"
    listing = models.json("list")
    assert listing["tasks"][0]["current"] == "v2"
    assert [v["features"] for v in listing["tasks"][0]["versions"]] == ["tfidf+embeddings", "tfidf"]

    assert models.json("rollback", "intent")["current"] == "v1"
    assert "Nothing to roll back to" in models.fails("rollback", "intent")

    assert models.json("canary", "intent", "v2", "20")["canary"] == {"version": "v2", "percent": 20}
    assert models.json("shadow", "intent", "v2")["shadow"] == {"version": "v2"}
    assert "canary v2 20%  shadow v2" in models.ok("list")

    answers = models.json("predict", "intent", "my card still has not arrived")["answers"]
    assert answers[0]["label"] == "card_arrival"


def test_jsonl_with_an_out_of_scope_label(models: Models) -> None:
    lines = []
    for text, label in _rows(30):
        label = "oos" if label in ("age_limit", "exchange_rate") else label
        lines.append(json.dumps({"text": text, "label": label}))
    data = models.root / "support.jsonl"
    data.write_text("\n".join(lines) + "\n", "utf-8")
    trained = models.json("train", "support", str(data), "--out-of-scope-label", "oos")
    assert trained["version"] == "v1" and trained["current"] == "v1"
    assert trained["out_of_scope"]["label"] == "oos"
    assert trained["out_of_scope"]["trained_class"] is True
    threshold = trained["out_of_scope"]["threshold"]
    assert threshold is not None and 0.0 <= threshold < 1.0
    assert trained["metrics"]["oos_recall"] is not None

    report = models.json("eval", "support", str(data))
    assert report["out_of_scope_label"] == "oos" and report["threshold"] == threshold
    assert report["oos_precision"] >= 0.8 and report["oos_recall"] >= 0.8
    text = models.ok("eval", "support", str(data))
    assert "out of scope ('oos'): precision" in text and "recall" in text

    answers = models.json("predict", "support", "how old must I be to sign up?")["answers"]
    assert answers[0]["label"] == "oos" and answers[0]["out_of_scope"] is True


def test_errors_are_clear(models: Models) -> None:
    root = models.root
    assert "no such file" in models.fails("train", "t", str(root / "nope.csv"))

    cols = _write_csv(root / "cols.csv", ["message", "intent"], [("hi", "a"), ("yo", "b")])
    err = models.fails("train", "t", str(cols))
    assert "unknown columns 'text', 'label'" in err and "'message', 'intent'" in err
    err = models.fails("train", "t", str(cols), "--text-column", "message")
    assert "unknown column 'label'" in err and "'message', 'intent'" in err

    one = _write_csv(root / "one.csv", ["text", "label"], [("hi", "a"), ("yo", "a")])
    assert "at least 2 labels" in models.fails("train", "t", str(one))

    blank = _write_csv(root / "blank.csv", ["text", "label"], [("hi", "a"), ("  ", "b")])
    assert "blank.csv, line 3: the text is empty" in models.fails("train", "t", str(blank))

    broken = root / "broken.csv"
    broken.write_text("text,label\nhi,a\nyo,b,extra\n", "utf-8")
    assert "line 3: malformed CSV" in models.fails("train", "t", str(broken))

    bad = root / "bad.jsonl"
    bad.write_text('{"text": "hi", "label": "a"}\n{"text": "yo" "label": "b"}\n', "utf-8")
    assert "bad.jsonl, line 2: malformed JSON" in models.fails("train", "t", str(bad))

    assert "No local model task 'ghost'" in models.fails("eval", "ghost", str(one))
    assert "No local model task 'ghost'" in models.fails("promote", "ghost", "v1")
    assert "No local model task 'ghost'" in models.fails("rollback", "ghost")
    assert models.ok("list").startswith("no models in ")

    data = _write_csv(root / "ok.csv", ["text", "label"], _rows(6))
    models.ok("train", "t", str(data), "--features", "tfidf")
    err = models.fails("promote", "t", "v9")
    assert "has no version 'v9'" in err and "v1" in err
    assert "has no version 'v3'" in models.fails("eval", "t", str(data), "--version", "v3")
    assert "Bad model task name" in models.fails("train", "../up", str(data))
    assert "--features 'bert'" in models.fails("train", "t", str(data), "--features", "bert")
