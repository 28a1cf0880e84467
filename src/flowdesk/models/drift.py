"""Drift monitoring: are a task's inputs and answers still like the ones it started with?

`DriftMonitor.observe` is a gateway answer observer. For each answer of a watched task it
keeps a sample in the store (``model_drift_samples``), never the text:

* the input's length in characters;
* its distinct words, casefolded, each hashed (BLAKE2b) into one of 2**18 buckets: enough
  to measure the out-of-vocabulary rate against the reference, too few to read the text
  back (many words share a bucket);
* the answer's label and confidence.

Samples are bounded per task: the first ``reference_size`` answers form the reference
window (until a rebase makes the live window the new reference), then a ring buffer keeps
the latest ``live_size``. Samples are gathered for 50 ms and written together.

`compare` (and `DriftMonitor.check`) sets the live window against the reference, as
Evidently and NannyML do, feature by feature:

==================  =============  ======================================================
feature             kind           test
==================  =============  ======================================================
input.length        numeric        PSI over the reference's quantile bins, and the
                                   two-sample Kolmogorov-Smirnov test (scipy ``ks_2samp``)
input.oov_rate      numeric        the same, on each sample's share of words outside the
                                   reference vocabulary (the vocabulary is built from half
                                   of the reference, the other half is the baseline, so an
                                   unchanged stream compares like with like)
output.label        categorical    PSI over the labels, and the chi-square test of the
                                   2 x labels table
output.confidence   numeric        PSI and KS
==================  =============  ======================================================

A feature has drifted when its test is significant (p < ``p_value``, 0.05) AND its PSI
reaches ``psi_moderate`` (0.1); its level is ``major`` from ``psi_major`` (0.25). The
task's alert level is the highest level of its features. Requiring both keeps a large
window's tiny, significant wobble and a small window's noisy PSI from raising alerts.

`DriftMonitor.upkeep` (an ``app.upkeep_hooks`` entry, so every worker runs it) checks
each task at most once per ``check_interval_s`` across all processes, once the live
window holds ``min_samples``; the report and the alert level are stored in
``model_drift_state``, and a change of level is audited (``model.drift_alert``).
``flowdesk models drift TASK`` checks now and prints the report; `alerts` lists the tasks
in alert (for metrics and the UI).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import re
from collections import Counter
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from flowdesk import errors
from flowdesk.models import ledger
from flowdesk.models.gateway import AnswerEvent
from flowdesk.store import base as store_base
from flowdesk.store import sql_models
from flowdesk.store.sql_models import DriftLevel, DriftSample

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    from flowdesk.engine.app import App

log = logging.getLogger("flowdesk.models.drift")

BUCKETS = 1 << 18
LEVELS: tuple[DriftLevel, ...] = ("none", "moderate", "major")
_WORD = re.compile(r"\w+")
_PERSON = b"flowdesk.drift"
_EPS = 1e-4  # share given to an empty bin, so PSI stays finite


class DriftSettings(BaseModel):
    """The ``[drift]`` table of the gateway's TOML (every key optional)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tasks: list[str] | None = None  # the tasks watched (default: every task)
    reference_size: int = Field(default=500, ge=20)
    live_size: int = Field(default=500, ge=20)
    min_samples: int = Field(default=100, ge=10)  # live samples before a check
    check_interval_s: float = Field(default=60.0, gt=0)
    sample_rate: float = Field(default=1.0, gt=0, le=1)  # share of answers sampled
    bins: int = Field(default=10, ge=2, le=50)
    psi_moderate: float = Field(default=0.1, gt=0)
    psi_major: float = Field(default=0.25, gt=0)
    p_value: float = Field(default=0.05, gt=0, lt=1)
    max_words: int = Field(default=256, ge=1)  # distinct words kept per sample

    @model_validator(mode="after")
    def _bands(self) -> DriftSettings:
        if self.psi_major < self.psi_moderate:
            raise ValueError("psi_major must not be below psi_moderate")
        if self.min_samples > self.live_size:
            raise ValueError("min_samples cannot exceed live_size")
        return self


