"""Which provider answers a model, and the chain of models a turn may try (R2D2_FALLBACKS).

A model is routed by its name: Bedrock's (R2D2_BEDROCK_MODELS, or a `bedrock/` prefix) to
Bedrock; `name/model` with `name` an entry of R2D2_UPSTREAMS to that upstream, as `model`;
any other name (`meta-llama/Llama-3-8B` included) to the default upstream, or, when that is
not configured, to the offline responder.

A turn's chain is the model asked for, then its alternates the principal may use. The offline
responder is never an alternate: a configured model that fails must not start answering "no
model is configured", so an alternate that would be routed to it is left out.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from django.conf import settings

from chat.llm import bedrock, upstreams
from chat.llm.base import Provider, UpstreamError
from chat.llm.bedrock import BedrockProvider
from chat.llm.offline import OfflineProvider
from chat.protocol.errors import ErrorCode

if TYPE_CHECKING:
    from chat.llm.openai_compat import OpenAIProvider

logger = logging.getLogger(__name__)

BEDROCK: Provider = BedrockProvider()
OFFLINE: Provider = OfflineProvider()
# One provider per OpenAI-compatible upstream, made when first routed to (R2D2_UPSTREAMS is a setting).
_openai: dict[str, OpenAIProvider] = {}

#: Why a chain moves on to its next member (the `reason` label of r2d2_fallbacks_total), by error code.
#: A 400 (the request's own fault) and R2D2's own refusals are missing on purpose: the next
#: member would refuse the same request, or the principal may not have it.
MOVES_ON = {
    ErrorCode.UPSTREAM_UNAVAILABLE: "unavailable",
    ErrorCode.UPSTREAM_RATE_LIMITED: "rate_limited",
    ErrorCode.UPSTREAM_SERVER_ERROR: "server_error",
    ErrorCode.UPSTREAM_AUTH_FAILED: "auth_failed",
    ErrorCode.UPSTREAM_TIMEOUT: "timeout",
    ErrorCode.UPSTREAM_INVALID_RESPONSE: "invalid_response",
}

# (requested, alternate, why) already logged as skipped: each is logged once per process.
_skips_logged: set[tuple[str, str, str]] = set()


def openai_provider(name: str = upstreams.DEFAULT) -> OpenAIProvider:
    provider = _openai.get(name)
    if provider is None:
        # Imported with the first turn, not with the package: its aiohttp is ~0.13 s of every
        # process's start (a third of `manage.py check`), which no management command needs.
        from chat.llm.openai_compat import OpenAIProvider

        provider = _openai[name] = OpenAIProvider(name)
    return provider


def route(model: str) -> tuple[Provider, str]:
    """The provider that answers `model`, and the name it is sent as."""
    if bedrock.answers(model):
        return BEDROCK, model
    prefix, slash, rest = model.partition("/")
    if slash and rest and prefix in settings.R2D2_UPSTREAMS:
        return openai_provider(prefix), rest
    provider = openai_provider()
    return (provider, model) if provider.is_configured() else (OFFLINE, model)


def provider_for(model: str) -> Provider:
    """The provider that answers `model` (its name is what `chatbot_models` shows)."""
    return route(model)[0]


def providers() -> list[Provider]:
    """Every provider made so far (to close their connections)."""
    return [BEDROCK, OFFLINE, *_openai.values()]


def chain(model: str, unusable: Callable[[str], str | None] | None = None) -> list[str]:
    """`model`, then its alternates (R2D2_FALLBACKS) that are not routed to the offline responder
    and that `unusable` (why the principal may not use one, or None) lets through."""
    alternates = settings.R2D2_FALLBACKS.get(model)
    if not alternates:
        return [model]
    members = [model]
    for alternate in alternates:
        why = "offline" if route(alternate)[0] is OFFLINE else (unusable(alternate) if unusable else None)
        if why is None:
            members.append(alternate)
        elif (model, alternate, why) not in _skips_logged:
            _skips_logged.add((model, alternate, why))
            logger.warning("fallback skipped", extra={"requested": model, "alternate": alternate, "why": why})
    return members


def moves_on(exc: UpstreamError) -> str | None:
    """The reason a chain tries its next member after `exc` (before any text), or None when it must not."""
    return MOVES_ON.get(exc.code) if not exc.ours else None


def counts_against(exc: UpstreamError) -> bool:
    """True when `exc` counts as the upstream's failure for its circuit breaker: not the request's
    own fault (400) nor R2D2's (its credentials could not be read)."""
    return not exc.ours and (exc.code in MOVES_ON or exc.code == ErrorCode.UPSTREAM_STREAM_INTERRUPTED)
