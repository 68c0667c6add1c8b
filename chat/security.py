"""The WebSocket handshake's Origin check."""

from __future__ import annotations

from channels.security.websocket import OriginValidator
from django.conf import settings


class BrowserOriginValidator(OriginValidator):
    """Refuse browser pages from hosts outside ALLOWED_HOSTS; accept clients that send no Origin.

    Channels' AllowedHostsOriginValidator refuses a missing Origin too, which
    locks out Postman, websocat, the `websockets` library and the terminal
    client. A missing Origin cannot come from a cross-site page (browsers
    always send one on WebSocket handshakes), so it is safe to accept.
    """

    def valid_origin(self, parsed_origin) -> bool:
        if parsed_origin is None:
            return True
        return self.validate_origin(parsed_origin)


def allowed_hosts_origin_validator(application):
    allowed = list(settings.ALLOWED_HOSTS)
    if settings.DEBUG and not allowed:
        allowed = ["localhost", "127.0.0.1", "[::1]"]
    return BrowserOriginValidator(application, allowed)
