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

The counters live in Redis when REDIS_URL is set (one Lua script to admit, one to settle:
atomic, one round trip each), in this process's memory otherwise. Money is counted in whole
nano-dollars. Anonymous connections have no quota (the per-socket token bucket in
chat/accounts/limits.py limits them): their reservation is a no-op that only keeps the socket's
own figures (`Tally`). Nothing here knows about sockets.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import math
import threading
import time
import weakref
from collections.abc import Coroutine, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol

from django.conf import settings

from chat import llm
from chat.accounts import prices
from chat.ops import metrics
from chat.ops.tasks import Background
from chat.protocol import PostMessage, UsageFigures
from chat.protocol.errors import ClientError, ErrorCode

if TYPE_CHECKING:
    from chat.accounts.principals import Limits, Principal
    from chat.sessions.lifecycle import SessionLimit

logger = logging.getLogger(__name__)

DAY = 86_400
MINUTE_TTL = 120
DAY_TTL = 2 * DAY
MONTH_TTL = 32 * DAY
#: Share of a money limit past which the principal's spend is warned about, once a period.
WARN_AT = 0.8

# The four counters of a principal, in this order everywhere: messages this minute, tokens
# today, nano-dollars today, nano-dollars this month.
MESSAGES, TOKENS, USD_DAY, USD_MONTH = range(4)
_LIMIT_NAMES = ("messages_per_minute", "tokens_per_day", "usd_per_day", "usd_per_month")


# Checks at session start ----------------------------------------------------------


def check_model(principal: Principal, model: str) -> None:
    """Refuse a model outside the principal's list, or without a price when it has a money limit."""
    models = principal.limits.models
    if models and model not in models:
        raise ClientError(ErrorCode.MODEL_NOT_ALLOWED, f"This key may use only: {', '.join(models)}.")
    if principal.limits.in_money and price_of(model) is None:
        raise _unpriced(model)


def unusable(limits: Limits, model: str) -> str | None:
    """Why a principal with `limits` may not use `model` (a fallback chain skips it for them), or None."""
    if limits.models and model not in limits.models:
        return "not in the key's models"
    if limits.in_money and price_of(model) is None:
        return "unpriced, under a money limit"
    return None


def session_limit(principal: Principal) -> SessionLimit | None:
    """The principal's limit of live sessions, for chat/sessions/lifecycle.py to hold exactly as it starts one."""
    from chat.sessions.lifecycle import SessionLimit

    limit = principal.limits.max_sessions
    if principal.is_anonymous or limit <= 0:
        return None

    def refusal(live: int) -> ClientError:
        return _exceeded(f"Concurrent sessions: {live} of {limit} are live; end one to start another.")

    return SessionLimit(key=principal.quota_key, live=principal.own_sessions(), limit=limit, refusal=refusal)


# Admission ----------------------------------------------------------------------------


def estimate_prompt_tokens(system_message: str, history: Sequence[tuple[str, str]], post: PostMessage) -> int:
    """The prompt `post` will be sent with after `history`, in tokens (characters / 4), as chat/turns/prompt.py
    cuts it to R2D2_MAX_CONTEXT_CHARS (a system message it brings replaces the session's)."""
    system = system_message if post.system_message is None else post.system_message
    fixed = len(system) + len(post.user_message)
    earlier = sum(len(text) for _, text in history)
    return math.ceil((fixed + min(earlier, max(0, settings.R2D2_MAX_CONTEXT_CHARS - fixed))) / 4)


async def admit(
    principal: Principal,
    *,
    model: str,
    prompt_tokens_estimate: int,
    max_output_tokens: int | None,
    tally: Tally | None = None,
    now: float | None = None,
) -> Reservation:
    """Admit one message, reserving its turn's cost; ClientError(quota_exceeded) names the limit and its reset.

    `max_output_tokens`: the output cap the model will be sent (None: none). Anonymous principals
    reserve nothing (their reservation keeps `tally`, the socket's own figures)."""
    cap = max_output_tokens if max_output_tokens and max_output_tokens > 0 else None
    now = time.time() if now is None else now
    limits = principal.limits
    price = chain_price(limits, model)
    if principal.is_anonymous:
        if tally is not None:
            tally.message(now)
        return Reservation(None, model, cap, price, tally=tally, limits=limits)
    if limits.in_money and price_of(model) is None:
        raise _unpriced(model)
    output = cap if cap is not None else max(0, settings.R2D2_QUOTA_RESERVE_OUTPUT_TOKENS)
    tokens = prompt_tokens_estimate + output
    nano = prices.nano_dollars(price, prompt_tokens_estimate, output) if price is not None else 0
    keys = _keys(principal, now)
    refused, used = await counters().admit(keys, _limits_of(principal), 1, tokens, nano)
    if refused is not None:
        raise _exceeded(_refusal(refused, used, _limits_of(principal), tokens, nano, now))
    return Reservation(
        principal, model, cap, price, keys=keys, prompt=prompt_tokens_estimate, tokens=tokens, nano=nano, limits=limits
    )


