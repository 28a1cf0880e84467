"""The local classifier provider: the registry's scikit-learn models behind `Provider`.

``LocalClassifierProvider`` answers ``classify`` requests with a classifier from a
`flowdesk.models.registry.Registry`. The classifier is the request's ``task``, or the
name after ``local:`` in ``request.model`` (``model="local:intent"``); the version is
``request.version``, else the registry's current one, read again after ``state_ttl``
seconds (so a promotion reaches every process within a second; canary and shadow choices
are the gateway's, which then names the version). Concurrent requests to one version are
micro-batched (`flowdesk.models.batching.MicroBatcher`) into one vectorised prediction in
a worker thread.

The result's ``label`` is the out-of-scope label when the classifier's threshold or its
out-of-scope class says so (``raw["out_of_scope"]`` is then true); ``confidence`` is the
calibrated probability of the most probable label, ``scores`` the top-k probabilities.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import time
from collections.abc import Sequence

from flowdesk import errors
from flowdesk.models import base, batching, registry, training


class LocalClassifierProvider(base.Provider):
    """Local text classifiers, micro-batched (see the module docstring)."""

    name = "local"
    external = False

    def __init__(
        self,
        models: registry.Registry | str | os.PathLike[str] | None = None,
        *,
        name: str | None = None,
        task: str | None = None,
        models_dir: str | os.PathLike[str] | None = None,
        max_batch: int = 64,
        max_wait_ms: float = 2.0,
        top_k: int = 5,
        batching_enabled: bool = True,
        state_ttl: float = 1.0,
    ) -> None:
        if models is None:
            models = models_dir  # the gateway config's spelling
        self.registry = (
            models if isinstance(models, registry.Registry) else registry.Registry(models)
        )
        if name:
            self.name = name
        self.task = task  # the registry task this provider serves, when the config names one
        self.max_batch = max_batch
        self.max_wait_ms = max_wait_ms
        self.top_k = top_k
        self.batching_enabled = batching_enabled
        self.state_ttl = state_ttl  # how long a read of the current version is reused
        self._current_versions: dict[str, tuple[str, float]] = {}
        self._loaded: dict[tuple[str, str], training.LocalClassifier] = {}
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="flowdesk-local-model"
        )
        self._batchers: dict[tuple[str, str], batching.MicroBatcher[str, training.Prediction]] = {}

    def task_of(self, request: base.ModelRequest) -> str:
        """The classifier's task name: ``local:NAME`` in ``request.model``, else the task
        this provider was configured for, else the gateway's task."""
        prefix, _, rest = request.model.partition(":")
        if prefix == "local" and rest:
            return rest
        return self.task or request.task

    async def infer(self, request: base.ModelRequest) -> base.ProviderResult:
        if request.capability != "classify":
            raise errors.ModelError(
                f"local classifiers only classify; {request.capability!r} was asked of "
                f"{request.model!r}"
            )
        task = self.task_of(request)
        loop = asyncio.get_running_loop()
        try:
            version = request.version or self._current_cached(task)
            if not version:
                version = await loop.run_in_executor(None, self._current, task)
            classifier = self._loaded.get((task, version))
            if classifier is None:
                classifier = await loop.run_in_executor(None, self.registry.get, task, version)
                self._loaded[(task, version)] = classifier
        except errors.NotFound as exc:
            raise errors.ProviderUnavailable(str(exc)) from exc
        if self.batching_enabled:
            prediction = await self._batcher(task, version, classifier).submit(request.text)
        else:
            found = await loop.run_in_executor(
                None, lambda: classifier.predict([request.text], top_k=self.top_k)
            )
            prediction = found[0]
        return base.ProviderResult(
            model=f"local:{task}",
            version=version,
            label=prediction.label,
            confidence=prediction.confidence,
            scores=prediction.scores,
            raw={
                "out_of_scope": prediction.out_of_scope,
                "predicted": prediction.predicted,
                "features": classifier.features,
            },
        )

    def _current_cached(self, task: str) -> str | None:
        found = self._current_versions.get(task)
        if found is None or time.monotonic() - found[1] > self.state_ttl:
            return None
        return found[0]

    def _current(self, task: str) -> str:
        current = self.registry.state(task).current
        if current is None:
            raise errors.ModelNotFound(task, "current", [], str(self.registry))
        self._current_versions[task] = (current, time.monotonic())
        return current

    def _batcher(
        self, task: str, version: str, classifier: training.LocalClassifier
    ) -> batching.MicroBatcher[str, training.Prediction]:
        key = (task, version)
        found = self._batchers.get(key)
        if found is None:
            top_k = self.top_k

            def predict(texts: Sequence[str]) -> list[training.Prediction]:
                return classifier.predict(texts, top_k=top_k)

            found = batching.MicroBatcher(
                predict,
                max_batch=self.max_batch,
                max_wait_ms=self.max_wait_ms,
                executor=self._executor,
                name=f"local:{task}:{version}",
            )
            self._batchers[key] = found
        return found

    def stats(self) -> dict[str, batching.BatchStats]:
        """Batch counts per ``local:task:version``."""
        return {batcher.name: batcher.stats for batcher in self._batchers.values()}

    async def close(self) -> None:
        for batcher in list(self._batchers.values()):
            await batcher.close()
        self._batchers.clear()
        self._executor.shutdown(wait=False, cancel_futures=True)
