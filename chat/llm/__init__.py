"""Model calls: which provider answers a model, the fallback chain a turn walks, and the retry
loop around one attempt.

Providers (`chat/llm/*.py`) make one attempt each and raise `UpstreamError`; this module gives
the call its deadlines (`Deadlines`: R2D2_UPSTREAM_TIMEOUT until the model's first chunk, retries
and alternates included; R2D2_UPSTREAM_IDLE_TIMEOUT between chunks; R2D2_MAX_REPLY_SECONDS for
the whole reply), and retries only what may succeed, only before the client saw any text, and
only when the wait fits the time left for the first chunk. Routing by name: chat/llm/router.py.

A model with alternates (R2D2_FALLBACKS) is a chain. Its turn tries each member in order, until
one sends its first chunk: it moves on after a failure that another upstream may not share (see
`router.MOVES_ON`), or when a member sends nothing within R2D2_FAILOVER_FIRST_CHUNK_SECONDS;
never once text came (the failure then ends the turn, as for any model). Members whose circuit
breaker is open are skipped (chat/llm/breaker.py); when all are, all are tried. A member with
another after it is not retried: the next one is the better retry. A chain's plain turns stream
from the upstream too (the client still gets one `message`), so the first-chunk limit measures
the model's first token and never cuts a long reply.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable

from django.conf import settings

from chat.llm import breaker, router
from chat.llm.base import Deadlines, Provider, Reply, UpstreamError, timed_out
from chat.llm.router import provider_for, route
from chat.ops import metrics
from chat.ops.throttle import client, warn_throttled
from chat.protocol.errors import ErrorCode

__all__ = ["Provider", "Reply", "UpstreamError", "chain", "close_clients", "generate", "models", "provider_for"]

logger = logging.getLogger(__name__)

chain = router.chain


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
    for provider in router.providers():
        await provider.close()


async def generate(
    *,
    model: str,
    messages: list[dict[str, str]],
    stream: bool,
    reply: Reply,
    max_output_tokens: int | None = None,
    unusable: Callable[[str], str | None] | None = None,
) -> AsyncIterator[str]:
    """Yield the reply's text chunks (one chunk when not streaming), filling `reply` (`reply.model`:
    the member that answered).

    `max_output_tokens` is sent as the request's output limit (a key's cap); `unusable` says why
    the principal may not use an alternate (skipped), or None. Cancelling the consuming task
    closes the upstream request.
    """
    reply.requested = reply.model = model
    deadlines = Deadlines(
        first=settings.R2D2_UPSTREAM_TIMEOUT,
        idle=settings.R2D2_UPSTREAM_IDLE_TIMEOUT,
        whole=settings.R2D2_MAX_REPLY_SECONDS,
    )
    members = router.chain(model, unusable)
    if len(members) == 1:
        async for chunk in _attempts(model, messages, stream, reply, deadlines, max_output_tokens, retry=True):
            yield chunk
        return
    routes = [route(member) for member in members]
    keys = [breaker.Member(m, provider.name, sent) for m, (provider, sent) in zip(members, routes, strict=True)]
    states = await breaker.look(keys)
    order = [i for i, state in enumerate(states) if state != breaker.State.OPEN] or list(range(len(members)))
    first_reason = "circuit_open" if order[0] != 0 else ""  # the model asked for was skipped
    for position, index in enumerate(order):
        member, key, last = members[index], keys[index], position == len(order) - 1
        reply.model, reply.headers_received = member, False
        said = False
        # A plain turn's text is handed on whole, as without a chain (one chunk: the caller's work per chunk
        # is for streamed turns).
        parts: list[str] | None = None if stream else []
        try:
            within = deadlines if last else deadlines.within(settings.R2D2_FAILOVER_FIRST_CHUNK_SECONDS)
            async for chunk in _attempts(member, messages, True, reply, within, max_output_tokens, retry=last):
                if not said:
                    said = True
                    if states[index] == breaker.State.PROBE:
                        await breaker.probe_succeeded(key)
                if parts is None:
                    yield chunk
                else:
                    parts.append(chunk)
            if parts:
                yield "".join(parts)
        except UpstreamError as exc:
            if router.counts_against(exc):
                await breaker.failed(key)
            reason = None if said or last else router.moves_on(exc)
            if reason is None:
                if first_reason:
                    metrics.fell_back(model, "none", first_reason)
                if parts:
                    yield "".join(parts)  # what the model said before it failed is kept, as for a streamed turn
                raise
            first_reason = first_reason or reason
            extra = {"requested": model, "member": member, "reason": reason, "next": members[order[position + 1]]}
            warn_throttled(logger, "fallback: trying the next model", key=(model, member), extra=extra)
            continue
        if first_reason:
            metrics.fell_back(model, member, first_reason)
        return


async def _attempts(
    model: str,
    messages: list[dict[str, str]],
    stream: bool,
    reply: Reply,
    deadlines: Deadlines,
    max_output_tokens: int | None,
    *,
    retry: bool,
) -> AsyncIterator[str]:
    """One model's call, retried (when `retry`) while no text came and the wait fits the first-chunk deadline."""
    provider, sent_as = route(model)
    loop = asyncio.get_running_loop()
    attempt = 0
    while True:
        reply.sent = True
        try:
            async for chunk in provider.generate(
                model=sent_as,
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
                not retry
                or delay is None
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