def charge_only(principal: Principal, model: str) -> Reservation | None:
    """A turn admitted earlier, elsewhere (a message a process that died or drained had queued): charged
    what it costs when it ends, without admitting it again. None for an anonymous principal."""
    if principal.is_anonymous:
        return None
    cap = principal.limits.max_output_tokens or None
    price = chain_price(principal.limits, model)
    return Reservation(principal, model, cap, price, keys=_keys(principal, time.time()), limits=principal.limits)


class Reservation:
    """What one admitted message holds of its principal's budget until its turn ends.

    Exactly one of `settle` (the turn called the model, whatever came of it) or `release`
    (it never did) takes effect; later calls do nothing, so both may be called safely."""

    __slots__ = (
        "principal",
        "model",
        "max_output_tokens",
        "_price",
        "_keys",
        "_prompt",
        "_tokens",
        "_nano",
        "_open",
        "_tally",
        "_limits",
    )

    def __init__(
        self,
        principal: Principal | None,
        model: str,
        max_output_tokens: int | None,
        price: tuple[float, float] | None,
        *,
        keys: tuple[str, ...] = (),
        prompt: int = 0,
        tokens: int = 0,
        nano: int = 0,
        tally: Tally | None = None,
        limits: Limits | None = None,
    ) -> None:
        self.principal = principal  # None: anonymous, nothing reserved
        self.model = model
        self.max_output_tokens = max_output_tokens  # the output limit the model is sent
        self._price = price
        self._keys = keys
        self._prompt = prompt  # the prompt's estimate at admission, in tokens
        self._tokens = tokens
        self._nano = nano
        self._open = True
        self._tally = tally
        self._limits = limits  # the principal's: which of a fallback chain's alternates it may use

    @property
    def reserved(self) -> tuple[int, int]:
        """(tokens, nano-dollars) held while open."""
        return (self._tokens, self._nano) if self._open else (0, 0)

    async def cover(self, request: Sequence[dict[str, str]]) -> None:
        """The turn's request is built: reserve what its prompt needs beyond the estimate made at admission
        (a message queued behind others was estimated before their replies joined the history), or refuse
        the turn with ClientError(quota_exceeded). Nothing to do in the usual turn, whose estimate was exact."""
        if self.principal is None or not self._open:
            return
        prompt = _estimate(request)
        more = prompt - self._prompt
        if more <= 0:
            return
        nano = prices.nano_dollars(self._price, more, 0) if self._price is not None else 0
        now = time.time()
        limits = _limits_of(self.principal)
        refused, used = await counters().admit(self._keys, limits, 0, more, nano)
        if refused is not None:
            raise _exceeded(_refusal(refused, used, limits, more, nano, now, grown=True))
        self._prompt, self._tokens, self._nano = prompt, self._tokens + more, self._nano + nano

    async def settle(self, reply: llm.Reply, request: Sequence[dict[str, str]], text: str) -> None:
        """The turn ended: charge what the model call cost in place of the reservation."""
        work = self._settlement(reply, request, text)
        if work is not None:
            await work

    def settle_soon(self, reply: llm.Reply, request: Sequence[dict[str, str]], text: str) -> None:
        """`settle` without holding up the turn (called as it ends); a failure is logged, not raised."""
        work = self._settlement(reply, request, text)
        if work is not None:
            _spawn(work)

    def release(self) -> None:
        """The message never reached the model (refused, or its queue was dropped): give everything back."""
        if not self._open:
            return
        self._open = False
        if self.principal is not None:
            _spawn(self._adjust(-1, -self._tokens, -self._nano, settling=False))
        elif self._tally is not None:
            self._tally.unmessage()

    def unusable(self, model: str) -> str | None:
        """Why the principal may not use `model`, a fallback chain's alternate, or None."""
        return unusable(self._limits, model) if self._limits is not None else None

    def _settlement(self, reply: llm.Reply, request: Sequence[dict[str, str]], text: str) -> Coroutine | None:
        if not self._open:
            return None
        self._open = False
        prompt, completion = tokens_used(reply, request, text)
        # At the price of the model that answered (a fallback chain's member may cost more or less).
        price = price_of(reply.model) if reply.model else self._price
        nano = prices.nano_dollars(price, prompt, completion) if price is not None else 0
        if self.principal is None:
            if self._tally is not None:
                self._tally.spent(prompt + completion, nano, time.time())
            return None
        return self._adjust(0, prompt + completion - self._tokens, nano - self._nano, settling=True)

    async def _adjust(self, messages: int, tokens: int, nano: int, *, settling: bool) -> None:
        assert self.principal is not None
        limits = self.principal.limits
        # Spend is judged against 80% as turns are settled (whether they cost more or less than they
        # reserved); a release only gives back.
        watch = settling and limits.in_money
        warn = (_nano(limits.usd_per_day), _nano(limits.usd_per_month)) if watch else (0, 0)
        crossed = await counters().adjust(self._keys, messages, tokens, nano, warn)
        for index, total in crossed:
            _warn(self.principal, index, total, self._keys)


