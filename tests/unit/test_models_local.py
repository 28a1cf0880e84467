"""Local classifiers: reading labelled examples, training with TF-IDF and sentence
embeddings, metrics, out-of-scope detection, the versioned registry, micro-batching and
the provider. Real scikit-learn, onnxruntime and the packaged MiniLM model run here, on
small slices of Banking77 (``data/banking77``); nothing is mocked."""

from __future__ import annotations

import asyncio
import csv
import json
import random
import subprocess
import sys
import threading
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from flowdesk import errors
from flowdesk.models import base, batching, local, registry, training

ROOT = Path(__file__).resolve().parents[2]
BANKING = ROOT / "data" / "banking77" / "train.csv"


def _banking_rows() -> list[tuple[str, str]]:
    with BANKING.open(newline="", encoding="utf-8") as handle:
        return [(row["text"], row["category"]) for row in csv.DictReader(handle)]


def _slice(labels: Sequence[str], per_label: int) -> list[tuple[str, str]]:
    wanted = set(labels)
    counts: dict[str, int] = {}
    out = []
    for text, label in _banking_rows():
        if label in wanted and counts.get(label, 0) < per_label:
            counts[label] = counts.get(label, 0) + 1
            out.append((text, label))
    return out


def _examples(pairs: Sequence[tuple[str, str]]) -> training.Examples:
    return training.Examples(
        texts=tuple(t for t, _ in pairs),
        labels=tuple(label for _, label in pairs),
        path="memory",
        sha256="",
        format="csv",
        text_column="text",
        label_column="label",
    )


def _write_csv(path: Path, pairs: Sequence[tuple[str, str]], header: Sequence[str]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(pairs)
    return path


EIGHT = [
    "activate_my_card",
    "age_limit",
    "apple_pay_or_google_pay",
    "atm_support",
    "card_arrival",
    "exchange_rate",
    "lost_or_stolen_card",
    "pin_blocked",
]


@pytest.fixture(scope="module")
def small() -> list[tuple[str, str]]:
    return _slice(EIGHT, 30)


@pytest.fixture(scope="module")
def trained(small: list[tuple[str, str]]) -> training.TrainResult:
    return training.train(_examples(small))


# -- reading labelled examples -----------------------------------------------------------------
def test_csv_and_jsonl_load_with_chosen_columns(tmp_path: Path) -> None:
    csv_file = tmp_path / "a.csv"
    csv_file.write_text(
        '\ufeffid,message,intent\n1,"hello, there",greet\n\n2,  bye now ,leave\n', "utf-8"
    )
    examples = training.load_examples(csv_file, text_column="message", label_column="intent")
    assert examples.texts == ("hello, there", "bye now")
    assert examples.labels == ("greet", "leave")
    assert examples.format == "csv" and len(examples.sha256) == 64

    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text('{"q": "hi", "y": 1}\n\n{"q": "ciao", "y": 2, "extra": true}\n', "utf-8")
    examples = training.load_examples(jsonl, text_column="q", label_column="y")
    assert examples.texts == ("hi", "ciao") and examples.labels == ("1", "2")
    assert examples.format == "jsonl"
    assert examples.label_counts == {"1": 1, "2": 1}


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("missing.csv", None, "no such file"),
        (
            "cols.csv",
            "message,intent\nhi,a\nyo,b\n",
            "unknown columns 'text', 'label'; the columns are: 'message', 'intent'",
        ),
        ("one.csv", "text,label\nhi,a\nyo,a\n", "a classifier needs at least 2 labels"),
        ("blank.csv", "text,label\nhi,a\n   ,b\n", "line 3: the text is empty"),
        ("nolabel.csv", "text,label\nhi,a\nyo,\n", "line 3: the label is empty"),
        ("fields.csv", "text,label\nhi,a\nyo,b,c\n", "line 3: malformed CSV: expected 2 fields"),
        ("quote.csv", 'text,label\nhi,a\n"yo,b\n', "malformed CSV"),
        ("bad.jsonl", '{"text": "hi", "label": "a"}\n{"text": "yo", \n', "line 2: malformed JSON"),
        ("list.jsonl", '{"text": "hi", "label": "a"}\n[1, 2]\n', "line 2: expected a JSON object"),
        ("cols.jsonl", '{"msg": "hi", "label": "a"}\n', "line 1: unknown column 'text'"),
        ("later.jsonl", '{"text": "hi", "label": "a"}\n{"text": "yo"}\n', "line 2: missing"),
        ("num.jsonl", '{"text": 5, "label": "a"}\n', "line 1: the text ('text') is not a string"),
        ("empty.csv", "", "the file is empty"),
    ],
)
def test_bad_files_are_refused_with_the_line(
    tmp_path: Path, name: str, content: str | None, expected: str
) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_text(content, "utf-8")
    with pytest.raises(errors.TrainingDataError) as caught:
        training.load_examples(path)
    assert expected in str(caught.value)
    assert str(path) in str(caught.value)