def bucket(word: str) -> int:
    digest = hashlib.blake2b(word.encode(), digest_size=8, person=_PERSON).digest()
    return int.from_bytes(digest, "big") % BUCKETS


def features(
    text: str, label: str | None, confidence: float | None, max_words: int = 256
) -> DriftSample:
    """What a drift sample keeps of one answer (see the module docstring)."""
    words: dict[int, None] = {}
    for match in _WORD.finditer(text.casefold()):
        words.setdefault(bucket(match.group()), None)
        if len(words) >= max_words:
            break
    return DriftSample(length=len(text), tokens=tuple(words), label=label, confidence=confidence)


# -- the statistics ---------------------------------------------------------------------


def level_of(psi: float, settings: DriftSettings) -> DriftLevel:
    if psi >= settings.psi_major:
        return "major"
    if psi >= settings.psi_moderate:
        return "moderate"
    return "none"


def _edges(reference: npt.NDArray[np.float64], bins: int) -> npt.NDArray[np.float64]:
    """Bin edges from the reference's quantiles, plus its minimum and a hair above its
    maximum, so values below or above everything the reference saw get bins of their own
    (a constant reference still separates a shifted live window)."""
    import numpy as np

    inner = np.quantile(reference, np.linspace(0, 1, bins + 1)[1:-1])
    top = np.nextafter(reference.max(), np.inf)
    return np.unique(np.concatenate([[reference.min()], inner, [top]]))