def tokens_used(reply: llm.Reply, request: Sequence[dict[str, str]], text: str) -> tuple[int, int]:
    """(prompt, completion) tokens a model call cost: the model's own counts, else estimates (4 characters a
    token). A request that reached the model costs at least its prompt, cancelled or cut off or failed;
    one refused or unreachable before it was processed costs nothing."""
    reached = reply.sent or reply.headers_received
    if reply.prompt_tokens is None and reply.completion_tokens is None and not text and not reached:
        return 0, 0
    prompt = reply.prompt_tokens
    if prompt is None:
        prompt = _estimate(request)
    completion = reply.completion_tokens
    if completion is None:
        completion = math.ceil(len(text) / 4)
    return prompt, completion


def _estimate(request: Sequence[dict[str, str]]) -> int:
    """A request's prompt in tokens, where the model gives no count: 4 characters a token."""
    return math.ceil(sum(len(m.get("content") or "") for m in request) / 4)


def price_of(model: str) -> tuple[float, float] | None:
    """The model's ($ per million input, output) tokens, or None when it has no price."""
    return prices.parse(settings.R2D2_MODEL_PRICES).get(model)


def chain_price(limits: Limits, model: str) -> tuple[float, float] | None:
    """What a turn on `model` reserves at: the dearest input and output prices among the members of its
    fallback chain the principal may use (any of them may answer), or None when none has a price."""
    found = [p for member in llm.chain(model, functools.partial(unusable, limits)) if (p := price_of(member))]
    return (max(p[0] for p in found), max(p[1] for p in found)) if found else None


# What a principal used -------------------------------------------------------------------


async def usage(principal: Principal, *, now: float | None = None) -> dict[str, Any]:
    """Use so far (the admin shows it against the limits): messages this minute, tokens today, dollars
    today and this month (reservations of turns in progress included)."""
    now = time.time() if now is None else now
    used = await counters().read(_keys(principal, now))
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
    day, month = _next_day(now), _next_month(now)
    resets = {"day_resets_at": _utc(day), "month_resets_at": _utc(month)}
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

    used = await counters().read(_keys(principal, now))
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