def test_unknown_columns_name_the_available_ones(tmp_path: Path) -> None:
    path = tmp_path / "x.csv"
    path.write_text("utterance,category\nhi,a\n", "utf-8")
    with pytest.raises(errors.TrainingDataError) as caught:
        training.load_examples(path, text_column="utterance")
    assert "unknown column 'label'" in str(caught.value)
    assert "'utterance', 'category'" in str(caught.value)
    assert caught.value.line == 1


def test_non_utf8_is_refused_with_its_line(tmp_path: Path) -> None:
    path = tmp_path / "latin.csv"
    path.write_bytes(b"text,label\nhi,a\ncaf\xe9,b\n")
    with pytest.raises(errors.TrainingDataError, match="line 3: not UTF-8"):
        training.load_examples(path)


# -- embeddings --------------------------------------------------------------------------------
def test_sentence_embeddings_come_from_the_installed_packages() -> None:
    assert training.embeddings_available(), "the embeddings extra must be installed (make install)"
    embedder = training.get_embedder()
    assert embedder is training.get_embedder()  # one per process
    vectors = embedder.embed(
        ["I lost my card", "My card has been stolen", "What is the exchange rate for euros?"]
    )
    assert vectors.shape == (3, 384)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    same, other = float(vectors[0] @ vectors[1]), float(vectors[0] @ vectors[2])
    assert same > other + 0.2
    again = embedder.embed(["My card has been stolen"])[0]
    assert np.allclose(again, vectors[1], atol=1e-5)  # padding in a batch changes nothing
    layers = embedder.layers(["hello"])
    assert [block.shape for block in layers] == [(1, 384)] * len(training.EMBEDDING_OUTPUTS)


def test_default_features_use_embeddings_and_say_so(trained: training.TrainResult) -> None:
    assert trained.classifier.features == "tfidf+embeddings"
    assert trained.meta["features"] == "tfidf+embeddings"
    assert trained.meta["embedding"]["model"] == training.EMBEDDING_MODEL_ID
    assert any(
        name.startswith(training.EMBEDDING_MODEL_ID) for name in trained.meta["feature_sets"]
    )
    assert trained.meta["n_examples"] == 240
    assert trained.meta["n_train"] + trained.meta["n_heldout"] == 240
    assert trained.meta["labels"] == EIGHT
    assert trained.metrics.n == trained.meta["n_heldout"]
    assert trained.metrics.accuracy >= 0.85


def test_embeddings_lift_accuracy_over_tfidf_alone() -> None:
    """On 20 Banking77 intents x 40 examples, TF-IDF alone reaches 0.84 held-out accuracy
    and TF-IDF joined with the sentence embeddings 0.925 (on this machine)."""
    labels = random.Random(0).sample(sorted({label for _, label in _banking_rows()}), 20)
    examples = _examples(_slice(labels, 40))
    tfidf = training.train(examples, features="tfidf")
    both = training.train(examples, features="tfidf+embeddings")
    assert tfidf.meta["features"] == "tfidf" and tfidf.meta["embedding"] is None
    assert both.metrics.accuracy >= 0.85
    assert both.metrics.accuracy >= tfidf.metrics.accuracy + 0.04
    assert both.metrics.macro_f1 >= tfidf.metrics.macro_f1 + 0.04


def test_predictions_are_calibrated_probabilities(trained: training.TrainResult) -> None:
    classifier = trained.classifier
    probs = classifier.predict_proba(["my card has not arrived yet", "is there an age limit?"])
    assert probs.shape == (2, 8)
    assert np.allclose(probs.sum(axis=1), 1.0)
    answers = classifier.predict(["my card has not arrived yet"], top_k=3)
    assert answers[0].label == "card_arrival"
    assert len(answers[0].scores) == 3
    assert answers[0].confidence == max(answers[0].scores.values())
    assert not answers[0].out_of_scope
    assert trained.metrics.ece < 0.2
    assert "temperature" in trained.meta["classifier"]


def test_tiny_data_still_trains(tmp_path: Path) -> None:
    pairs = [("open an account", "open"), ("close my account", "close")] * 3
    result = training.train(_examples(pairs), features="tfidf")
    assert set(result.classifier.classes) == {"open", "close"}
    with pytest.raises(errors.TrainingDataError, match="too few examples"):
        training.train(_examples([("a b", "x"), ("c d", "y")]), features="tfidf")


