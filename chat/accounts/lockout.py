"""Sign-in that resists guessing: django-axes, configured here and in r2d2site/settings.py.

After R2D2_SIGNIN_FAILURE_LIMIT failed sign-ins for one username from one client address,
that pair is refused for R2D2_SIGNIN_LOCKOUT_MINUTES after its last attempt, on the page's
sign-in and the admin's alike (axes watches Django's `authenticate`, which both call).
Other usernames from that address, and that username from other addresses, are not
affected: a person is not locked out by someone guessing from elsewhere. Attempts are
rows in the database (axes' AccessAttempt), so every server process sees the same count;
`manage.py axes_reset` (or the admin's "Access attempts") lifts a lockout.

The address is the one chat/edge/proxy.py settled on behind the trusted proxies (Django's
REMOTE_ADDR): not django-ipware's reading of X-Forwarded-For, whose first entries are the
client's own claim. The page a locked-out pair sees is chat/web/lockout.py.
"""

from __future__ import annotations

from django.http import HttpRequest


def client_address(request: HttpRequest) -> str | None:
    """AXES_CLIENT_IP_CALLABLE: the client's address as chat/edge/proxy.py settled it."""
    return request.META.get("REMOTE_ADDR")


def describe(username: str | None, ip_address: str, user_agent: str, path_info: str, request: HttpRequest) -> str:
    """AXES_CLIENT_STR_CALLABLE: who failed, for axes' log lines. Never the username: people
    type their password into it by mistake. The address lets the log's throttle
    (chat/ops/throttle.py) count these lines per client."""
    return f"{ip_address} on {path_info}"
