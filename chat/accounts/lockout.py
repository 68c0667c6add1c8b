"""Sign-in that resists guessing: django-axes, configured here and in r2d2site/settings.py.

After R2D2_SIGNIN_FAILURE_LIMIT failed sign-ins for one username from one client,
that pair is refused for R2D2_SIGNIN_LOCKOUT_MINUTES after its last attempt, on the page's
sign-in and the admin's alike (axes watches Django's `authenticate`, which both call).
Other usernames from that address, and that username from other addresses, are not
affected: a person is not locked out by someone guessing from elsewhere. Attempts are
rows in the database (axes' AccessAttempt), so every server process sees the same count;
`manage.py axes_reset` (or the admin's "Access attempts") lifts a lockout.

The address is the one chat/edge/proxy.py settled on behind the trusted proxies (Django's
REMOTE_ADDR): not django-ipware's reading of X-Forwarded-For, whose first entries are the
client's own claim. A client is counted as the connection caps and the log's throttle count
it (chat/ops/addresses.py): IPv6 by its /64, whose host picks any of its addresses at will,
and an IPv4-mapped address as its IPv4 address. Axes keys its counts by what
AXES_CLIENT_IP_CALLABLE returns, in an address column (PostgreSQL's `inet`, which Django
fills with an address, not a network): an IPv6 client is stored as its /64's first address.
The page a locked-out pair sees is chat/web/lockout.py.
"""

from __future__ import annotations

import ipaddress

from django.http import HttpRequest

from chat.ops.addresses import address_group


def client_address(request: HttpRequest) -> str | None:
    """AXES_CLIENT_IP_CALLABLE: the client as chat/edge/proxy.py settled its address, grouped (IPv6: its /64)."""
    address = request.META.get("REMOTE_ADDR")
    if not address:
        return address
    group = address_group(address)
    return str(ipaddress.ip_network(group).network_address) if "/" in group else group


def describe(username: str | None, ip_address: str, user_agent: str, path_info: str, request: HttpRequest) -> str:
    """AXES_CLIENT_STR_CALLABLE: who failed, for axes' log lines. Never the username: people
    type their password into it by mistake. The address lets the log's throttle
    (chat/ops/throttle.py) count these lines per client."""
    return f"{ip_address} on {path_info}"