def _shares(counts: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    import numpy as np

    total = counts.sum()
    shares = counts / total if total else counts
    return np.clip(shares, _EPS, None)


def psi_numeric(reference: Sequence[float], live: Sequence[float], bins: int = 10) -> float:
    """The population stability index of ``live`` against ``reference``."""
    import numpy as np

    ref = np.asarray(reference, dtype=float)
    cur = np.asarray(live, dtype=float)
    edges = _edges(ref, bins)
    n = len(edges) + 1
    bins_ref = np.bincount(np.searchsorted(edges, ref, side="right"), minlength=n)
    bins_cur = np.bincount(np.searchsorted(edges, cur, side="right"), minlength=n)
    expected = _shares(bins_ref.astype(np.float64))
    actual = _shares(bins_cur.astype(np.float64))
    return float(np.sum((actual - expected) * np.log(actual / expected)))


def psi_categorical(reference: Sequence[str], live: Sequence[str]) -> float:
    import numpy as np

    cats = sorted(set(reference) | set(live))
    ref, cur = Counter(reference), Counter(live)
    expected = _shares(np.array([ref[c] for c in cats], dtype=float))
    actual = _shares(np.array([cur[c] for c in cats], dtype=float))
    return float(np.sum((actual - expected) * np.log(actual / expected)))


def _scipy_stats() -> Any:
    """``scipy.stats``, imported on first use (it takes a while and ships no types)."""
    from scipy import stats  # type: ignore[import-untyped]

    return stats


def _numeric(
    name: str, reference: Sequence[float], live: Sequence[float], settings: DriftSettings
) -> dict[str, Any]:
    stats = _scipy_stats()

    psi = psi_numeric(reference, live, settings.bins)
    test = stats.ks_2samp(reference, live)
    p = float(test.pvalue)
    drifted = p < settings.p_value and psi >= settings.psi_moderate
    return {
        "feature": name,
        "kind": "numeric",
        "test": "ks",
        "psi": round(psi, 4),
        "statistic": round(float(test.statistic), 4),
        "p_value": p,
        "drifted": drifted,
        "level": level_of(psi, settings) if drifted else "none",
        "reference": {"n": len(reference), "mean": round(sum(reference) / len(reference), 4)},
        "live": {"n": len(live), "mean": round(sum(live) / len(live), 4)},
    }


def _categorical(
    name: str, reference: Sequence[str], live: Sequence[str], settings: DriftSettings
) -> dict[str, Any]:
    import numpy as np

    stats = _scipy_stats()

    psi = psi_categorical(reference, live)
    cats = sorted(set(reference) | set(live))
    ref, cur = Counter(reference), Counter(live)
    table = np.array([[ref[c] for c in cats], [cur[c] for c in cats]], dtype=float)
    p = 1.0
    statistic = 0.0
    if len(cats) > 1:
        test = stats.chi2_contingency(table)
        p, statistic = float(test.pvalue), float(test.statistic)
    drifted = p < settings.p_value and psi >= settings.psi_moderate
    return {
        "feature": name,
        "kind": "categorical",
        "test": "chi2",
        "psi": round(psi, 4),
        "statistic": round(statistic, 4),
        "p_value": p,
        "drifted": drifted,
        "level": level_of(psi, settings) if drifted else "none",
        "reference": {c: round(ref[c] / len(reference), 4) for c in cats},
        "live": {c: round(cur[c] / len(live), 4) for c in cats},
    }


def _oov(sample: DriftSample, vocabulary: set[int]) -> float:
    if not sample.tokens:
        return 0.0
    return sum(1 for t in sample.tokens if t not in vocabulary) / len(sample.tokens)


def compare(
    reference: Sequence[tuple[int, DriftSample]],
    live: Sequence[DriftSample],
    settings: DriftSettings,
) -> dict[str, Any]:
    """The drift report of a live window against a reference (``(slot, sample)`` pairs):
    every feature's PSI, test statistic and p-value, which drifted, and the level."""
    ref = [s for _, s in reference]
    report: dict[str, Any] = {
        "reference": len(ref),
        "live": len(live),
        "level": "none",
        "drifted": [],
        "features": {},
    }
    if len(ref) < 2 * 10 or len(live) < 10:
        report["status"] = "insufficient"
        return report
    report["status"] = "checked"
    found: list[dict[str, Any]] = [
        _numeric(
            "input.length",
            [float(s.length) for s in ref],
            [float(s.length) for s in live],
            settings,
        )
    ]
    # The vocabulary comes from the even slots; the odd slots are the baseline's rates.
    vocabulary: set[int] = set()
    for slot, sample in reference:
        if slot % 2 == 0:
            vocabulary.update(sample.tokens)
    baseline = [_oov(s, vocabulary) for slot, s in reference if slot % 2 == 1]
    oov = _numeric("input.oov_rate", baseline, [_oov(s, vocabulary) for s in live], settings)
    oov["vocabulary"] = len(vocabulary)
    found.append(oov)
    labels_ref = [s.label for s in ref if s.label is not None]
    labels_live = [s.label for s in live if s.label is not None]
    if len(labels_ref) >= 10 and len(labels_live) >= 10:
        found.append(_categorical("output.label", labels_ref, labels_live, settings))
    conf_ref = [s.confidence for s in ref if s.confidence is not None]
    conf_live = [s.confidence for s in live if s.confidence is not None]
    if len(conf_ref) >= 10 and len(conf_live) >= 10:
        found.append(_numeric("output.confidence", conf_ref, conf_live, settings))
    level = "none"
    for feature in found:
        report["features"][feature["feature"]] = feature
        if feature["drifted"]:
            report["drifted"].append(feature["feature"])
            if LEVELS.index(feature["level"]) > LEVELS.index(level):
                level = feature["level"]
    report["level"] = level
    return report


# -- the monitor ------------------------------------------------------------------------


class DriftMonitor:
    """Samples answers into the store and checks drift (see the module docstring)."""

    def __init__(
        self,
        app: App,
        settings: DriftSettings | None = None,
        *,
        sampler: Callable[[], float] = random.random,
    ) -> None:
        self.app = app
        self.settings = settings or DriftSettings()
        self.samples: ledger.Batcher[tuple[str, DriftSample]] = ledger.Batcher(
            app, self._apply_samples, "drift samples"
        )
        self._sampler = sampler

    async def _apply_samples(
        self, tx: sql_models.ModelsTx, items: list[tuple[str, DriftSample]]
    ) -> None:
        settings = self.settings
        # By task (stable: each task's samples keep their order): rows in sorted order.
        for task, sample in sorted(items, key=lambda item: item[0]):
            await tx.add_drift_sample(task, sample, settings.reference_size, settings.live_size)

    def watches(self, task: str) -> bool:
        tasks = self.settings.tasks
        return tasks is None or task in tasks

    async def observe(self, event: AnswerEvent) -> None:
        """The gateway's answer observer: keep a sample of this answer."""
        settings = self.settings
        if not self.watches(event.task):
            return
        if settings.sample_rate < 1 and self._sampler() >= settings.sample_rate:
            return
        answer = event.answer
        sample = features(event.text, answer.label, answer.confidence, settings.max_words)
        self.samples.add((event.task, sample))

    async def check(self, task: str, *, record: bool = True) -> dict[str, Any]:
        """Compare the task's live window with its reference now; with ``record``, store
        the report and the alert level (a change is audited)."""
        await self.app.open()
        await self.samples.flush()
        store = sql_models.models_store(self.app.store)
        state = await store.drift_state(task)
        if state is None:
            raise errors.NotFound(
                f"No drift samples for model task {task!r} yet: the gateway records them "
                "once answers of the task go through a DriftMonitor."
            )
        samples = await store.drift_samples(task)
        reference = [(slot, s) for win, slot, s in samples if win == "ref"]
        live = [s for win, _, s in samples if win == "live"]
        # In a thread: the first check imports scipy, and the loop keeps serving heartbeats.
        report = await asyncio.to_thread(compare, reference, live, self.settings)
        report["task"] = task
        report["at"] = store_base.now_ms()
        if len(live) < self.settings.min_samples and report["status"] == "checked":
            report["status"] = "insufficient"
            report["level"], report["drifted"] = "none", []
        level: DriftLevel = report["level"]
        if record:
            target = task

            async def op(tx: store_base.Tx) -> bool:
                return await sql_models.models_tx(tx).set_drift_report(target, level, report)

            if await ledger.transact_alone(self.app, op, actor="system:drift"):
                log.warning(
                    "model task %s drift level is now %s: %s", task, level, report["drifted"]
                )
        return report

    async def upkeep(self) -> None:
        """Check each watched task whose live window is full enough, at most once per
        ``check_interval_s`` across every process (an ``app.upkeep_hooks`` entry)."""
        settings = self.settings
        store = sql_models.models_store(self.app.store)
        interval = int(settings.check_interval_s * 1000)
        for state in await store.drift_states():
            live = min(state.live_count, settings.live_size)
            if not self.watches(state.task) or live < settings.min_samples:
                continue
            if state.checked_at > store_base.now_ms() - interval:
                continue

            async def claim(tx: store_base.Tx, task: str = state.task) -> bool:
                return await sql_models.models_tx(tx).claim_drift_check(task, interval)

            if await ledger.transact_alone(self.app, claim, actor="system:drift"):
                try:
                    await self.check(state.task)
                except Exception:
                    log.exception("drift check of model task %s failed", state.task)

    async def reset(self, task: str, *, rebase: bool, actor: str | None = None) -> int:
        """Start over (``rebase``: the live window becomes the reference). Audited."""

        async def op(tx: store_base.Tx) -> int:
            return await sql_models.models_tx(tx).reset_drift(task, rebase=rebase)

        await self.samples.flush()
        result: int = await ledger.transact_alone(self.app, op, actor=actor)
        return result


async def alerts(app: App) -> list[sql_models.DriftState]:
    """The tasks whose drift level is not ``none``, with their last report."""
    await app.open()
    states = await sql_models.models_store(app.store).drift_states()
    return [s for s in states if s.level != "none"]


def level_number(level: str) -> int:
    """0, 1, 2 for none, moderate, major (a gauge's value)."""
    return LEVELS.index(level) if level in LEVELS else 0
