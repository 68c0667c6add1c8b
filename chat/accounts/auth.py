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
from django.utils import timezone

from chat.accounts.principals import ANONYMOUS, Principal, limits_for_key, limits_for_user
from chat.models import ApiKey, UserLimits

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


def withdraw(group: str, message: str) -> None:
    """Close every socket in `group`, in every process: an `unauthorized` frame, then 4401."""
    async_to_sync(get_channel_layer().group_send)(group, {"type": "principal.revoked", "message": message})


def signed_out(sender, request, user, **kwargs) -> None:
    """`user_logged_out`: the sockets this sign-in opened stop acting for that user."""
    session_key = getattr(getattr(request, "session", None), "session_key", None)
    if session_key:
        withdraw(login_group(session_key), "You signed out.")


def account_saved(sender, instance, **kwargs) -> None:
    """A user deactivated (the admin's "active" box): their open sockets are closed."""
    if not instance.is_active:
        withdraw(user_group(instance.pk), "That account is no longer active.")


def revoke(api_key: ApiKey) -> bool:
    """Revoke a key and close its live sockets wherever they are; False if it was already revoked."""
    revoked = ApiKey.objects.filter(id=api_key.id, revoked_at__isnull=True).update(revoked_at=timezone.now())
    api_key.refresh_from_db(fields=["revoked_at"])
    # Sent even when already revoked: a socket that missed the first event is closed now.
    withdraw(key_group(api_key.id), "That API key has been revoked.")
    if revoked:
        logger.warning("api key revoked", extra={"api_key": api_key.name, "prefix": api_key.prefix})
    return bool(revoked)


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


async def authenticate(scope: dict) -> Principal:
    """The handshake's principal. A key, if one is sent, must be valid, whether or not auth is required."""
    token = bearer_token(scope)
    if token is not None:
        api_key = await _find_key(token)
        if api_key is None:
            raise Unauthorized("That API key is not valid.")
        if not api_key.is_active:
            raise Unauthorized("That API key has been revoked.")
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
    return await ApiKey.objects.filter(id=principal.api_key_id, revoked_at__isnull=True).aexists()


_find_key = sync_to_async(find_key)