# -- metrics and thresholds --------------------------------------------------------------------
def test_expected_calibration_error() -> None:
    assert training.expected_calibration_error([1.0, 1.0], [True, True]) == 0.0
    assert training.expected_calibration_error([1.0, 1.0], [True, False]) == pytest.approx(0.5)
    # two bins: 0.3 confident and right a third of the time; 0.9 confident and always right
    conf = [0.3, 0.3, 0.3, 0.9]
    hit = [True, False, False, True]
    expected = 0.75 * abs(1 / 3 - 0.3) + 0.25 * abs(1.0 - 0.9)
    assert training.expected_calibration_error(conf, hit) == pytest.approx(expected)
    assert training.expected_calibration_error([], []) == 0.0


def test_threshold_maximises_f1_of_out_of_scope() -> None:
    conf = [0.95, 0.9, 0.85, 0.8, 0.4, 0.35, 0.3, 0.6]
    oos = [False, False, False, False, True, True, True, False]
    threshold = training.tune_threshold(conf, oos)
    assert 0.4 < threshold <= 0.6
    flagged = [c < threshold for c in conf]
    assert flagged == oos
    assert training.tune_threshold(conf, [False] * len(conf)) == 0.0
    # the trained out-of-scope class already catches them: no threshold needed
    assert training.tune_threshold(conf, oos, already=oos) == 0.0


def test_out_of_scope_both_ways(tmp_path: Path, small: list[tuple[str, str]]) -> None:
    # (a) two intents become the out-of-scope class
    relabelled = [
        (text, "oos" if label in ("age_limit", "atm_support") else label) for text, label in small
    ]
    result = training.train(_examples(relabelled), out_of_scope_label="oos")
    oos_meta = result.meta["out_of_scope"]
    assert oos_meta["label"] == "oos" and oos_meta["trained_class"] is True
    assert oos_meta["threshold"] is not None and 0.0 <= oos_meta["threshold"] < 1.0
    assert "out-of-scope vs in-scope" in oos_meta["threshold_objective"]
    assert result.metrics.oos_precision is not None and result.metrics.oos_recall is not None
    assert result.metrics.oos_recall >= 0.5
    answer = result.classifier.predict(["how old do I need to be to open an account?"])[0]
    assert answer.label == "oos" and answer.out_of_scope

    # (b) a threshold alone: answers below it get the out-of-scope label
    plain = training.train(_examples(small), out_of_scope_label="none_of_these")
    assert plain.meta["out_of_scope"]["trained_class"] is False
    assert "wrong answers" in plain.meta["out_of_scope"]["threshold_objective"]
    strict = replace(plain.classifier, threshold=1.01)
    answer = strict.predict(["my card has not arrived yet"])[0]
    assert answer.out_of_scope and answer.label == "none_of_these"
    assert answer.predicted == "card_arrival"
    lax = replace(plain.classifier, threshold=0.0)
    assert not lax.predict(["my card has not arrived yet"])[0].out_of_scope
    metrics = training.evaluate(strict, _examples(small[:20]))
    assert metrics.accuracy == 0.0 and metrics.oos_precision == 0.0 and metrics.oos_recall is None


# -- registry ----------------------------------------------------------------------------------
def test_registry_versions_state_promote_rollback(
    tmp_path: Path, trained: training.TrainResult
) -> None:
    reg = registry.Registry(tmp_path / "models")
    assert reg.tasks() == []
    v1 = reg.register("intent", trained.classifier, trained.meta)
    v2 = reg.register("intent", trained.classifier, {**trained.meta, "note": "second"})
    assert (v1, v2) == ("v1", "v2")
    assert reg.tasks() == ["intent"]
    assert [v.version for v in reg.versions("intent")] == ["v1", "v2"]
    info = reg.version("intent", "v2")
    assert info.meta["note"] == "second" and info.metrics["accuracy"] == trained.metrics.accuracy
    for key in ("created_at", "data", "n_examples", "labels", "features", "metrics"):
        assert key in info.meta
    assert "out_of_scope" in info.meta and "threshold" in info.meta["out_of_scope"]

    state = reg.state("intent")
    assert state.current == "v1" and state.canary is None and state.shadow is None
    on_disk = json.loads((tmp_path / "models" / "intent" / "state.json").read_text())
    assert on_disk["current"] == "v1"
    assert (tmp_path / "models" / "intent" / "v2" / "model.joblib").exists()

    assert reg.promote("intent", "v2").current == "v2"
    assert reg.get("intent") is reg.get("intent", "v2")  # cached per process
    assert reg.get("intent", "v1") is not reg.get("intent", "v2")
    assert reg.rollback("intent").current == "v1"
    with pytest.raises(errors.ModelRegistryError, match="Nothing to roll back"):
        reg.rollback("intent")
    history = [event["action"] for event in reg.state("intent").history]
    assert history == ["register", "register", "promote", "rollback"]

    canary = reg.set_canary("intent", "v2", 10)
    assert canary.canary == registry.Canary(version="v2", percent=10.0)
    assert reg.set_shadow("intent", "v2").shadow == "v2"
    with pytest.raises(errors.ModelRegistryError, match="percent"):
        reg.set_canary("intent", "v2", 150)
    with pytest.raises(errors.ModelRegistryError, match="current version"):
        reg.set_canary("intent", "v1", 5)
    promoted = reg.promote("intent", "v2")  # the canary and shadow of v2 end
    assert promoted.canary is None and promoted.shadow is None
    assert reg.set_canary("intent", None).canary is None
    leftovers = [p.name for p in (tmp_path / "models" / "intent").iterdir()]
    assert sorted(leftovers) == [".lock", "state.json", "v1", "v2"]


