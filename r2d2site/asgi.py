"""ASGI entry point: HTTP to Django, WebSockets to the chat consumer."""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "r2d2site.settings")
# Django must be set up before anything imports models.
django_asgi_app = get_asgi_application()

from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter  # noqa: E402

from chat.edge.connection_limits import ConnectionLimitMiddleware  # noqa: E402
from chat.edge.flow import FlowMiddleware  # noqa: E402
from chat.edge.origin import allowed_hosts_origin_validator  # noqa: E402
from chat.edge.proxy import TrustedProxyMiddleware  # noqa: E402
from chat.sessions.heartbeat import HeartbeatMiddleware  # noqa: E402
from chat.websocket.routing import Router, websocket_urlpatterns  # noqa: E402

# The first request or socket starts this process's heartbeat (chat/sessions/heartbeat.py).
# The client's address and scheme are settled first (chat/edge/proxy.py): the Host/Origin
# check compares the scheme, and only handshakes it lets through are counted. The connection
# caps count a socket by its principal (after the session cookie is read) or its address.
application = HeartbeatMiddleware(
    TrustedProxyMiddleware(
        ProtocolTypeRouter(
            {
                "http": django_asgi_app,
                # The session cookie's user is the web page's principal (chat/accounts/auth.py);
                # API keys come in a header. The socket's send buffer is reachable from its scope
                # (chat/edge/flow.py), and an unknown path is refused with 404 (chat/websocket/routing.py).
                "websocket": FlowMiddleware(
                    allowed_hosts_origin_validator(
                        AuthMiddlewareStack(ConnectionLimitMiddleware(Router(websocket_urlpatterns)))
                    )
                ),
            }
        )
    )
)
