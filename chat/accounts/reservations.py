"""Admission and reservations: a message is admitted only when its principal's remaining budget covers its turn.

The **reservation** is the prompt as estimated (characters / 4) plus the reply it may get (the
key's output cap, --max-output-tokens, which the model is sent; else
R2D2_QUOTA_RESERVE_OUTPUT_TOKENS), in tokens and, at R2D2_MODEL_PRICES, in dollars. Taking it is
one atomic step (chat/accounts/counters.py), so a burst of posts across sockets and processes can
spend at most the limit (plus, for replies without a cap, what replies exceed their reservation).
It travels with the message; when the turn ends it is **settled** with what the model reported
(prompt + completion; an estimate where it reported nothing), or **released** when the message
never reached the model. A refusal names the limit, what was used of it and when it resets.

A queued message's reservation is also **kept** in the shared counters (Redis), under the fence of the
session's holder: a process killed with messages queued leaves them there, and the process that takes the
session over **adopts** them under its own fence (one Lua script), answers the messages and settles each
with what the model reported. Settling or releasing a kept reservation is conditioned on that fence, in the
same script as the counters' change: of the killed holder (if it was only judged dead), a drain's release
and the new holder, exactly one settles it. The turn a killed process was answering keeps its reservation
as its charge: the model's own count died with the process.

On Redis, each of these steps is tried again on a connection error (a reset, a restart) within
R2D2_STORAGE_RETRY_SECONDS and takes effect once however often it was sent (chat/accounts/counters.py): a
Redis blip delays a post or a settlement, never refuses or double-counts it. A Redis that lost the counters
(restarted empty, failed over) has them rebuilt from the database before it admits again
(chat/accounts/seeding.py); a reservation it lost is settled with what its turn cost in all.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import time
import uuid
from collections.abc import Coroutine, Sequence
from typing import TYPE_CHECKING

from django.conf import settings

from chat import llm
from chat.accounts import seeding
from chat.accounts.counters import (
    MESSAGES,
    NO_EPOCHS,
    TOKENS,
    USD_DAY,
    Epochs,
    Kept,
    Tally,
    counter_keys,
    counters,
    limits_of,
    next_day,
    next_month,
    usd_to_nano,
    utc,
)
from chat.ops import metrics, prices, storage
from chat.ops.tasks import Background
from chat.protocol import PostMessage
from chat.protocol.errors import ClientError, ErrorCode

if TYPE_CHECKING:
    from chat.accounts.principals import Limits, Principal

logger = logging.getLogger(__name__)

_LIMIT_NAMES = ("messages_per_minute", "tokens_per_day", "usd_per_day", "usd_per_month")


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
        raise unpriced(model)
    output = cap if cap is not None else max(0, settings.R2D2_QUOTA_RESERVE_OUTPUT_TOKENS)
    tokens = prompt_tokens_estimate + output
    nano = prices.nano_dollars(price, prompt_tokens_estimate, output) if price is not None else 0
    keys = counter_keys(principal, now)
    refused, used, epochs = await seeding.admit(principal, now, keys, limits_of(principal), 1, tokens, nano)
    if refused is not None:
        raise exceeded(_refusal(refused, used, limits_of(principal), tokens, nano, now))
    return Reservation(
        principal,
        model,
        cap,
        price,
        keys=keys,
        prompt=prompt_tokens_estimate,
        tokens=tokens,
        nano=nano,
        limits=limits,
        epochs=epochs,
        at=now,
    )


def charge_only(principal: Principal, model: str) -> Reservation | None:
    """A turn admitted earlier, elsewhere (a message a process that died or drained had queued): charged
    what it costs when it ends, without admitting it again. None for an anonymous principal."""
    if principal.is_anonymous:
        return None
    cap = principal.limits.max_output_tokens or None
    price = chain_price(principal.limits, model)
    return Reservation(principal, model, cap, price, keys=counter_keys(principal, time.time()), limits=principal.limits)


async def adopt(
    principal: Principal, model: str, session_id: uuid.UUID, fence: int, row_ids: Sequence[int]
) -> dict[int, Reservation]:
    """The reservations an earlier holder kept for those queued messages (it died, drained or was fenced), now
    this holder's (`fence`): each settled here, once. A message without one (its holder released it, or kept
    none) is charged by `charge_only`."""
    if principal.is_anonymous or not row_ids:
        return {}
    try:
        records = await counters().adopt(str(session_id), fence, row_ids)
    except Exception as exc:  # Redis blinked: those turns are charged in full (their reservations stay held)
        logger.warning("reservations not adopted", extra={"session_id": str(session_id), "error": type(exc).__name__})
        return {}
    adopted = {}
    for row_id, text in records.items():
        record = json.loads(text)
        adopted[row_id] = Reservation(
            principal,
            model,
            principal.limits.max_output_tokens or None,
            chain_price(principal.limits, model),
            keys=tuple(record["keys"]),
            prompt=record["prompt"],
            tokens=record["tokens"],
            nano=record["nano"],
            limits=principal.limits,
            epochs=_epochs(record),
            at=record.get("at"),
        )
        adopted[row_id]._kept = (str(session_id), row_id, fence)
    return adopted


#: Above any session's fence: records adopted under it are settled by nobody but `release_left`.
_SWEPT = 2**62


async def release_left(session_ids: Sequence[uuid.UUID]) -> int:
    """Sessions ended without a holder (their process died, or nobody resumed them in time): the reservations
    of their queued messages, never to be answered, are given back, once. Returns how many."""
    released = 0
    for session_id in session_ids:
        for row_id, text in (await counters().adopt(str(session_id), _SWEPT, None)).items():
            record = json.loads(text)
            kept, epochs = (str(session_id), row_id, _SWEPT), _epochs(record)
            await counters().adjust(
                tuple(record["keys"]), -1, -record["tokens"], -record["nano"], (0, 0), kept, epochs=epochs
            )
            released += 1
    return released


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
        "_kept",
        "_epochs",
        "_at",
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
        epochs: Epochs = NO_EPOCHS,
        at: float | None = None,
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
        self._kept: Kept | None = None  # recorded in the shared counters: settled under that fence only
        self._epochs = epochs  # of the counters it is held in: other epochs lost it (chat/accounts/seeding.py)
        self._at = time.time() if at is None else at  # when it was admitted: its counters' periods

    @property
    def reserved(self) -> tuple[int, int]:
        """(tokens, nano-dollars) held while open."""
        return (self._tokens, self._nano) if self._open else (0, 0)

    async def keep(self, session_id: uuid.UUID, fence: int, row_id: int) -> None:
        """The message is queued (saved, its turn not started): record the reservation where the process that
        takes the session over finds it, should this one die first."""
        if self.principal is None or not self._open or self._kept is not None:
            return
        kept = (str(session_id), row_id, fence)
        record = json.dumps(
            {
                "keys": self._keys,
                "prompt": self._prompt,
                "tokens": self._tokens,
                "nano": self._nano,
                "epochs": self._epochs,
                "at": self._at,
            }
        )
        try:
            if await counters().keep(kept, record):
                self._kept = kept
        except Exception as exc:  # settled all the same, as any other; only a take-over would charge it twice
            logger.info("reservation not kept", extra={"session_id": str(session_id), "error": type(exc).__name__})

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
        limits = limits_of(self.principal)
        refused, used, epochs = await seeding.admit(self.principal, self._at, self._keys, limits, 0, more, nano)
        if refused is not None:
            raise exceeded(_refusal(refused, used, limits, more, nano, now, grown=True))
        if epochs != self._epochs:  # the counters were lost since admission, and rebuilt: they hold only `more`
            self._tokens, self._nano, self._epochs = 0, 0, epochs
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
            _spawn(self._adjust(-1, -self._tokens, -self._nano, (0, 0), settling=False))
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
        tokens = prompt + completion
        return self._adjust(0, tokens - self._tokens, nano - self._nano, (tokens, nano), settling=True)

    async def _adjust(self, messages: int, tokens: int, nano: int, full: tuple[int, int], *, settling: bool) -> None:
        """Add the differences to the counters the reservation is held in; `full`: what the turn cost in all,
        added instead to counters rebuilt since they lost the reservation."""
        assert self.principal is not None
        limits = self.principal.limits
        # Spend is judged against 80% as turns are settled (whether they cost more or less than they
        # reserved); a release only gives back.
        watch = settling and limits.in_money
        warn = (usd_to_nano(limits.usd_per_day), usd_to_nano(limits.usd_per_month)) if watch else (0, 0)
        try:
            crossed = await counters().adjust(
                self._keys, messages, tokens, nano, warn, self._kept, epochs=self._epochs, full=full
            )
        except storage.Unavailable:
            # Redis did not answer within R2D2_STORAGE_RETRY_SECONDS (its outage is logged once, by
            # chat/ops/storage.py): the reservation stays charged as reserved until its counters' period ends.
            logger.info("quota reservation not settled", extra={"principal": self.principal.label})
            return
        for index, total in crossed:
            _warn(self.principal, index, total, self._keys)


def _epochs(record: dict) -> Epochs:
    """A kept record's epochs (none in one a version before them kept: its differences are added as they were)."""
    found = record.get("epochs")
    return (str(found[0]), str(found[1])) if found else NO_EPOCHS


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