def test_registry_unknown_names(tmp_path: Path, trained: training.TrainResult) -> None:
    reg = registry.Registry(tmp_path)
    reg.register("intent", trained.classifier, trained.meta)
    with pytest.raises(errors.NotFound) as caught:
        reg.get("nope")
    assert isinstance(caught.value, errors.ModelNotFound)
    assert "No local model task 'nope'" in str(caught.value)
    assert "Known tasks: intent" in str(caught.value)
    with pytest.raises(errors.ModelNotFound, match="has no version 'v7'.*v1"):
        reg.promote("intent", "v7")
    for call in (reg.state, reg.versions, reg.rollback):
        with pytest.raises(errors.ModelNotFound):
            call("other")
    with pytest.raises(errors.ModelRegistryError, match="Bad model task name"):
        reg.register("../escape", trained.classifier, trained.meta)


def test_registry_default_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, trained: training.TrainResult
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FLOWDESK_MODELS_DIR", raising=False)
    assert registry.Registry().path == Path("flowdesk-models")
    monkeypatch.setenv("FLOWDESK_MODELS_DIR", str(tmp_path / "elsewhere"))
    reg = registry.Registry()
    reg.register("t", trained.classifier, trained.meta)
    assert (tmp_path / "elsewhere" / "t" / "v1" / "meta.json").exists()


REGISTER_SCRIPT = """
import sys
from flowdesk.models import registry, training
pairs = [("open an account", "open"), ("close my account", "close")] * 3
ex = training.Examples(texts=tuple(t for t, _ in pairs), labels=tuple(l for _, l in pairs),
    path="x", sha256="", format="csv", text_column="text", label_column="label")
result = training.train(ex, features="tfidf")
sys.stdin.readline()  # start together
print(registry.Registry(sys.argv[1]).register("race", result.classifier, result.meta))
"""


