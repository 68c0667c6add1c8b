"""The WebSocket handshake's Host and Origin checks (refused handshakes get 403)."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any
from urllib.parse import urlsplit

from channels.security.websocket import WebsocketDenier
from django.conf import settings
from django.http.request import split_domain_port, validate_host
from django.utils.http import is_same_domain

DEFAULT_PORTS = {"http": 80, "https": 443}
#: The "server" of a scope with no Host header: nothing to compare an Origin against.
NO_HOST = ("", "", None)


def _header(scope: dict[str, Any], name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def _allowed_hosts() -> list[str]:
    allowed = list(settings.ALLOWED_HOSTS)
    if settings.DEBUG and not allowed:
        allowed = [".localhost", "127.0.0.1", "[::1]"]  # as Django's HttpRequest.get_host
    return allowed


def _port(netloc_port: str, scheme: str) -> int | None:
    if not netloc_port:
        return DEFAULT_PORTS.get(scheme)
    return int(netloc_port) if netloc_port.isdigit() else None


def server_origin(scope: dict[str, Any]) -> tuple[str, str, int | None] | None:
    """(scheme, host, port) of the server as the request reached it: the Host header, and the
    scheme the client used (wss, or https at the load balancer: chat/edge/proxy.py sets it from
    X-Forwarded-Proto). None when the Host header is outside ALLOWED_HOSTS."""
    host_header = _header(scope, b"host")
    if host_header is None:
        # Only in-process test communicators: a real handshake always has one (RFC 6455;
        # Daphne's autobahn refuses a handshake without it).
        return NO_HOST
    domain, port = split_domain_port(host_header)
    if not domain or not validate_host(domain, _allowed_hosts()):
        return None
    scheme = "https" if scope.get("scheme") in ("wss", "https") else "http"
    return scheme, domain, _port(port, scheme)


def origin_allowed(origin: str, server: tuple[str, str, int | None]) -> bool:
    """A browser page may connect when it comes from the server's own scheme and port on an
    ALLOWED_HOSTS host, or from an origin in CSRF_TRUSTED_ORIGINS (wildcards as Django reads them)."""
    try:
        parsed = urlsplit(origin)
        origin_port = parsed.port
    except ValueError:
        return False
    if not parsed.scheme or not parsed.hostname:
        return False
    trusted = settings.CSRF_TRUSTED_ORIGINS
    if origin in trusted:
        return True
    for pattern in trusted:
        scheme, _, netloc = pattern.partition("://")
        if "*" in netloc and scheme == parsed.scheme and is_same_domain(parsed.netloc, netloc[netloc.index("*") + 1 :]):
            return True
    domain, _ = split_domain_port(parsed.netloc)
    server_scheme, _, server_port = server
    return (
        server != NO_HOST
        and parsed.scheme == server_scheme
        and (origin_port or DEFAULT_PORTS.get(parsed.scheme)) == server_port
        and validate_host(domain, _allowed_hosts())
    )


class HostOriginValidator:
    """Refuse handshakes whose Host is outside ALLOWED_HOSTS (as Django refuses such HTTP requests)
    and browser pages from other origins; accept clients that send no Origin.

    Channels' AllowedHostsOriginValidator compares only the Origin's host (so
    `http://127.0.0.1:9999` or `https://localhost` passed for a server on another
    port or scheme), ignores Host, and refuses a missing Origin, which locks out
    Postman, websocat, the `websockets` library and the terminal client. A missing
    Origin cannot come from a cross-site page (browsers always send one on
    WebSocket handshakes), so it is safe to accept.
    """

    _asgi_single_callable = True  # see chat/sessions/heartbeat.py: returns the inner coroutine, no frame of its own

    def __init__(self, application) -> None:
        self.application = application

    def __call__(self, scope, receive, send) -> Awaitable[None]:
        if scope["type"] == "websocket":
            server = server_origin(scope)
            origin = _header(scope, b"origin")
            if server is None or (origin is not None and not origin_allowed(origin, server)):
                return WebsocketDenier()(scope, receive, send)
        return self.application(scope, receive, send)


def allowed_hosts_origin_validator(application) -> HostOriginValidator:
    return HostOriginValidator(application)
