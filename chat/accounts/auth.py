"""Who a connection acts for: a signed-in Django user, an API key, or nobody (when auth is off).

The web page authenticates with Django's session cookie (Channels'
AuthMiddlewareStack fills `scope["user"]`); programmatic clients send
`Authorization: Bearer <key>` in the WebSocket handshake. A key is stored only as
its SHA-256 (the database never holds it in a usable form) plus a short visible
prefix to find it by; candidates are compared in constant time. Keys are random
32-byte secrets, so a plain hash is enough: there is nothing to brute-force.

Revoking a key tells every socket using it, in every process, over the channel
layer group `apikey.<id>`; the consumer re-checks its key before spending when its
last check is older than R2D2_AUTH_RECHECK_SECONDS, for what the group cannot reach.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from decimal import Decimal

from asgiref.sync import async_to_sync, sync_to_async
from channels.layers import get_channel_layer
from django.contrib.auth import get_user_model
from django.db.models import Q
from django.dispatch import Signal
from django.utils import timezone

from chat.accounts.principals import ANONYMOUS, Principal, limits_for_key, limits_for_user
from chat.models import ApiKey, ChatSession, UserLimits
from chat.ops import storage

logger = logging.getLogger(__name__)

#: Every key starts with this, so a leaked one is recognisable (secret scanners, logs).
KEY_START = "r2d2_"
#: How much of a key is stored and shown in clear: enough to tell keys apart, useless to authenticate.
PREFIX_CHARS = 12
UNAUTHORIZED_CLOSE_CODE = 4401




class Unauthorized(Exception):
    """The handshake named no valid principal; `str()` is safe to send to the client."""


# Keys -----------------------------------------------------------------------------


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_api_key(
    name: str,
    *,
    user=None,
    messages_per_minute: int | None = None,
    tokens_per_day: int | None = None,
    max_sessions: int | None = None,
    models: list[str] | None = None,
    usd_per_day: Decimal | None = None,
    usd_per_month: Decimal | None = None,
    max_output_tokens: int | None = None,
) -> tuple[ApiKey, str]:
    """Make a key; returns the row and the key itself, which exists nowhere else: show it once."""
    key = KEY_START + secrets.token_urlsafe(32)
    row = ApiKey.objects.create(
        name=name,
        user=user,
        prefix=key[:PREFIX_CHARS],
        key_hash=hash_key(key),
        messages_per_minute=messages_per_minute,
        tokens_per_day=tokens_per_day,
        max_sessions=max_sessions,
        allowed_models=",".join(models or []),
        usd_per_day=usd_per_day,
        usd_per_month=usd_per_month,
        max_output_tokens=max_output_tokens,
    )
    return row, key


def find_key(key: str) -> ApiKey | None:
    """The key's row (revoked or not), or None. Looked up by prefix, compared by hash in constant time."""
    if not key.startswith(KEY_START) or len(key) > 200:
        return None
    digest = hash_key(key)
    for candidate in ApiKey.objects.filter(prefix=key[:PREFIX_CHARS]).select_related("user"):
        if hmac.compare_digest(candidate.key_hash, digest):
            return candidate
    return None


def key_group(api_key_id: int) -> str:
    """The channel-layer group of every socket using one key, in every process."""
    return f"apikey.{api_key_id}"


def login_group(session_key: str) -> str:
    """The group of every socket opened with one browser sign-in (a Django session), in every process."""
    return "login." + hashlib.sha256(session_key.encode()).hexdigest()[:32]


def user_group(user_id: int) -> str:
    """The group of every socket a user's sign-ins opened."""
    return f"user.{user_id}"


def revocation_groups(principal: Principal, scope: dict) -> list[str]:
    """The groups through which this connection's principal can be withdrawn: its key's, or its
    sign-in's and its user's (signing out, or the account being deactivated, closes its sockets)."""
    if principal.api_key_id is not None:
        return [key_group(principal.api_key_id)]
    if principal.user_id is None:
        return []
    session = scope.get("session")
    session_key = getattr(session, "session_key", None)
    return [user_group(principal.user_id), *([login_group(session_key)] if session_key else [])]


def withdraw(group: str, message: str, *, revoked: bool = False) -> None:
    """Close every socket in `group`, in every process: an `unauthorized` frame, then 4401. `revoked`: the
    principal may spend no more (a key revoked, an account deactivated): its sessions end as `revoked`
    instead of being let go as when a socket closes."""
    event = {"type": "principal.revoked", "message": message, "revoked": revoked}
    async_to_sync(get_channel_layer().group_send)(group, event)


def signed_out(sender, request, user, **kwargs) -> None:
    """`user_logged_out`: the sockets this sign-in opened stop acting for that user."""
    session_key = getattr(getattr(request, "session", None), "session_key", None)
    if session_key:
        withdraw(login_group(session_key), "You signed out.")


def account_saving(sender, instance, **kwargs) -> None:
    """`pre_save` of a user: remember the password hash it had, to see whether it changes."""
    if instance.pk is not None:
        instance._r2d2_password_before = (
            type(instance).objects.filter(pk=instance.pk).values_list("password", flat=True).first()
        )


