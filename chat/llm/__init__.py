"""Model calls: which provider answers a model, and the retry loop around one attempt.

Providers (`chat/llm/*.py`) make one attempt each and raise `UpstreamError`; this
module gives the call its deadlines (`Deadlines`: R2D2_UPSTREAM_TIMEOUT until the
model's first chunk, retries included; R2D2_UPSTREAM_IDLE_TIMEOUT between chunks;
R2D2_MAX_REPLY_SECONDS for the whole reply), and retries only what may succeed,
only before the client saw any text, and only when the wait fits the time left
for the first chunk. Models are routed by name: Bedrock's (R2D2_BEDROCK_MODELS,
or a `bedrock/` prefix) to Bedrock, every other name to the OpenAI-compatible
provider, or, when that is not configured, to the offline responder.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

from django.conf import settings

from chat.llm import bedrock
from chat.llm.base import Deadlines, Provider, Reply, UpstreamError, timed_out
from chat.llm.bedrock import BedrockProvider
from chat.llm.offline import OfflineProvider
from chat.llm.openai_compat import OpenAIProvider
from chat.ops.throttle import client, warn_throttled
from chat.protocol.errors import ErrorCode

__all__ = ["Provider", "Reply", "UpstreamError", "close_clients", "generate", "models", "provider_for"]

logger = logging.getLogger(__name__)

PROVIDERS: dict[str, Provider] = {
    "openai": OpenAIProvider(),
    "bedrock": BedrockProvider(),
    "offline": OfflineProvider(),
}


def provider_for(model: str) -> Provider:
    """The provider that answers `model`: Bedrock for its models, else the OpenAI-compatible
    one, or the offline responder when that is not configured."""
    if bedrock.answers(model):
        return PROVIDERS["bedrock"]
    provider = PROVIDERS["openai"]
    return provider if provider.is_configured() else PROVIDERS["offline"]


def models(only: list[str] | None = None) -> list[tuple[str, str]]:
    """The models a client may choose, each with the name of the provider that answers it:
    the allow-list when there is one, else the default model then the Bedrock models.

    `only` (a principal's own list of models) narrows the allow-list, or, where the server
    has none and forwards any name, is the list."""
    names = settings.R2D2_ALLOWED_MODELS or [settings.R2D2_DEFAULT_MODEL, *settings.R2D2_BEDROCK_MODELS]
    if only:
        names = [name for name in names if name in only] if settings.R2D2_ALLOWED_MODELS else list(only)
    return [(name, provider_for(name).name) for name in dict.fromkeys(names)]


async def close_clients() -> None:
    """Close the running loop's upstream connections: at the end of a drain (chat/sessions/drain.py),
    in tests, and wherever else a loop ends (aiohttp logs an ERROR for each session left open)."""
    for provider in PROVIDERS.values():
        await provider.close()


async def generate(
    *,
    model: str,
    messages: list[dict[str, str]],
    stream: bool,
    reply: Reply,
    max_output_tokens: int | None = None,
) -> AsyncIterator[str]:
    """Yield the reply's text chunks (one chunk when not streaming), filling `reply`.

    `max_output_tokens` is sent as the request's output limit (a key's cap). Cancelling the
    consuming task closes the upstream request.
    """
    provider = provider_for(model)
    reply.model = model
    loop = asyncio.get_running_loop()
    deadlines = Deadlines(
        first=settings.R2D2_UPSTREAM_TIMEOUT,
        idle=settings.R2D2_UPSTREAM_IDLE_TIMEOUT,
        whole=settings.R2D2_MAX_REPLY_SECONDS,
    )
    attempt = 0
    while True:
        reply.sent = True
        try:
            async for chunk in provider.generate(
                model=model,
                messages=messages,
                stream=stream,
                reply=reply,
                deadlines=deadlines,
                max_output_tokens=max_output_tokens,
            ):
                yield chunk
            reply.finished = time.monotonic()
            return
        except TimeoutError:
            # A client can cause these at will (a model name the server refuses, a slow prompt): throttled.
            extra = {"model": model, "attempt": attempt, "deadline": deadlines.missed()}
            warn_throttled(logger, "model call timed out", key=client(), extra=extra)
            raise timed_out() from None
        except UpstreamError as exc:
            if not reply.headers_received and exc.code != ErrorCode.UPSTREAM_TIMEOUT:
                reply.sent = False  # refused or unreachable: the model did no work for it
            delay = _backoff(exc, attempt)
            if (
                delay is None
                or reply.headers_received
                or attempt >= settings.R2D2_UPSTREAM_RETRIES
                or loop.time() + delay >= deadlines.first_by
            ):
                warn_throttled(
                    logger,
                    "model call failed",
                    key=client(),
                    extra={"code": exc.code, "provider": provider.name, "model": model, "attempt": attempt},
                )
                raise
            attempt += 1
            await asyncio.sleep(delay)


def _backoff(exc: UpstreamError, attempt: int) -> float | None:
    """Seconds to wait before the next attempt, or None when retrying cannot help."""
    if not exc.retryable:
        return None
    if exc.retry_after is not None:
        return exc.retry_after
    return (0.5 if exc.code == ErrorCode.UPSTREAM_RATE_LIMITED else 0.25) * 2**attempt
