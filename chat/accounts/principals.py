"""Who spends the model budget, and within which limits: one home for `Principal` and its `Limits`.

A principal is a signed-in Django user, an API key (maybe owned by a user), or nobody
(when auth is off). Its limits are the key's own where it has them (a signed-in person's
own money limits: UserLimits, set in the admin), the R2D2_QUOTA_* settings elsewhere;
chat/accounts/quotas.py enforces them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from decimal import Decimal

from django.conf import settings
from django.db.models import Q

from chat.models import ApiKey, ChatSession, UserLimits


@dataclass(frozen=True, slots=True)
class Limits:
    """A principal's limits; 0 means no limit, an empty `models` any model.

    Money limits are in dollars (at R2D2_MODEL_PRICES); `max_output_tokens` is sent to
    the model as each request's output limit (a key's only)."""

    messages_per_minute: int
    tokens_per_day: int
    max_sessions: int
    models: tuple[str, ...] = ()
    usd_per_day: float = 0.0
    usd_per_month: float = 0.0
    max_output_tokens: int = 0

    @property
    def in_money(self) -> bool:
        """A money limit: then only priced models may be used."""
        return self.usd_per_day > 0 or self.usd_per_month > 0


def default_limits() -> Limits:
    return Limits(
        messages_per_minute=settings.R2D2_QUOTA_MESSAGES_PER_MINUTE,
        tokens_per_day=settings.R2D2_QUOTA_TOKENS_PER_DAY,
        max_sessions=settings.R2D2_QUOTA_MAX_SESSIONS,
        models=tuple(settings.R2D2_QUOTA_MODELS),
        usd_per_day=settings.R2D2_QUOTA_USD_PER_DAY,
        usd_per_month=settings.R2D2_QUOTA_USD_PER_MONTH,
    )


def limits_for_key(api_key: ApiKey) -> Limits:
    """The key's own limits where it has them, the settings' elsewhere."""
    default = default_limits()
    return Limits(
        messages_per_minute=_own(api_key.messages_per_minute, default.messages_per_minute),
        tokens_per_day=_own(api_key.tokens_per_day, default.tokens_per_day),
        max_sessions=_own(api_key.max_sessions, default.max_sessions),
        models=tuple(api_key.model_list) or default.models,
        usd_per_day=_own_usd(api_key.usd_per_day, default.usd_per_day),
        usd_per_month=_own_usd(api_key.usd_per_month, default.usd_per_month),
        max_output_tokens=api_key.max_output_tokens or 0,
    )


def limits_for_user(own: UserLimits | None) -> Limits:
    """A signed-in person's limits: their own money limits (the admin's "spending limits"), else the settings'."""
    default = default_limits()
    if own is None:
        return default
    return replace(
        default,
        usd_per_day=_own_usd(own.usd_per_day, default.usd_per_day),
        usd_per_month=_own_usd(own.usd_per_month, default.usd_per_month),
    )


def _own(value: int | None, default: int) -> int:
    return default if value is None else value


def _own_usd(value: Decimal | None, default: float) -> float:
    return default if value is None else float(value)



@dataclass(frozen=True, slots=True)
class Principal:
    """Who spends the budget: a user (`user_id`), an API key (`api_key_id`, maybe owned by a user), or nobody."""

    user_id: int | None = None
    api_key_id: int | None = None
    label: str = "anonymous"  # a username or key name: safe to log and show
    limits: Limits = field(default_factory=default_limits)

    @property
    def is_anonymous(self) -> bool:
        return self.user_id is None and self.api_key_id is None

    @property
    def quota_key(self) -> str:
        """The name its quota counters are kept under."""
        return f"key:{self.api_key_id}" if self.api_key_id is not None else f"user:{self.user_id}"

    def own_sessions(self) -> Q:
        """The sessions this principal started itself (what its concurrent-session quota counts)."""
        if self.api_key_id is not None:
            return Q(api_key_id=self.api_key_id)
        return Q(user_id=self.user_id, api_key__isnull=True)

    def owns(self, session: ChatSession) -> bool:
        """A key owns what it started; a person owns what they started and what their keys started."""
        if self.is_anonymous:
            return False
        if self.api_key_id is not None:
            return session.api_key_id == self.api_key_id
        return session.user_id == self.user_id


ANONYMOUS = Principal()


# A principal's limit of live sessions (issue 20): chat/sessions/lifecycle.py holds it exactly at start.


@dataclass(frozen=True, slots=True)
class SessionLimit:
    """At most `limit` live sessions matching `live` (one principal's); `refusal(live)` is raised past it."""

    key: str  # names the lock: the principal's quota key
    live: Q
    limit: int
    refusal: Callable[[int], Exception]

    @property
    def lock_id(self) -> int:
        """A 64-bit advisory lock id for this principal (a collision only makes two principals wait on each other)."""
        return int.from_bytes(hashlib.sha256(f"r2d2-sessions:{self.key}".encode()).digest()[:8], "big", signed=True)
