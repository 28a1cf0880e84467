"""Drift monitoring (flowdesk.models.drift), on both stores: answers sampled into the store
by the gateway's observer (lengths, hashed words, label, confidence; never the text), a
bounded reference window and live ring buffer, PSI with KS / chi-square per feature, the
alert stored and audited when a threshold is crossed, checked by the workers' upkeep, and
``flowdesk models drift TASK`` (a real subprocess).

The streams are generated from a fixed seed: support tickets about billing and technical
trouble (the reference, and a fresh sample of the same stream), and a shifted stream of
longer shipping complaints in other words, which the classifier is less sure about.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

import pytest

from flowdesk.models import base, drift, rollout
from flowdesk.store import sql_models

LABELS = ["billing", "technical", "other"]
BILLING = ["invoice", "charge", "refund", "payment", "billing", "card", "price", "plan"]
TECHNICAL = ["error", "crash", "login", "password", "slow", "bug", "app", "technical"]
COMMON = (
    "hello please help my the a i cannot with for since yesterday account thanks again "
    "when this is was and it on to be our team need fix update question issue"
).split()
SHIPPING = (
    "parcel courier delivery tracking warehouse shipment pallet customs depot dispatch "
    "carrier freight label postage address missing damaged crate truck route arrival "
    "consignment manifest loading container port harbour"
).split()
SECRET_WORD = "zanzibarquux"  # appears in one input: it must not be in the store


def ticket(rng: random.Random) -> str:
    words = rng.choices(COMMON, k=rng.randint(6, 14))
    pool = BILLING if rng.random() < 0.6 else TECHNICAL
    words += rng.choices(pool, k=rng.randint(1, 3))
    rng.shuffle(words)
    return " ".join(words)


def shipping(rng: random.Random) -> str:
    words = rng.choices(SHIPPING, k=rng.randint(18, 30)) + rng.choices(COMMON, k=4)
    if rng.random() < 0.15:
        words.append(rng.choice(BILLING))
    rng.shuffle(words)
    return " ".join(words)


class Keywords(base.Provider):
    """Labels by keyword, sure when it finds one and unsure when it does not."""

    def __init__(self, name: str) -> None:
        self.name = name

    async def infer(self, request: base.ModelRequest) -> base.ProviderResult:
        words = set(request.text.split())
        if words & set(BILLING):
            label, confidence = "billing", 0.93
        elif words & set(TECHNICAL):
            label, confidence = "technical", 0.91
        else:
            label, confidence = "other", 0.55
        jitter = (zlib.crc32(request.text.encode()) % 100) / 2000  # a little spread
        return base.ProviderResult(
            model=request.model, version="1", label=label, confidence=confidence - jitter
        )


SETTINGS: dict[str, Any] = {
    "reference_size": 300,
    "live_size": 300,
    "min_samples": 150,
    "check_interval_s": 3600,
}


def config(**drift_settings: Any) -> dict[str, Any]:
    return {
        "providers": {"kw": {"type": "python"}},
        "models": {"kw": {"provider": "kw", "model": "keywords"}},
        "tasks": {
            "ticket": {
                "capability": "classify",
                "labels": LABELS,
                "chain": ["kw"],
                "cache_ttl_s": 0,
            },
            "untracked": {"capability": "classify", "labels": LABELS, "chain": ["kw"]},
        },
        "drift": {**SETTINGS, "tasks": ["ticket"], **drift_settings},
    }


async def feed(stack: rollout.Stack, texts: list[str], batch: int = 50) -> None:
    """Ask for each text, ``batch`` at a time (their samples share group commits)."""
    for i in range(0, len(texts), batch):
        await asyncio.gather(*(stack.gateway.ask("ticket", t) for t in texts[i : i + batch]))
    await stack.flush()


def streams() -> tuple[list[str], list[str], list[str]]:
    rng = random.Random(20240607)
    reference = [ticket(rng) for _ in range(300)]
    reference[17] += " " + SECRET_WORD
    same = [ticket(rng) for _ in range(300)]
    shifted = [shipping(rng) for _ in range(300)]
    return reference, same, shifted


# -- 1. the statistics ----------------------------------------------------------------------


def test_psi_is_zero_for_equal_windows_and_grows_with_the_shift():
    rng = random.Random(1)
    ref = [rng.gauss(100, 10) for _ in range(2000)]
    same = [rng.gauss(100, 10) for _ in range(2000)]
    moved = [rng.gauss(104, 10) for _ in range(2000)]  # 0.4 sd: PSI near 0.16
    far = [rng.gauss(125, 10) for _ in range(2000)]
    assert drift.psi_numeric(ref, ref) == pytest.approx(0.0, abs=1e-9)
    assert drift.psi_numeric(ref, same) < 0.02
    assert 0.1 <= drift.psi_numeric(ref, moved) < 0.25 <= drift.psi_numeric(ref, far)
    # A constant reference still separates values below and above it.
    assert drift.psi_numeric([0.9] * 100, [0.5] * 100) > 0.25
    assert drift.psi_numeric([0.9] * 100, [0.95] * 100) > 0.25
    assert drift.psi_categorical(["a"] * 50 + ["b"] * 50, ["a"] * 50 + ["b"] * 50) == 0.0
    assert drift.psi_categorical(["a"] * 90 + ["b"] * 10, ["a"] * 10 + ["b"] * 90) > 0.25


def test_compare_flags_the_shifted_window_and_not_a_fresh_sample_of_the_same_stream():
    reference, same, shifted = streams()
    settings = drift.DriftSettings(**SETTINGS)

    def samples(texts: list[str]) -> list[sql_models.DriftSample]:
        out = []
        for text in texts:
            words = set(text.split())
            label = "billing" if words & set(BILLING) else "other"
            out.append(drift.features(text, label, 0.9 if label == "billing" else 0.5))
        return out

    ref = list(enumerate(samples(reference)))
    calm = drift.compare(ref, samples(same), settings)
    assert (calm["status"], calm["level"], calm["drifted"]) == ("checked", "none", [])
    assert set(calm["features"]) == {
        "input.length",
        "input.oov_rate",
        "output.label",
        "output.confidence",
    }
    assert all(f["psi"] < 0.1 for f in calm["features"].values())
    moved = drift.compare(ref, samples(shifted), settings)
    assert moved["level"] == "major"
    assert set(moved["drifted"]) == set(moved["features"])
    oov = moved["features"]["input.oov_rate"]
    assert oov["live"]["mean"] > 0.5 > 0.1 > oov["reference"]["mean"]
    assert oov["p_value"] < 0.05 and oov["psi"] >= 0.25
    assert moved["features"]["output.label"]["test"] == "chi2"
    assert drift.compare(ref[:5], samples(same), settings)["status"] == "insufficient"


def test_samples_keep_lengths_and_hashed_words_never_the_words():
    sample = drift.features(f"Hello {SECRET_WORD} hello WORLD", "other", 0.5)
    assert sample.length == len(f"Hello {SECRET_WORD} hello WORLD")
    assert len(sample.tokens) == 3  # distinct, casefolded
    assert all(isinstance(t, int) and 0 <= t < drift.BUCKETS for t in sample.tokens)
    assert drift.bucket("hello") in sample.tokens


# -- 2. through the gateway, on both stores ---------------------------------------------------


async def test_a_shifted_stream_raises_the_alert_and_an_unshifted_one_does_not(app, query):
    stack = rollout.wire(app, config(), providers={"kw": Keywords("kw")})
    reference, same, shifted = streams()
    async with app:
        await feed(stack, reference)
        await feed(stack, same)
        await stack.gateway.ask("untracked", "billing")  # not watched: no samples
        await stack.flush()
        calm = await stack.drift.check("ticket")
        calm_alerts = await drift.alerts(app)
        await feed(stack, shifted)  # the ring buffer now holds only the shifted stream
        moved = await stack.drift.check("ticket")
        again = await stack.drift.check("ticket")
        alerts = await drift.alerts(app)
        state = await sql_models.models_store(app.store).drift_state("ticket")
    await stack.close()

    assert (calm["status"], calm["level"], calm["drifted"]) == ("checked", "none", [])
    assert (calm["reference"], calm["live"]) == (300, 300)
    assert calm_alerts == []
    assert moved["level"] == "major" and again["level"] == "major"
    assert {"input.oov_rate", "input.length", "output.label"} <= set(moved["drifted"])
    assert moved["features"]["output.confidence"]["live"]["mean"] < 0.7
    [alert] = alerts
    assert (alert.task, alert.level) == ("ticket", "major")
    assert alert.report is not None and alert.report["drifted"] == moved["drifted"]
    assert state is not None and state.since is not None and state.live_count == 600
    # One audit record for the change of level, none for the unchanged re-check.
    audited = query("SELECT action, subject, data FROM audit WHERE action = 'model.drift_alert'")
    assert [(a, s) for a, s, _ in audited] == [("model.drift_alert", "model-task:ticket")]
    assert json.loads(audited[0][2])["level"] == "major"
    # Bounded: the reference and the ring buffer, nothing more; and no text anywhere.
    counts = dict(query("SELECT win, COUNT(*) FROM model_drift_samples GROUP BY win"))
    assert counts == {"ref": 300, "live": 300}
    assert query("SELECT COUNT(*) FROM model_drift_samples WHERE task = 'untracked'") == [(0,)]
    stored = query("SELECT task, win, tokens, label FROM model_drift_samples")
    assert not any(SECRET_WORD in " ".join(str(c) for c in row) for row in stored)
    assert not any("invoice" in str(row[2]) for row in stored)


async def test_the_workers_upkeep_checks_drift_of_workflow_answers_and_stores_the_alert(
    app, wait_until
):
    stack = rollout.wire(app, config(check_interval_s=0.2), providers={"kw": Keywords("kw")})
    reference, _, shifted = streams()

    @app.workflow("triage")
    async def triage(ctx: Any, text: str) -> str | None:
        return (await ctx.model("ticket", text)).label

    async with app, app.worker():
        await feed(stack, reference)
        handles = [await app.start("triage", {"text": t}) for t in shifted[:150]]
        for handle in handles:
            await handle.result(timeout=60)
        store = sql_models.models_store(app.store)

        async def alerted() -> bool:
            state = await store.drift_state("ticket")
            return state is not None and state.level == "major"

        await wait_until(alerted, timeout=30, what="the upkeep hook to raise the drift alert")
    await stack.close()


async def test_flowdesk_models_drift_prints_the_report_and_rebase_starts_again(
    app, db_url, tmp_path
):
    stack = rollout.wire(app, config(), providers={"kw": Keywords("kw")})
    reference, _, shifted = streams()
    async with app:
        await feed(stack, reference)
        await feed(stack, shifted[:200])
    await stack.close()

    def cli(*args: str) -> Any:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWDESK_")}
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "flowdesk",
                "models",
                "drift",
                "ticket",
                *args,
                "--database-url",
                db_url,
                "--json",
            ],
            capture_output=True,
            text=True,
            timeout=90,
            env=env,
            cwd=Path(tmp_path),
            check=False,
        )
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    report = await asyncio.to_thread(cli)
    assert (report["task"], report["level"], report["live"]) == ("ticket", "major", 200)
    assert report["features"]["input.oov_rate"]["drifted"] is True
    rebased = await asyncio.to_thread(cli, "--rebase")
    assert rebased == {"task": "ticket", "reset": "rebase", "reference": 200}
    async with app:
        state = await sql_models.models_store(app.store).drift_state("ticket")
    assert state is not None and (state.level, state.ref_count, state.live_count) == (
        "none",
        200,
        0,
    )
    after = await asyncio.to_thread(cli)
    assert (after["status"], after["reference"], after["live"]) == ("insufficient", 200, 0)


def test_drift_settings_are_checked():
    with pytest.raises(ValueError, match="psi_major"):
        drift.DriftSettings(psi_moderate=0.3, psi_major=0.2)
    with pytest.raises(ValueError, match="min_samples"):
        drift.DriftSettings(live_size=50, min_samples=100)