def account_saved(sender, instance, created: bool = False, **kwargs) -> None:
    """A user deactivated (the admin's "active" box): their open sockets are closed and all their
    sessions end. Their password changed: their signed-in sockets are closed, as signing out does."""
    if not instance.is_active:
        withdraw(user_group(instance.pk), "That account is no longer active.", revoked=True)
        # Its keys stop too (authenticate() and still_valid() refuse a key whose user is inactive).
        for key_id in ApiKey.objects.filter(user_id=instance.pk).values_list("id", flat=True):
            withdraw(key_group(key_id), "That account is no longer active.", revoked=True)
        end_sessions(Q(user_id=instance.pk))
    elif not created and getattr(instance, "_r2d2_password_before", instance.password) != instance.password:
        withdraw(user_group(instance.pk), "Your password was changed; sign in again.")


def revoke(api_key: ApiKey) -> bool:
    """Revoke a key and close its live sockets wherever they are; False if it was already revoked."""
    revoked = ApiKey.objects.filter(id=api_key.id, revoked_at__isnull=True).update(revoked_at=timezone.now())
    api_key.refresh_from_db(fields=["revoked_at"])
    # Sent even when already revoked: a socket that missed the first event is closed now.
    withdraw(key_group(api_key.id), "That API key has been revoked.", revoked=True)
    end_sessions(Q(api_key_id=api_key.id))
    if revoked:
        logger.warning("api key revoked", extra={"api_key": api_key.name, "prefix": api_key.prefix})
    return bool(revoked)


#: Sent with `session_ids` (live sessions of a principal just withdrawn): chat/sessions/lifecycle.py ends them
#: (connected in chat/apps.py). A signal, so accounts announces and sessions acts without accounts importing it.
sessions_withdrawn = Signal()


def end_sessions(whose: Q) -> int:
    """End every live session of a withdrawn principal, detached or not, wherever it is held: its turn's
    model request is closed and its queued messages are not answered (reason `revoked`)."""
    session_ids = list(ChatSession.objects.live().filter(whose).values_list("id", flat=True))
    if session_ids:
        sessions_withdrawn.send(sender=Principal, session_ids=session_ids)
    return len(session_ids)


def principal_of_session(session: ChatSession) -> Principal:
    """The principal a session was started for, with its limits today (a session taken over is charged to it)."""
    if session.api_key_id is not None:
        api_key = ApiKey.objects.filter(id=session.api_key_id).select_related("user").first()
        if api_key is not None:
            return principal_for_key(api_key)
    if session.user_id is not None:
        user = get_user_model().objects.filter(pk=session.user_id).first()
        return Principal(user_id=session.user_id, label=user.get_username() if user else f"user {session.user_id}")
    return ANONYMOUS


# Connections ----------------------------------------------------------------------


def bearer_token(scope: dict) -> str | None:
    """The key in `Authorization: Bearer <key>`, or None when the handshake has no such header."""
    for name, value in scope.get("headers", []):
        if name.lower() == b"authorization":
            scheme, _, token = value.decode("latin-1").strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
            raise Unauthorized("The Authorization header must be 'Bearer <API key>'.")
    return None


def principal_for_key(api_key: ApiKey) -> Principal:
    return Principal(
        user_id=api_key.user_id,
        api_key_id=api_key.id,
        label=api_key.name,
        limits=limits_for_key(api_key),
    )


#: Where `settle` leaves the handshake's principal (or its Unauthorized) in the scope.
SCOPE_KEY = "r2d2.principal"


async def settle(scope: dict) -> dict:
    """The scope with its principal worked out once: the connection cap (chat/edge/connection_limits.py)
    counts by it before the consumer runs, and the consumer's `authenticate` reuses it."""
    if SCOPE_KEY in scope:
        return scope
    try:
        outcome: Principal | Unauthorized = await _authenticate(scope)
    except Unauthorized as exc:
        outcome = exc
    return {**scope, SCOPE_KEY: outcome}


def settled(scope: dict) -> Principal | None:
    """The principal `settle` found, or None (not settled, or not valid)."""
    outcome = scope.get(SCOPE_KEY)
    return outcome if isinstance(outcome, Principal) else None


async def authenticate(scope: dict) -> Principal:
    """The handshake's principal. A key, if one is sent, must be valid, whether or not auth is required."""
    outcome = scope.get(SCOPE_KEY)
    if isinstance(outcome, Unauthorized):
        raise outcome
    if isinstance(outcome, Principal):
        return outcome
    return await _authenticate(scope)


async def _authenticate(scope: dict) -> Principal:
    token = bearer_token(scope)
    if token is not None:
        api_key = await _find_key(token)
        if api_key is None:
            raise Unauthorized("That API key is not valid.")
        if not api_key.is_active:
            raise Unauthorized("That API key has been revoked.")
        if api_key.user is not None and not api_key.user.is_active:
            raise Unauthorized("That API key's account is no longer active.")
        await ApiKey.objects.filter(id=api_key.id).aupdate(last_used_at=timezone.now())
        return principal_for_key(api_key)
    user = scope.get("user")
    if user is not None and user.is_authenticated:
        return await principal_for_user(user)
    return ANONYMOUS


async def principal_for_user(user) -> Principal:
    """A signed-in person, with their own spending limits where the admin set some."""
    own = await UserLimits.objects.filter(user_id=user.pk).afirst()
    return Principal(user_id=user.pk, label=user.get_username(), limits=limits_for_user(own))


async def still_valid(principal: Principal) -> bool:
    """Is the principal's key still unrevoked (a user's session cookie is checked at connect only)?"""
    if principal.api_key_id is None:
        return True
    usable = ApiKey.objects.filter(id=principal.api_key_id, revoked_at__isnull=True).exclude(user__is_active=False)
    # Asked before a post is admitted: retried across a storage blip like the turn's own calls (chat/ops/storage.py).
    return await storage.retry(usable.aexists)


_find_key = sync_to_async(find_key)