def unusable(limits: Limits, model: str) -> str | None:
    """Why a principal with `limits` may not use `model` (a fallback chain skips it for them), or None."""
    if limits.models and model not in limits.models:
        return "not in the key's models"
    if limits.in_money and price_of(model) is None:
        return "unpriced, under a money limit"
    return None


def chain_price(limits: Limits, model: str) -> tuple[float, float] | None:
    """What a turn on `model` reserves at: the dearest input and output prices among the members of its
    fallback chain the principal may use (any of them may answer), or None when none has a price."""
    found = [p for member in llm.chain(model, functools.partial(unusable, limits)) if (p := price_of(member))]
    return (max(p[0] for p in found), max(p[1] for p in found)) if found else None


# Refusals -------------------------------------------------------------------------------------


def exceeded(message: str) -> ClientError:
    return ClientError(ErrorCode.QUOTA_EXCEEDED, message)


def unpriced(model: str) -> ClientError:
    return ClientError(
        ErrorCode.MODEL_NOT_ALLOWED,
        f"The model {model!r} has no price here (R2D2_MODEL_PRICES), and this principal's spending is limited "
        "in dollars: choose a priced model.",
    )


def _refusal(
    which: int, used: Sequence[int], limits: Sequence[int], tokens: int, nano: int, now: float, *, grown: bool = False
) -> str:
    """Which limit refused, what was used of it, what the message needed, and when it resets. `grown`: the
    message was admitted, but its prompt grew with the replies before it by `tokens`/`nano`."""
    day = f"resets at 00:00 UTC (in {_duration(next_day(now) - now)})"
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
    resets = day if which == USD_DAY else f"resets at 00:00 UTC on {utc(next_month(now)):%Y-%m-%d} (a calendar month)"
    return f"Dollars per {period}: {_usd(spent)} of {_usd(limit)} spent; {needs.format(_usd(nano))}; {resets}."


def _usd(nano: int) -> str:
    value = nano / prices.NANO
    return f"${value:.2f}" if round(value, 2) == round(value, 6) else f"${value:.6f}".rstrip("0")


def _duration(seconds: float) -> str:
    minutes = math.ceil(seconds / 60)
    return f"{minutes // 60} h {minutes % 60} min" if minutes >= 60 else f"{minutes} min"


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


_background = Background("settling a quota reservation")


_spawn = _background.spawn


async def settled() -> None:
    """Wait for the settlements and releases under way (tests; a process stopping)."""
    await _background.wait()
