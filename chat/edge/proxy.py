"""The client's address and scheme as the nearest trusted proxy saw them (ASGI middleware).

Behind Elastic Beanstalk a request passes the load balancer, then nginx; each
appends the address it received the connection from to X-Forwarded-For. The
first entries are whatever the client itself sent, so they prove nothing. With
R2D2_TRUSTED_PROXIES = n proxies in front of the server, the n-th entry from
the right was written by the outermost of them: the client's address as that
proxy saw it. (Daphne's --proxy-headers takes the first entry, the client's own
claim, unvalidated: "not-an-ip" then reached ChatSession.client_address, a
PostgreSQL inet column, and every session_start on the socket failed.)

Anything that does not parse as an IP address, or a list shorter than the
number of proxies, leaves the peer address: the header never breaks a request.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable
from typing import Any

from django.conf import settings

Scope = dict[str, Any]


def _header(scope: Scope, name: bytes) -> str | None:
    """All the values of one header joined as one list (a repeated header is a comma-separated list)."""
    values = [value.decode("latin-1") for key, value in scope.get("headers", []) if key.lower() == name]
    return ",".join(values) if values else None


def forwarded_address(header: str | None, trusted_proxies: int) -> str | None:
    """The address `trusted_proxies` entries from the right of X-Forwarded-For, if it is a valid IP."""
    if not header or trusted_proxies <= 0:
        return None
    entries = [entry.strip() for entry in header.split(",")]
    if len(entries) < trusted_proxies:
        return None
    try:
        return str(ipaddress.ip_address(entries[-trusted_proxies]))
    except ValueError:
        return None


def client_address(headers: list[tuple[bytes, bytes]], peer: str | None) -> str | None:
    """The client's address as TrustedProxyMiddleware settles it, for code below the ASGI scope
    (Daphne's protocol object has the handshake's headers and the socket's peer)."""
    forwarded = forwarded_address(_header({"headers": headers}, b"x-forwarded-for"), settings.R2D2_TRUSTED_PROXIES)
    return forwarded or peer


class TrustedProxyMiddleware:
    """Rewrites scope["client"] (and the scheme from X-Forwarded-Proto) for http and websocket scopes.

    Consumers and Django read the result as if the client had connected directly:
    the chat consumer records scope["client"][0].
    """

    def __init__(self, app, trusted_proxies: int | None = None) -> None:
        self.app = app
        self.trusted_proxies = settings.R2D2_TRUSTED_PROXIES if trusted_proxies is None else trusted_proxies

    _asgi_single_callable = True  # see chat/sessions/heartbeat.py: returns the inner coroutine, no frame of its own

    def __call__(self, scope: Scope, receive, send) -> Awaitable[None]:
        if scope["type"] in ("http", "websocket") and self.trusted_proxies > 0:
            scope = dict(scope)
            address = forwarded_address(_header(scope, b"x-forwarded-for"), self.trusted_proxies)
            if address is not None:
                # The socket's own peer stays known: /metrics serves private peers only (chat/ops/metrics.py).
                scope["proxy_peer"] = scope.get("client")
                scope["client"] = [address, 0]
            # The load balancer sets X-Forwarded-Proto itself (nginx passes it on): the
            # scheme the client used, which the WebSocket origin check compares.
            proto = (_header(scope, b"x-forwarded-proto") or "").rsplit(",", 1)[-1].strip().lower()
            if proto in ("http", "https"):
                secure = proto == "https"
                if scope["type"] == "websocket":
                    scope["scheme"] = "wss" if secure else "ws"
                else:
                    scope["scheme"] = proto
        return self.app(scope, receive, send)