def test_concurrent_processes_get_distinct_versions(tmp_path: Path) -> None:
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", REGISTER_SCRIPT, str(tmp_path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    try:
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        outputs = [proc.communicate(timeout=60) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert all(proc.returncode == 0 for proc in procs), outputs
    versions = sorted(out.strip() for out, _ in outputs)
    assert versions == ["v1", "v2", "v3", "v4"]
    reg = registry.Registry(tmp_path)
    assert reg.state("race").current in versions
    assert len(reg.state("race").history) == 4


# -- micro-batching ----------------------------------------------------------------------------
async def test_concurrent_requests_share_batches() -> None:
    seen: list[int] = []
    threads: set[int] = set()

    def double(items: list[int]) -> list[int]:
        seen.append(len(items))
        threads.add(threading.get_ident())
        return [2 * i for i in items]

    batcher: batching.MicroBatcher[int, int] = batching.MicroBatcher(
        double, max_batch=16, max_wait_ms=20
    )
    try:
        results = await asyncio.gather(*(batcher.submit(i) for i in range(64)))
        assert results == [2 * i for i in range(64)]
        assert max(seen) <= 16 and sum(seen) == 64
        assert len(seen) <= 8  # 64 requests, batches of up to 16
        assert threading.get_ident() not in threads  # ran in a worker thread
        stats = batcher.stats
        assert stats.items == 64 and stats.largest == max(seen) and stats.mean_size > 1
        assert await batcher.submit(5) == 10  # a lone request is answered after max_wait
    finally:
        await batcher.close()


async def test_batch_failure_reaches_every_caller_and_cancellation_is_local() -> None:
    def fail(items: list[str]) -> list[str]:
        if "boom" in items:
            raise ValueError("bad batch")
        return [s.upper() for s in items]

    batcher: batching.MicroBatcher[str, str] = batching.MicroBatcher(fail, max_wait_ms=20)
    try:
        outcomes = await asyncio.gather(
            batcher.submit("a"), batcher.submit("boom"), return_exceptions=True
        )
        assert all(isinstance(o, ValueError) for o in outcomes)
        assert await batcher.submit("ok") == "OK"  # the batcher survives a failed batch

        doomed = asyncio.ensure_future(batcher.submit("x"))
        survivor = asyncio.ensure_future(batcher.submit("y"))
        await asyncio.sleep(0)
        doomed.cancel()
        assert await survivor == "Y"
        assert doomed.cancelled()
    finally:
        await batcher.close()
    with pytest.raises(errors.ModelError, match="closed"):
        await batcher.submit("late")


async def test_batch_function_must_answer_every_item() -> None:
    batcher: batching.MicroBatcher[int, int] = batching.MicroBatcher(lambda items: items[:1])
    try:
        with pytest.raises(errors.ModelError, match="returned 1 results for 2"):
            await asyncio.gather(batcher.submit(1), batcher.submit(2))
    finally:
        await batcher.close()


def test_a_batcher_moves_to_a_new_event_loop() -> None:
    batcher: batching.MicroBatcher[int, int] = batching.MicroBatcher(lambda xs: [x + 1 for x in xs])

    async def once(value: int) -> int:
        return await batcher.submit(value)

    assert asyncio.run(once(1)) == 2
    assert asyncio.run(once(2)) == 3  # the first loop is closed; the batcher starts afresh
    asyncio.run(batcher.close())


# -- the provider ------------------------------------------------------------------------------
def _request(text: str, **kwargs: object) -> base.ModelRequest:
    fields: dict[str, object] = {
        "task": "intent",
        "capability": "classify",
        "text": text,
        "model": "local:intent",
    }
    fields.update(kwargs)
    return base.ModelRequest(**fields)  # type: ignore[arg-type]


async def test_provider_answers_concurrent_requests_in_batches(
    tmp_path: Path, trained: training.TrainResult
) -> None:
    reg = registry.Registry(tmp_path)
    reg.register("intent", trained.classifier, trained.meta)
    provider = local.LocalClassifierProvider(reg, max_batch=32, max_wait_ms=20, top_k=3)
    try:
        texts = ["my card has not arrived yet", "is there an age limit?"] * 32
        answers = await asyncio.gather(*(provider.infer(_request(t)) for t in texts))
        assert answers[0].label == "card_arrival" and answers[1].label == "age_limit"
        first = answers[0]
        assert first.model == "local:intent" and first.version == "v1"
        assert first.confidence is not None and 0.0 < first.confidence <= 1.0
        assert first.scores is not None and len(first.scores) == 3
        assert first.confidence == max(first.scores.values())
        assert first.raw["out_of_scope"] is False
        stats = provider.stats()["local:intent:v1"]
        assert stats.items == 64 and stats.batches < 64 and stats.largest > 1

        # the task comes from request.model when it names one; an explicit version wins
        v2 = reg.register("other", trained.classifier, trained.meta)
        answer = await provider.infer(_request("lost card", task="support", model="local:other"))
        assert answer.model == "local:other" and answer.version == v2
        answer = await provider.infer(_request("lost card", model="anything", version="v1"))
        assert answer.model == "local:intent" and answer.version == "v1"

        with pytest.raises(errors.ProviderUnavailable, match="No local model task 'missing'"):
            await provider.infer(_request("hi", model="local:missing"))
        with pytest.raises(errors.ModelError, match="only classify"):
            await provider.infer(_request("hi", capability="generate"))
    finally:
        await provider.close()


async def test_provider_without_batching_gives_the_same_answers(
    tmp_path: Path, trained: training.TrainResult
) -> None:
    reg = registry.Registry(tmp_path)
    reg.register("intent", trained.classifier, trained.meta)
    batched = local.LocalClassifierProvider(reg)
    single = local.LocalClassifierProvider(reg, batching_enabled=False)
    try:
        texts = [text for text, _ in _slice(EIGHT, 2)]
        one = await asyncio.gather(*(batched.infer(_request(t)) for t in texts))
        two = await asyncio.gather(*(single.infer(_request(t)) for t in texts))
        assert [a.label for a in one] == [b.label for b in two]
        for a, b in zip(one, two, strict=True):
            assert a.confidence == pytest.approx(b.confidence, abs=1e-6)
        assert single.stats() == {}
    finally:
        await batched.close()
        await single.close()
