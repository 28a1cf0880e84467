"""Local classifier benchmark: Banking77 quality, training time, and throughput with and
without micro-batching.

    python benchmarks/classifier.py [--data data/banking77/train.csv] [--seeds 0]
                                    [--requests 2000] [--callers 64] [--no-tfidf-baseline]

It prints, for the default classifier (TF-IDF joined with sentence embeddings when the
embeddings extra is installed) trained on a stratified 80 % of the Banking77 training split
and measured on the 20 % held back (one line per ``--seeds`` split):

* accuracy, macro-F1, expected calibration error (15 bins) and training time (embedding
  included), and whether accuracy reaches the 0.93 target;
* the same for TF-IDF alone (unless ``--no-tfidf-baseline``);

then, through `flowdesk.models.local.LocalClassifierProvider` with ``--callers`` concurrent
callers sending ``--requests`` Banking77 texts in all:

* predictions/s and per-request latency p50/p99 with micro-batching and without it (each
  request a one-text prediction in a thread pool), the mean batch size, and the speed-up,
  for the default classifier and for the TF-IDF one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from flowdesk.models import base, local, registry, training

ROOT = Path(__file__).resolve().parents[1]
TARGET_ACCURACY = 0.93


def _quality(
    examples: training.Examples, features: training.FeatureChoice, seed: int
) -> tuple[training.TrainResult, dict[str, Any]]:
    started = time.perf_counter()
    result = training.train(examples, features=features, seed=seed)
    elapsed = time.perf_counter() - started
    m = result.metrics
    row = {
        "features": result.meta["features"],
        "seed": seed,
        "n_train": result.meta["n_train"],
        "n_heldout": result.meta["n_heldout"],
        "accuracy": round(m.accuracy, 4),
        "macro_f1": round(m.macro_f1, 4),
        "ece": round(m.ece, 4),
        "train_seconds": round(elapsed, 1),
    }
    print(
        f"{row['features']:<17} seed {seed}: accuracy {m.accuracy:.4f}  macro-F1 {m.macro_f1:.4f}"
        f"  ECE {m.ece:.4f}  train {elapsed:.1f} s  (train {row['n_train']}, held back "
        f"{row['n_heldout']})",
        flush=True,
    )
    return result, row


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


async def _load(
    provider: local.LocalClassifierProvider, texts: list[str], requests: int, callers: int
) -> dict[str, float]:
    latencies: list[float] = []
    next_index = 0

    async def caller() -> None:
        nonlocal next_index
        while next_index < requests:
            text = texts[next_index % len(texts)]
            next_index += 1
            request = base.ModelRequest(
                task="bench", capability="classify", text=text, model="local:bench"
            )
            started = time.perf_counter()
            await provider.infer(request)
            latencies.append(time.perf_counter() - started)

    await provider.infer(  # warm up: load the model and the embedder
        base.ModelRequest(task="bench", capability="classify", text=texts[0], model="local:bench")
    )
    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(callers)))
    elapsed = time.perf_counter() - started
    return {
        "requests": len(latencies),
        "per_second": len(latencies) / elapsed,
        "p50_ms": statistics.median(latencies) * 1000,
        "p99_ms": _percentile(latencies, 0.99) * 1000,
    }


async def _throughput(
    models_dir: Path, texts: list[str], requests: int, callers: int, kind: str
) -> dict[str, Any]:
    print(f"throughput of the {kind} classifier:", flush=True)
    results: dict[str, Any] = {}
    for batched in (False, True):
        provider = local.LocalClassifierProvider(
            models_dir, batching_enabled=batched, max_batch=64, max_wait_ms=2.0
        )
        try:
            figures = await _load(provider, texts, requests, callers)
            if batched:
                stats = provider.stats()["local:bench:v1"]
                figures["mean_batch"] = stats.mean_size
        finally:
            await provider.close()
        name = "batched" if batched else "unbatched"
        results[name] = figures
        extra = f"  mean batch {figures['mean_batch']:.1f}" if batched else ""
        print(
            f"  {name:<9} {callers} callers: {figures['per_second']:8.1f} predictions/s  "
            f"p50 {figures['p50_ms']:7.1f} ms  p99 {figures['p99_ms']:7.1f} ms{extra}",
            flush=True,
        )
    speedup = results["batched"]["per_second"] / results["unbatched"]["per_second"]
    results["speedup"] = speedup
    print(f"  micro-batching speed-up: {speedup:.1f}x (target >= 3x)", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(ROOT / "data" / "banking77" / "train.csv"))
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--label-column", default="category")
    parser.add_argument("--seeds", default="0", help="held-back splits, e.g. 0,1,2")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--callers", type=int, default=64)
    parser.add_argument("--no-tfidf-baseline", action="store_true")
    parser.add_argument("--json", action="store_true", help="also print the figures as JSON")
    args = parser.parse_args()

    examples = training.load_examples(
        args.data, text_column=args.text_column, label_column=args.label_column
    )
    print(
        f"{Path(args.data).name}: {len(examples)} examples, {len(examples.label_counts)} labels; "
        f"embeddings installed: {training.embeddings_available()}",
        flush=True,
    )
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    rows = []
    kept: training.TrainResult | None = None
    baseline: training.TrainResult | None = None
    for seed in seeds:
        result, row = _quality(examples, "auto", seed)
        rows.append(row)
        kept = kept or result
        if not args.no_tfidf_baseline and result.meta["features"] != "tfidf":
            tfidf, row = _quality(examples, "tfidf", seed)
            rows.append(row)
            baseline = baseline or tfidf
    assert kept is not None
    default_rows = [r for r in rows if r["features"] == kept.meta["features"]]
    mean = statistics.mean(r["accuracy"] for r in default_rows)
    verdict = "reaches" if mean >= TARGET_ACCURACY else "does NOT reach"
    print(
        f"default classifier ({kept.meta['features']}): mean held-out accuracy {mean:.4f} over "
        f"{len(default_rows)} split(s) {verdict} the {TARGET_ACCURACY} target",
        flush=True,
    )

    step = max(1, len(examples) // max(args.requests, 1))
    texts = list(examples.texts[::step])[: max(args.requests, 1)]
    throughput = {}
    for trained in (kept, baseline):
        if trained is None:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            registry.Registry(tmp).register("bench", trained.classifier, trained.meta)
            kind = trained.meta["features"]
            throughput[kind] = asyncio.run(
                _throughput(Path(tmp), texts, args.requests, args.callers, kind)
            )
    if args.json:
        print(json.dumps({"quality": rows, "throughput": throughput}, indent=2))


if __name__ == "__main__":
    sys.exit(main())
