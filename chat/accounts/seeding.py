"""A principal's quota counters rebuilt from the database, where Redis lost them: the database is the record,
Redis a cache of it, and losing the cache may cost speed, never a budget.

Redis that restarts with nothing kept (as the soak and many deployments run it), or a failover to a replica
that had not caught up, forgets the counters: a key with a $5 daily budget that had spent $4.99 could spend
another $5 at once. So the counters of a principal's day and month carry a **seed marker** in Redis (see
chat/accounts/scripts.py), set only with the counters rebuilt from the database. The admission script, and the
usage read, find the markers in the same round trip as the counters: seeded, nothing more is done. A missing
marker (`Unseeded`) has the period's figures read from the database (through chat/ops/storage.py's retry):
the replies' tokens (prompt + completion as the model reported them; characters / 4 for a completion it did
not count) and their cost at R2D2_MODEL_PRICES (chat/ops/prices.py's one cost function) for the UTC day and
the calendar month, and the messages posted in the current minute. One script raises the counters to those
figures and sets the marker, only if it is still missing, so two processes rebuilding at once count once;
then the admission is made again.

The first admission of each day and month seeds its period (nothing spent yet: one cheap query), as does the
first admission of each principal after this was deployed: a Redis that kept its counters keeps them (they
are raised to the database's figures, never lowered). In the memory backend (no REDIS_URL) counters are never
unseeded: they and the reservations in them end with the process.

What the database does not hold is not rebuilt: the reservations of turns in progress when Redis was lost
(their settlement adds what each turn cost, chat/accounts/scripts.py's ADJUST, once the counters are rebuilt),
a turn charged that saved no reply (cut off before its first word), a prompt the model did not count, and
the minute's regenerations. Anonymous principals have no counters.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import TYPE_CHECKING

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db.models import Case, F, IntegerField, Q, Sum, When
from django.db.models.functions import Length

from chat.accounts.counters import Epochs, Unseeded, counter_keys, counters, next_day, next_month, utc
from chat.models import ChatMessage, Role
from chat.ops import prices, storage

if TYPE_CHECKING:
    from chat.accounts.principals import Principal


async def admit(
    principal: Principal, at: float, keys: tuple[str, ...], limits: Sequence[int], messages: int, tokens: int, nano: int
) -> tuple[int | None, list[int], Epochs]:
    """`counters().admit`, the counters of `keys` (the periods of `at`) rebuilt first where Redis lost them."""
    try:
        return await counters().admit(keys, limits, messages, tokens, nano)
    except Unseeded as unseeded:
        await seed(principal, at, keys, unseeded)
    # Seeded now (by this process or another). Should Redis lose them again this very moment, the admission is
    # made in the new, empty counters all the same: the next one rebuilds them (raised, never lowered).
    return await counters().admit(keys, limits, messages, tokens, nano, force=True)


async def read(principal: Principal, now: float) -> list[int]:
    """The principal's four counters for the periods of `now`, rebuilt first where Redis lost them."""
    keys = counter_keys(principal, now)
    try:
        return await counters().read(keys)
    except Unseeded as unseeded:
        await seed(principal, now, keys, unseeded)
    return await counters().read(keys, force=True)


async def seed(principal: Principal, at: float, keys: tuple[str, ...], unseeded: Unseeded) -> None:
    figures = await storage.retry(lambda: recorded(principal, at, day=unseeded.day, month=unseeded.month))
    await counters().seed(keys, figures, day=unseeded.day, month=unseeded.month)


@sync_to_async
def recorded(principal: Principal, at: float, *, day: bool, month: bool) -> tuple[int, int, int, int]:
    """What the database records of the principal for the periods of `at` (UTC, as `counter_keys` names them):
    messages posted in its minute, tokens and nano-dollars of its day (with `day`), nano-dollars of its month
    (with `month`); 0 for a period not asked for."""
    moment = utc(at)
    mine = own_messages(principal)
    messages = tokens = nano_day = nano_month = 0
    if day:
        minute = moment.replace(second=0, microsecond=0)
        posted = ChatMessage.objects.filter(mine, role=Role.USER, created_at__gte=minute)
        messages = posted.filter(created_at__lt=minute + timedelta(minutes=1)).count()
        start = moment.replace(hour=0, minute=0, second=0, microsecond=0)
        tokens, nano_day = spent(mine, start, utc(next_day(at)))
    if month:
        start = moment.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        nano_month = spent(mine, start, utc(next_month(at)))[1]
    return messages, tokens, nano_day, nano_month


def own_messages(principal: Principal) -> Q:
    """The messages of the sessions whose spending `principal.quota_key` counts (a key's; a person's own,
    without a key), as `Principal.own_sessions` names them."""
    if principal.api_key_id is not None:
        return Q(session__api_key_id=principal.api_key_id)
    return Q(session__user_id=principal.user_id, session__api_key__isnull=True)


def spent(mine: Q, start, end) -> tuple[int, int]:
    """(tokens, nano-dollars) of the replies saved in [start, end): one query, grouped by the model that answered."""
    counted = Case(
        When(completion_tokens__isnull=True, then=(Length("content") + 3) / 4),  # characters / 4, rounded up
        default=F("completion_tokens"),
        output_field=IntegerField(),
    )
    rows = (
        ChatMessage.objects.filter(mine, role=Role.ASSISTANT, created_at__gte=start, created_at__lt=end)
        .values("model")
        .annotate(prompt=Sum("prompt_tokens"), completion=Sum(counted))
        .order_by()
    )
    priced = prices.parse(settings.R2D2_MODEL_PRICES)
    tokens = nano = 0
    for row in rows:
        prompt, completion = row["prompt"] or 0, row["completion"] or 0
        tokens += prompt + completion
        price = priced.get(row["model"])
        if price is not None:
            # A turn is charged its own cost, rounded up to a nano-dollar: the sum's may be lower by under one a turn.
            nano += prices.nano_dollars(price, prompt, completion)
    return tokens, nano
