"""Support-triage benchmark: intent quality on held-back Banking77 messages, out-of-scope
detection with simulated out-of-scope traffic, and messages per second through the whole
assistant.

    python benchmarks/support.py [--data data/banking77/train.csv] [--features auto]
                                 [--oos-intents 5] [--known-oos-intents 5]
                                 [--messages 300] [--seed 0]

1. Accuracy on unseen messages (the target). The examples of all 77 intents are split
   stratified, 80 % to train and 20 % held back; the model is trained on the 80 % only and
   measured on the held-back 20 %, which it never saw. Printed: accuracy against the 0.90
   target, macro-F1, expected calibration error (15 bins), and, for a few auto-resolve
   thresholds, how many messages clear each one and how accurate those are: a calibrated
   threshold t leaves answers that are right at least a share t of the time.
2. Out-of-scope detection. Banking77 has no out-of-scope messages, so some are simulated:
   ``--oos-intents`` intents, chosen by ``--seed``, are never given to training;
   ``--known-oos-intents`` other intents are given to it as examples of the out-of-scope
   class (what a deployment collects from its own traffic). With the same 80/20 split, a
   second model trains on the rest (its out-of-scope confidence threshold is tuned inside
   the training part) and is measured on the held-back 20 % of every intent, the
   out-of-scope ones relabelled ``out_of_scope``. Printed: out-of-scope precision and
   recall, accuracy on the held-back messages of the intents it serves (a message it
   wrongly flags counts as wrong), and accuracy with the out-of-scope messages counted too
   (right when flagged), with macro-F1 and ECE.
3. Throughput. The model of part 2 behind the gateway (``type = "local"``), the assistant on
   a fresh SQLite store with one in-process worker, tickets to a SQLite ``tickets`` table:
   ``--messages`` held-back texts, each on its own thread, go in through
   `Support.receive`; a message is done when its conversation succeeded or waits for a
   person. Printed: messages/s, and how many ended answered / ticket / escalated.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sqlite3
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
from sklearn.model_selection import train_test_split

import flowdesk
from flowdesk.assistants import installed, knowledge, support, tickets
from flowdesk.connectors import sql
from flowdesk.models import registry, training
from flowdesk.models.gateway import Gateway
from flowdesk.store import people

ROOT = Path(__file__).resolve().parents[1]
TARGET_ACCURACY = 0.90
OOS = "out_of_scope"


def _split(
    examples: training.Examples, n_oos: int, n_known: int, seed: int
) -> tuple[list[str], list[str], list[str], list[str], list[str]]:
    intents = sorted(set(examples.labels))
    picked = random.Random(seed).sample(intents, n_oos + n_known)
    oos, known = sorted(picked[:n_oos]), set(picked[n_oos:])
    index = np.arange(len(examples.labels))
    keep, held = train_test_split(
        index, test_size=0.2, random_state=seed, stratify=list(examples.labels)
    )
    train_t = [examples.texts[i] for i in keep if examples.labels[i] not in oos]
    train_l = [
        OOS if examples.labels[i] in known else examples.labels[i]
        for i in keep
        if examples.labels[i] not in oos
    ]
    test_t = [examples.texts[i] for i in held]
    test_l = [
        OOS if examples.labels[i] in oos or examples.labels[i] in known else examples.labels[i]
        for i in held
    ]
    return train_t, train_l, test_t, test_l, oos


def unseen(args: argparse.Namespace) -> None:
    """Part 1: all intents, trained on 80 %, measured on the held-back 20 %."""
    examples = training.load_examples(args.data, label_column="category")
    started = time.perf_counter()
    result = training.train(examples, features=args.features, holdout=0.2, seed=args.seed)
    seconds = time.perf_counter() - started
    clf, m = result.classifier, result.metrics
    held = result.meta["n_heldout"]
    print(
        f"1. {result.meta['features']}, {len(clf.classes)} intents: trained on "
        f"{result.meta['n_train']} in {seconds:.1f} s; measured on {held} held-back messages"
    )
    print(
        f"   accuracy {m.accuracy:.4f}  macro-F1 {m.macro_f1:.4f}  ECE {m.ece:.4f}; "
        f"target accuracy >= {TARGET_ACCURACY} on unseen messages: "
        f"{'met' if m.accuracy >= TARGET_ACCURACY else 'NOT met'}"
    )
    _, held_back = train_test_split(  # the same split `training.train` made
        np.arange(len(examples.labels)),
        test_size=held,
        random_state=args.seed,
        stratify=list(examples.labels),
    )
    texts = [examples.texts[i] for i in held_back]
    truth = [examples.labels[i] for i in held_back]
    _, predicted, confidence, _ = clf.decide(clf.predict_proba(texts))
    right = np.array([p == t for p, t in zip(predicted, truth, strict=True)])
    assert abs(float(right.mean()) - m.accuracy) < 1e-9, "not the split the model held back"
    for threshold in (0.5, 0.7, 0.9):
        cleared = confidence >= threshold
        share = float(cleared.mean())
        accuracy = float(right[cleared].mean()) if cleared.any() else float("nan")
        print(
            f"   auto-resolve at confidence >= {threshold}: {share:.1%} of messages, "
            f"{accuracy:.4f} of them right"
        )


def quality(args: argparse.Namespace) -> tuple[training.TrainResult, list[str], list[str]]:
    """Part 2: simulated out-of-scope traffic."""
    examples = training.load_examples(args.data, label_column="category")
    train_t, train_l, test_t, test_l, oos = _split(
        examples, args.oos_intents, args.known_oos_intents, args.seed
    )
    print(f"2. out-of-scope intents never trained on: {', '.join(oos)}")
    started = time.perf_counter()
    result = training.train(
        training.Examples(
            texts=tuple(train_t),
            labels=tuple(train_l),
            path=str(args.data),
            sha256=examples.sha256,
            format=examples.format,
            text_column="text",
            label_column="category",
        ),
        features=args.features,
        out_of_scope_label=OOS,
        holdout=0.01,  # our own 20 % is held back above; train on (almost) all of the rest
        seed=args.seed,
    )
    seconds = time.perf_counter() - started
    clf = result.classifier
    m = training.score(clf, test_l, clf.predict_proba(test_t))
    n_oos = sum(1 for label in test_l if label == OOS)
    print(
        f"   trained on {len(train_t)} in {seconds:.1f} s; measured on {len(test_l)} held back "
        f"({n_oos} out of scope), threshold {clf.threshold:.3f}"
    )
    print(f"   out-of-scope precision {m.oos_precision or 0:.4f}  recall {m.oos_recall or 0:.4f}")
    inside = [i for i, label in enumerate(test_l) if label != OOS]
    final = clf.decide(clf.predict_proba([test_t[i] for i in inside]))[0]
    right = sum(1 for i, f in zip(inside, final, strict=True) if f == test_l[i])
    print(
        f"   held-back messages of the intents it serves ({len(inside)}): accuracy "
        f"{right / len(inside):.4f} (one flagged out of scope counts as wrong)"
    )
    print(
        f"   with the out-of-scope messages counted ({len(test_l)}): accuracy {m.accuracy:.4f}  "
        f"macro-F1 {m.macro_f1:.4f}  ECE {m.ece:.4f}"
    )
    return result, test_t, sorted(set(train_l) - {OOS})


async def throughput(
    result: training.TrainResult, texts: list[str], labels: list[str], n: int
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        registry.Registry(folder / "models").register("support_intent", result.classifier)
        names = ", ".join(f'"{x}"' for x in [*labels, OOS])
        (folder / "models.toml").write_text(
            f'[providers.local]\ntype = "local"\ntask = "support_intent"\n'
            f'models_dir = "{folder / "models"}"\n\n'
            '[models.intent]\nprovider = "local"\nmodel = "support_intent"\n'
            'capabilities = ["classify"]\n\n'
            f'[tasks.support_intent]\ncapability = "classify"\nlabels = [{names}]\n'
            'chain = ["intent"]\n'
        )
        with sqlite3.connect(folder / "tickets.db") as conn:
            conn.execute(tickets.TICKETS_DDL)
        app = flowdesk.App(f"sqlite:///{folder / 'flowdesk.db'}", poll_interval=0.05)
        app.gateway = Gateway.from_toml(folder / "models.toml")
        async with sql.SqlConnector("tickets", app, f"sqlite:///{folder / 'tickets.db'}") as db:
            support.Support(
                app,
                knowledge.KnowledgeBase.from_folder(ROOT / "data" / "support"),
                tickets.TicketDesk(db),
                agent_groups=["support"],
                idle=0.01,
            )
            sample = texts[:n]
            async with app, app.worker(concurrency=64):
                started = time.perf_counter()
                assistant = installed.support(app)
                for first in range(0, len(sample), 32):  # 32 API callers at a time
                    await asyncio.gather(
                        *(
                            assistant.receive(f"bench-{i}", f"c{i}", sample[i])
                            for i in range(first, min(first + 32, len(sample)))
                        )
                    )
                while True:
                    done = await _done(app)
                    if done >= len(sample):
                        break
                    await asyncio.sleep(0.05)
                elapsed = time.perf_counter() - started
                outcomes = await _outcomes(app)
        await app.gateway.close()  # type: ignore[union-attr]
    print(
        f"3. through the assistant (SQLite, 1 worker, concurrency 64): {len(sample)} messages "
        f"in {elapsed:.1f} s = {len(sample) / elapsed:.1f} messages/s; outcomes {dict(outcomes)}"
    )


async def _done(app: flowdesk.App) -> int:
    succeeded = await _count(app, "succeeded")
    tasks = await app.store.list_tasks(OPEN_TASKS)
    return succeeded + len(tasks.items)


OPEN_TASKS = people.TaskQuery(status=("open",), limit=100_000)


async def _count(app: flowdesk.App, status: str) -> int:
    total, cursor = 0, None
    while True:
        page = await app.list_runs(status=status, limit=500, cursor=cursor)
        total += len(page.items)
        cursor = page.next_cursor
        if not cursor:
            return total


async def _outcomes(app: flowdesk.App) -> Counter[str]:
    found: Counter[str] = Counter()
    cursor = None
    while True:
        page = await app.list_runs(status="succeeded", limit=500, cursor=cursor)
        for run in page.items:
            for m in (run.output or {}).get("messages", []):
                found[m["outcome"]] += 1
        cursor = page.next_cursor
        if not cursor:
            break
    tasks = await app.store.list_tasks(OPEN_TASKS)
    found["escalated (waiting)"] += len(tasks.items)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "banking77" / "train.csv")
    parser.add_argument("--features", default="auto", choices=["auto", "tfidf", "tfidf+embeddings"])
    parser.add_argument("--oos-intents", type=int, default=5)
    parser.add_argument("--known-oos-intents", type=int, default=5)
    parser.add_argument("--messages", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    unseen(args)
    result, test_texts, labels = quality(args)
    asyncio.run(throughput(result, test_texts, labels, args.messages))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
