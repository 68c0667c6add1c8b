"""Prometheus metrics: what a server process counts (the `/metrics` page that shows them: chat/web/metrics.py).

Several Daphne processes serve one instance (r2d2site/serve.py), so when
PROMETHEUS_MULTIPROC_DIR is set (the launcher sets it) every process writes its
values to files there and a scrape, answered by whichever process gets it, adds
up all of them. Gauges count only live processes (the launcher removes a dead
process's gauge files); counters and histograms of dead processes stay counted,
so totals never go backwards. With no directory (one process) values live in memory.

Tokens and cost are labelled by model, but a client may name any model when no list
limits them: the label is the model only when the server's configuration names it
(R2D2_DEFAULT_MODEL, R2D2_ALLOWED_MODELS, R2D2_QUOTA_MODELS, R2D2_BEDROCK_MODELS,
R2D2_MODEL_PRICES, R2D2_FALLBACKS), `other` otherwise, so a client cannot grow the label set.
"""

from __future__ import annotations

import functools
import time
from typing import Protocol

from django.conf import settings
from prometheus_client import Counter, Gauge, Histogram

from chat.ops import prices


class Reply(Protocol):
    """What the hooks read of a model call (chat/llm/base.py's Reply): a Protocol, so ops stays below llm."""

    model: str
    started: float
    prompt_tokens: int | None
    completion_tokens: int | None


# Seconds from the model call to the first delta and to the final message: a 50 ms model
# is the lowest a real one answers, a minute is the upstream timeout.
_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

OPEN_SOCKETS = Gauge("r2d2_open_sockets", "WebSocket connections open", multiprocess_mode="livesum")
LIVE_SESSIONS = Gauge("r2d2_live_sessions", "Sessions held by live processes", multiprocess_mode="livesum")
TURNS = Counter("r2d2_turns", "Turns answered or failed", ["outcome"])
FIRST_DELTA = Histogram("r2d2_time_to_first_delta_seconds", "Model call to first message_delta", buckets=_BUCKETS)
FINAL_MESSAGE = Histogram("r2d2_time_to_message_seconds", "Model call to the final message", buckets=_BUCKETS)
UPSTREAM_ERRORS = Counter("r2d2_upstream_errors", "Failed model calls, by error code", ["code"])
TOKENS = Counter("r2d2_tokens", "Tokens the model reported, by kind and model", ["kind", "model"])
COST = Counter("r2d2_cost_dollars", "Estimated model cost (R2D2_MODEL_PRICES), by model", ["model"])
REJECTED_FRAMES = Counter("r2d2_rejected_frames", "Client frames refused, by error code", ["code"])
# Once per principal per period (chat/accounts/quotas.py): its spend passed 80% of a money limit.
SPEND_WARNINGS = Counter("r2d2_spend_warnings", "Principals past 80% of a money limit, by limit", ["limit"])
# Fallback chains (chat/llm/__init__.py): a turn answered by another model than the one asked for (`served`:
# the member that answered, `none` when every member failed), by why the first member was left; and
# each chain member's circuit breaker (chat/llm/breaker.py) as this process last saw it.
FALLBACKS = Counter("r2d2_fallbacks", "Turns a fallback chain moved on", ["requested", "served", "reason"])
CIRCUIT_OPEN = Gauge(
    "r2d2_circuit_open", "1 while a circuit breaker is open", ["upstream", "model"], multiprocess_mode="livemax"
)


# Hooks (one line at each call site) -------------------------------------------


def first_delta(reply: Reply) -> None:
    FIRST_DELTA.observe(_since(reply))


def answered(reply: Reply) -> None:
    FINAL_MESSAGE.observe(_since(reply))
    TURNS.labels("answered").inc()
    model = model_label(reply.model)
    if reply.prompt_tokens:
        TOKENS.labels("prompt", model).inc(reply.prompt_tokens)
    if reply.completion_tokens:
        TOKENS.labels("completion", model).inc(reply.completion_tokens)
    price = _price_table(settings.R2D2_MODEL_PRICES).get(reply.model)
    if price is not None and (reply.prompt_tokens or reply.completion_tokens):
        # The one cost function (quotas and the admin use it too), so the three never disagree.
        nano = prices.nano_dollars(price, reply.prompt_tokens or 0, reply.completion_tokens or 0)
        COST.labels(model).inc(nano / prices.NANO)


def turn_failed(code: str) -> None:
    TURNS.labels("failed").inc()
    if code.startswith("upstream_"):
        UPSTREAM_ERRORS.labels(code).inc()


def rejected(code: str) -> None:
    REJECTED_FRAMES.labels(code).inc()


def fell_back(requested: str, served: str, reason: str) -> None:
    FALLBACKS.labels(requested, served, reason).inc()


def circuit(upstream: str, model: str, *, is_open: bool) -> None:
    CIRCUIT_OPEN.labels(upstream, model).set(1 if is_open else 0)


def _since(reply: Reply) -> float:
    return time.monotonic() - reply.started


def model_label(model: str) -> str:
    """The model, when the server's configuration names it; else `other` (see the module docstring)."""
    return model if model in _configured_models(*_model_settings()) else "other"


def _model_settings() -> tuple:
    return (
        settings.R2D2_DEFAULT_MODEL,
        tuple(settings.R2D2_ALLOWED_MODELS),
        tuple(settings.R2D2_QUOTA_MODELS),
        tuple(settings.R2D2_BEDROCK_MODELS),
        settings.R2D2_MODEL_PRICES,
        tuple((model, *alternates) for model, alternates in settings.R2D2_FALLBACKS.items()),
    )


@functools.lru_cache(maxsize=4)
def _configured_models(
    default: str, allowed: tuple, quota: tuple, bedrock: tuple, priced: str, chains: tuple
) -> frozenset[str]:
    return frozenset({default, *allowed, *quota, *bedrock, *_price_table(priced), *(m for c in chains for m in c)})


@functools.lru_cache(maxsize=4)
def _price_table(raw: str) -> dict[str, tuple[float, float]]:
    """R2D2_MODEL_PRICES parsed (chat/accounts/usage.py), once per value of the setting."""
    return prices.parse(raw)
