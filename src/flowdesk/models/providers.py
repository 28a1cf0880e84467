"""Building providers from the gateway config's ``[providers.NAME]`` tables.

``openai`` and ``anthropic`` are the HTTP providers (`flowdesk.models.http`), ``local``
the scikit-learn classifiers (`flowdesk.models.local`), ``llama_cpp`` GGUF models in
process (`flowdesk.models.llama`), and ``python`` any `base.Provider` a factory returns.
The optional ones are imported only when a config names them.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from flowdesk import errors
from flowdesk.models import base, http
from flowdesk.models import config as cfg


def _load_factory(spec: str) -> Callable[..., Any]:
    module_name, _, attr = spec.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise errors.ConfigurationError(f"Cannot load provider factory {spec!r}: {exc}") from exc
    if not callable(obj):
        raise errors.ConfigurationError(f"Provider factory {spec!r} is not callable.")
    return obj  # type: ignore[no-any-return]


def build_provider(name: str, settings: cfg.ProviderConfig, api_key: str | None) -> base.Provider:
    """A provider instance for one ``[providers.NAME]`` table."""
    if settings.type == "openai":
        assert settings.base_url is not None
        return http.OpenAIProvider(
            name,
            base_url=settings.base_url,
            api_key=api_key,
            timeout=settings.timeout_s,
            headers=settings.headers,
            external=settings.is_external,
            logprobs=settings.logprobs,
            structured_output=settings.structured_output,
        )
    if settings.type == "anthropic":
        assert settings.base_url is not None
        return http.AnthropicProvider(
            name,
            base_url=settings.base_url,
            api_key=api_key,
            timeout=settings.timeout_s,
            headers=settings.headers,
            external=settings.is_external,
            anthropic_version=settings.anthropic_version,
        )
    if settings.type == "llama_cpp":
        # Imported on use: llama.cpp loads only for configs that name a GGUF model.
        from flowdesk.models import llama

        return llama.LlamaCppProvider(
            name,
            max_queue=settings.max_queue,
            n_ctx=settings.n_ctx,
            n_threads=settings.n_threads,
            models_dir=settings.models_dir,
            **settings.options,
        )
    if settings.type == "local":
        # Imported here, not at the top: the local provider (and scikit-learn behind it)
        # loads only for configs that use it.
        try:
            local = importlib.import_module("flowdesk.models.local")
            cls = local.LocalClassifierProvider
        except (ImportError, AttributeError) as exc:
            raise errors.ConfigurationError(
                f"Provider {name!r} has type 'local', but flowdesk.models.local."
                f"LocalClassifierProvider cannot be loaded: {exc}"
            ) from exc
        provider = cls(
            name=name, task=settings.task, models_dir=settings.models_dir, **settings.options
        )
    else:
        if not settings.factory:
            raise errors.ConfigurationError(
                f"Provider {name!r} has type 'python' but no factory = 'module:callable' "
                "(or pass the instance: Gateway(config, providers={name: provider}))."
            )
        provider = _load_factory(settings.factory)(name=name, **settings.options)
    if not isinstance(provider, base.Provider):
        raise errors.ConfigurationError(
            f"Provider {name!r}: the factory returned {type(provider).__name__}, not a "
            "flowdesk.models.base.Provider."
        )
    return provider