class Tally:
    """One socket's own figures, what `chatbot_usage` answers an anonymous connection (made at its first message)."""

    __slots__ = ("minute", "messages", "day", "tokens", "usd_day", "month", "usd_month")

    def __init__(self) -> None:
        self.minute = self.messages = self.day = self.tokens = self.usd_day = self.month = self.usd_month = 0

    def message(self, now: float) -> None:
        minute = int(now // 60)
        if minute != self.minute:
            self.minute, self.messages = minute, 0
        self.messages += 1

    def unmessage(self) -> None:
        self.messages = max(0, self.messages - 1)

    def spent(self, tokens: int, nano: int, now: float) -> None:
        self.figures(now)  # a new day or month starts from 0
        self.tokens += tokens
        self.usd_day += nano
        self.usd_month += nano

    def figures(self, now: float) -> tuple[int, int, int, int]:
        moment = datetime.fromtimestamp(now, UTC)
        day, month = int(f"{moment:%Y%m%d}"), int(f"{moment:%Y%m}")
        if day != self.day:
            self.day, self.tokens, self.usd_day = day, 0, 0
        if month != self.month:
            self.month, self.usd_month = month, 0
        messages = self.messages if self.minute == int(now // 60) else 0
        return messages, self.tokens, self.usd_day, self.usd_month


# Helpers ---------------------------------------------------------------------------------


def _exceeded(message: str) -> ClientError:
    return ClientError(ErrorCode.QUOTA_EXCEEDED, message)


def _unpriced(model: str) -> ClientError:
    return ClientError(
        ErrorCode.MODEL_NOT_ALLOWED,
        f"The model {model!r} has no price here (R2D2_MODEL_PRICES), and this principal's spending is limited "
        "in dollars: choose a priced model.",
    )


def _nano(usd: float) -> int:
    return round(usd * prices.NANO) if usd > 0 else 0


def _limits_of(principal: Principal) -> tuple[int, int, int, int]:
    limits = principal.limits
    return (
        max(0, limits.messages_per_minute),
        max(0, limits.tokens_per_day),
        _nano(limits.usd_per_day),
        _nano(limits.usd_per_month),
    )


def _refusal(
    which: int, used: Sequence[int], limits: Sequence[int], tokens: int, nano: int, now: float, *, grown: bool = False
) -> str:
    """Which limit refused, what was used of it, what the message needed, and when it resets. `grown`: the
    message was admitted, but its prompt grew with the replies before it by `tokens`/`nano`."""
    day = f"resets at 00:00 UTC (in {_duration(_next_day(now) - now)})"
    needs = (
        "its prompt grew by {} with the replies before it"
        if grown
        else "this message needs up to {} (its prompt and reply)"
    )
    if which == MESSAGES:
        return f"Messages per minute: the limit is {limits[MESSAGES]}; resets in {math.ceil(60 - now % 60)} s."
    if which == TOKENS:
        needed = needs.format(f"{tokens} tokens")
        return f"Tokens per day: {used[TOKENS]} of {limits[TOKENS]} used; {needed}; {day}."
    spent, limit = used[which], limits[which]
    period = "day" if which == USD_DAY else "month"
    resets = day if which == USD_DAY else f"resets at 00:00 UTC on {_utc(_next_month(now)):%Y-%m-%d} (a calendar month)"
    return f"Dollars per {period}: {_usd(spent)} of {_usd(limit)} spent; {needs.format(_usd(nano))}; {resets}."


def _usd(nano: int) -> str:
    value = nano / prices.NANO
    return f"${value:.2f}" if round(value, 2) == round(value, 6) else f"${value:.6f}".rstrip("0")


def _warn(principal: Principal, index: int, total: int, keys: tuple[str, ...]) -> None:
    name = _LIMIT_NAMES[index]
    limit = principal.limits.usd_per_day if index == USD_DAY else principal.limits.usd_per_month
    period = keys[index].rsplit(":", 1)[-1]
    logger.warning(
        "spending past 80% of a limit",
        extra={
            "principal": principal.label,
            "limit": name,
            "period": period,
            "spent_usd": prices.dollars(total),
            "limit_usd": limit,
        },
    )
    metrics.SPEND_WARNINGS.labels(name).inc()


def _keys(principal: Principal, now: float) -> tuple[str, ...]:
    """The counters' names for the periods `now` is in (a reservation keeps them: its turn is charged to the
    day it was admitted in), then the two "warned" marks."""
    moment = datetime.fromtimestamp(now, UTC)
    who = principal.quota_key
    day, month = f"{moment:%Y%m%d}", f"{moment:%Y%m}"
    return (
        f"{who}:m:{int(now // 60)}",
        f"{who}:t:{day}",
        f"{who}:d:{day}",
        f"{who}:M:{month}",
        f"{who}:wd:{day}",
        f"{who}:wM:{month}",
    )


def _next_day(now: float) -> float:
    today = datetime.fromtimestamp(now, UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return (today + timedelta(days=1)).timestamp()


def _next_month(now: float) -> float:
    first = datetime.fromtimestamp(now, UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    return (first + timedelta(days=32)).replace(day=1).timestamp()


def _utc(timestamp: float) -> datetime:
    return datetime.fromtimestamp(timestamp, UTC)


def _duration(seconds: float) -> str:
    minutes = math.ceil(seconds / 60)
    return f"{minutes // 60} h {minutes % 60} min" if minutes >= 60 else f"{minutes} min"


_background = Background("settling a quota reservation")
_spawn = _background.spawn


async def settled() -> None:
    """Wait for the settlements and releases under way (tests; a process stopping)."""
    await _background.wait()


# Where the counters live -----------------------------------------------------------------

#: (index of the counter past 80% of its money limit, its total) for each limit crossed now.
Crossed = list[tuple[int, int]]


class Counters(Protocol):
    async def admit(
        self, keys: tuple[str, ...], limits: Sequence[int], messages: int, tokens: int, nano: int
    ) -> tuple[int | None, list[int]]:
        """Add `messages`, `tokens` and `nano` unless one would pass its limit (0: none); returns (the
        index of the counter that refused, or None; the four counters before)."""

    async def adjust(
        self, keys: tuple[str, ...], messages: int, tokens: int, nano: int, warn: tuple[int, int]
    ) -> Crossed:
        """Add (or give back) amounts; the money counters that now passed 80% of `warn` (nano-dollars per
        day, per month; 0: none) for the first time in their period."""

    async def read(self, keys: tuple[str, ...]) -> list[int]: ...


_TTLS = (MINUTE_TTL, DAY_TTL, DAY_TTL, MONTH_TTL)


class MemoryCounters:
    """One process's counters: enough when there is one process (no REDIS_URL)."""

    def __init__(self) -> None:
        self._values: dict[str, tuple[int, float]] = {}
        self._lock = threading.Lock()  # event loops of other threads (tests, the admin) share them

    async def admit(
        self, keys: tuple[str, ...], limits: Sequence[int], messages: int, tokens: int, nano: int
    ) -> tuple[int | None, list[int]]:
        need = (messages, tokens, nano, nano)
        with self._lock:
            used = [self._get(key) for key in keys[:4]]
            for index in range(4):
                if limits[index] > 0 and used[index] + need[index] > limits[index]:
                    return index, used
            for index in range(4):
                if need[index]:
                    self._add(keys[index], need[index], _TTLS[index])
        return None, used

    async def adjust(
        self, keys: tuple[str, ...], messages: int, tokens: int, nano: int, warn: tuple[int, int]
    ) -> Crossed:
        crossed: Crossed = []
        with self._lock:
            totals = [self._add(keys[index], delta, _TTLS[index]) for index, delta in enumerate((messages, tokens))]
            totals += [self._add(keys[index], nano, _TTLS[index]) for index in (USD_DAY, USD_MONTH)]
            for index, limit, mark in ((USD_DAY, warn[0], keys[4]), (USD_MONTH, warn[1], keys[5])):
                if limit > 0 and totals[index] * 5 >= limit * 4 and not self._get(mark):
                    self._add(mark, 1, _TTLS[index])
                    crossed.append((index, totals[index]))
        return crossed

    async def read(self, keys: tuple[str, ...]) -> list[int]:
        with self._lock:
            return [self._get(key) for key in keys[:4]]

    def _get(self, key: str) -> int:
        value, expires = self._values.get(key, (0, 0.0))
        return value if expires > time.time() else 0

    def _add(self, key: str, amount: int, ttl: int) -> int:
        now = time.time()
        value, expires = self._values.get(key, (0, 0.0))
        if expires <= now:
            if not amount:
                return 0
            value, expires = 0, now + ttl
            self._forget_expired(now)
        value = max(0, value + amount)
        self._values[key] = (value, expires)
        return value

    def _forget_expired(self, now: float) -> None:
        if len(self._values) > 10_000:
            self._values = {k: v for k, v in self._values.items() if v[1] > now}


# Admission: check every limit against what is used, then add the message and its reservation, or
# nothing. KEYS: the four counters. ARGV: their four limits (0: none), the messages (1, or 0 for a
# reservation grown at its turn), tokens and nano-dollars to add, then the TTLs of a minute's, a
# day's and a month's counter.
_ADMIT = """
local used = redis.call('MGET', KEYS[1], KEYS[2], KEYS[3], KEYS[4])
local need = {tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[7])}
local ttl = {ARGV[8], ARGV[9], ARGV[9], ARGV[10]}
for i = 1, 4 do used[i] = tonumber(used[i] or '0') end
for i = 1, 4 do
  local limit = tonumber(ARGV[i])
  if limit > 0 and used[i] + need[i] > limit then
    return {i, used[1], used[2], used[3], used[4]}
  end
end
for i = 1, 4 do
  if need[i] ~= 0 then
    redis.call('INCRBY', KEYS[i], need[i])
    if redis.call('TTL', KEYS[i]) < 0 then redis.call('EXPIRE', KEYS[i], ttl[i]) end
  end
end
return {0, used[1], used[2], used[3], used[4]}
"""
# Settlement or release: add the differences (never below 0); mark and report a money counter
# that passed 80% of its limit, once a period. KEYS: the four counters, the two marks. ARGV: the
# message, token and nano-dollar differences, the day's and month's limits to warn at (0: none),
# then the three TTLs.
_ADJUST = """
local delta = {tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[3])}
local ttl = {ARGV[6], ARGV[7], ARGV[7], ARGV[8]}
local limits = {tonumber(ARGV[4]), tonumber(ARGV[5])}
local total = {0, 0, 0, 0}
for i = 1, 4 do
  if delta[i] ~= 0 then
    local n = redis.call('INCRBY', KEYS[i], delta[i])
    if n < 0 then
      redis.call('SET', KEYS[i], 0, 'KEEPTTL')
      n = 0
    end
    if redis.call('TTL', KEYS[i]) < 0 then redis.call('EXPIRE', KEYS[i], ttl[i]) end
    total[i] = n
  elseif i > 2 and limits[i - 2] > 0 then
    total[i] = tonumber(redis.call('GET', KEYS[i]) or '0')
  end
end
local crossed = {}
for j = 1, 2 do
  local i = j + 2
  if limits[j] > 0 and total[i] * 5 >= limits[j] * 4 and redis.call('SET', KEYS[4 + j], 1, 'NX', 'EX', ttl[i]) then
    table.insert(crossed, i - 1)
    table.insert(crossed, total[i])
  end
end
return crossed
"""


class RedisCounters:
    """Counters shared by every process on one Redis (redis.asyncio; one client per event loop)."""

    def __init__(self, url: str, prefix: str) -> None:
        self.url = url
        self.prefix = prefix
        self._clients: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def _redis(self):
        import redis.asyncio as redis

        loop = asyncio.get_running_loop()
        found = self._clients.get(loop)
        if found is None:
            pool = redis.BlockingConnectionPool.from_url(self.url, max_connections=50, timeout=20, socket_timeout=5)
            client = redis.Redis(connection_pool=pool)
            found = self._clients[loop] = (client, client.register_script(_ADMIT), client.register_script(_ADJUST))
        return found

    def _names(self, keys: Sequence[str]) -> list[str]:
        return [f"{self.prefix}:quota:{key}" for key in keys]

    async def admit(
        self, keys: tuple[str, ...], limits: Sequence[int], messages: int, tokens: int, nano: int
    ) -> tuple[int | None, list[int]]:
        _, admit, _ = self._redis()
        args = [*limits, messages, tokens, nano, *_TTLS[:2], MONTH_TTL]
        which, *used = await admit(keys=self._names(keys[:4]), args=args)
        return (int(which) - 1 if which else None), [int(n) for n in used]

    async def adjust(
        self, keys: tuple[str, ...], messages: int, tokens: int, nano: int, warn: tuple[int, int]
    ) -> Crossed:
        _, _, adjust = self._redis()
        found = await adjust(keys=self._names(keys), args=[messages, tokens, nano, *warn, *_TTLS[:2], MONTH_TTL])
        return [(int(found[n]), int(found[n + 1])) for n in range(0, len(found), 2)]

    async def read(self, keys: tuple[str, ...]) -> list[int]:
        client, _, _ = self._redis()
        return [int(n or 0) for n in await client.mget(self._names(keys[:4]))]


_counters: Counters | None = None


def counters() -> Counters:
    global _counters
    if _counters is None:
        if settings.REDIS_URL:
            # Principal ids are those of one database: deployments (or test runs) sharing a Redis
            # with different databases must not share counters.
            database = hashlib.sha256(str(settings.DATABASES["default"]["NAME"]).encode()).hexdigest()[:12]
            prefix = settings.CHANNEL_LAYERS["default"]["CONFIG"].get("prefix", "r2d2")
            _counters = RedisCounters(settings.REDIS_URL, f"{prefix}:{database}")
        else:
            _counters = MemoryCounters()
    return _counters


def reset_counters() -> None:
    """Forget the counters (tests change settings between runs)."""
    global _counters
    _counters = None
