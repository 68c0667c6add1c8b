"""Quotas per principal (a user or an API key), across all its connections and server processes.

A message is **admitted** only when the principal's remaining budget covers the turn's
**reservation**: the prompt as estimated (characters / 4) plus the reply it may get (the
key's output cap, --max-output-tokens, which the model is sent; else
R2D2_QUOTA_RESERVE_OUTPUT_TOKENS), in tokens and, at R2D2_MODEL_PRICES, in dollars. Taking the
reservation is one atomic step, so a burst of posts across sockets and processes can spend at
most the limit (plus, for replies without a cap, what replies exceed their reservation). The
reservation travels with the message; when the turn ends it is **settled** with what the
model reported (prompt + completion; an estimate where it reported nothing), replacing the
reservation, or **released** when the message never reached the model (refused, its queue dropped).
A request that reached the model is charged even when cancelled, cut off or failed: at
least its prompt.

Limits checked: messages per minute (wall-clock minute), tokens per UTC day, dollars per
UTC day and per calendar month (UTC); concurrent live sessions are counted in the sessions
table at start (chat/sessions/lifecycle.py holds that count exact); a principal with a money
limit may use only priced models. Past 80% of a money limit: one WARNING line per principal
per period, `r2d2_spend_warnings_total`, and a mark in the admin.

Anonymous connections have no quota (the per-socket token bucket in chat/accounts/limits.py
limits them): their reservation is a no-op that only keeps the socket's own figures (`Tally`).
Nothing here knows about sockets.

Where each part lives: this module, the checks at session start and what a principal used;
chat/accounts/reservations.py, admission, reservations and the refusals; chat/accounts/counters.py,
the counters and their backends (Redis or memory); chat/accounts/scripts.py, their Lua scripts;
chat/accounts/seeding.py, the counters rebuilt from the database where Redis lost them.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from django.conf import settings

from chat.accounts import seeding
from chat.accounts.counters import (
    MESSAGES,
    TOKENS,
    USD_DAY,
    USD_MONTH,
    Tally,
    next_day,
    next_month,
    utc,
)
from chat.accounts.principals import SessionLimit
from chat.accounts.reservations import exceeded, price_of, unpriced
from chat.ops import prices
from chat.protocol import UsageFigures
from chat.protocol.errors import ClientError, ErrorCode

if TYPE_CHECKING:
    from chat.accounts.principals import Principal

#: Share of a money limit past which the principal's spend is warned about, once a period.
WARN_AT = 0.8


# Checks at session start ----------------------------------------------------------------------


def check_model(principal: Principal, model: str) -> None:
    """Refuse a model outside the principal's list, or without a price when it has a money limit."""
    models = principal.limits.models
    if models and model not in models:
        raise ClientError(ErrorCode.MODEL_NOT_ALLOWED, f"This key may use only: {', '.join(models)}.")
    if principal.limits.in_money and price_of(model) is None:
        raise unpriced(model)


def session_limit(principal: Principal) -> SessionLimit | None:
    """The principal's limit of live sessions, for chat/sessions/lifecycle.py to hold exactly as it starts one."""
    limit = principal.limits.max_sessions
    if principal.is_anonymous or limit <= 0:
        return None

    def refusal(live: int) -> ClientError:
        return exceeded(f"Concurrent sessions: {live} of {limit} are live; end one to start another.")

    return SessionLimit(key=principal.quota_key, live=principal.own_sessions(), limit=limit, refusal=refusal)


# What a principal used -------------------------------------------------------------------------


async def usage(principal: Principal, *, now: float | None = None) -> dict[str, Any]:
    """Use so far (the admin shows it against the limits): messages this minute, tokens today, dollars
    today and this month (reservations of turns in progress included)."""
    now = time.time() if now is None else now
    used = await seeding.read(principal, now)
    return {
        "messages_this_minute": used[MESSAGES],
        "tokens_today": used[TOKENS],
        "usd_today": prices.dollars(used[USD_DAY]),
        "usd_this_month": prices.dollars(used[USD_MONTH]),
    }


def near_limit(principal: Principal, used: dict[str, Any]) -> list[str]:
    """The money limits `used` (from `usage`) is past 80% of, e.g. ["usd_per_day"] (the admin's mark)."""
    limits = principal.limits
    marks = []
    for name, spent, limit in (
        ("usd_per_day", used.get("usd_today", 0), limits.usd_per_day),
        ("usd_per_month", used.get("usd_this_month", 0), limits.usd_per_month),
    ):
        if limit > 0 and spent >= WARN_AT * limit:
            marks.append(name)
    return marks


async def figures(
    principal: Principal, *, tally: Tally | None = None, socket_sessions: int = 0, now: float | None = None
) -> UsageFigures:
    """What `chatbot_usage` answers: the principal's use against its limits (None: no limit), or, for an
    anonymous connection, the socket's own figures (`tally`, its `socket_sessions`) against its own limits."""
    now = time.time() if now is None else now
    day, month = next_day(now), next_month(now)
    resets = {"day_resets_at": utc(day), "month_resets_at": utc(month)}
    if principal.is_anonymous:
        own = tally.figures(now) if tally is not None else (0, 0, 0, 0)
        return UsageFigures(
            messages_this_minute=own[MESSAGES],
            messages_per_minute=settings.R2D2_RATE_LIMIT_PER_MINUTE or None,
            tokens_today=own[TOKENS],
            tokens_per_day=None,
            usd_today=prices.dollars(own[USD_DAY]),
            usd_per_day=None,
            usd_this_month=prices.dollars(own[USD_MONTH]),
            usd_per_month=None,
            sessions=socket_sessions,
            max_sessions=settings.R2D2_MAX_SESSIONS_PER_CONNECTION or None,
            **resets,
        )
    from chat.models import ChatSession

    used = await seeding.read(principal, now)
    limits = principal.limits
    return UsageFigures(
        messages_this_minute=used[MESSAGES],
        messages_per_minute=limits.messages_per_minute or None,
        tokens_today=used[TOKENS],
        tokens_per_day=limits.tokens_per_day or None,
        usd_today=prices.dollars(used[USD_DAY]),
        usd_per_day=limits.usd_per_day or None,
        usd_this_month=prices.dollars(used[USD_MONTH]),
        usd_per_month=limits.usd_per_month or None,
        sessions=await ChatSession.objects.live().filter(principal.own_sessions()).acount(),
        max_sessions=limits.max_sessions or None,
        **resets,
    )
