from collections.abc import Awaitable, Callable

from channels.routing import URLRouter
from django.urls import Resolver404, path

from chat.websocket.consumer import ChatConsumer

websocket_urlpatterns = [
    # The seed's clients connect to the root URL; /ws/ is there for proxies that route by path.
    path("", ChatConsumer.as_asgi()),
    path("ws/", ChatConsumer.as_asgi()),
]


class Router(URLRouter):
    """Channels' URLRouter, except that a handshake to a path no route matches is refused with
    HTTP 404 (URLRouter raises ValueError, which Daphne answered with 500 and an ERROR traceback)."""

    def __call__(self, scope: dict, receive: Callable, send: Callable) -> Awaitable[None]:
        # Returns the router's coroutine rather than awaiting it in one of its own (see
        # chat/sessions/heartbeat.py): no extra frame per open socket.
        if scope["type"] == "websocket" and not self.routes_path(scope):
            return _not_found(scope, receive, send)
        return super().__call__(scope, receive, send)

    def routes_path(self, scope: dict) -> bool:
        """True when one of the routes matches the scope's path (as URLRouter matches it)."""
        route_path: str = scope.get("path_remaining", scope.get("path")) or ""
        if "path_remaining" not in scope:
            root_path = scope.get("root_path", "")
            if root_path and not route_path.startswith(root_path):
                return False
            route_path = route_path[len(root_path) :]
        route_path = route_path.lstrip("/")
        for route in self.routes:
            try:
                if route.pattern.match(route_path):
                    return True
            except Resolver404:
                pass
        return False


async def _not_found(scope: dict, receive: Callable, send: Callable) -> None:
    """Refuse the handshake: HTTP 404 where the server takes an ASGI denial response (R2D2's Daphne,
    chat/edge/daphne.py), else a plain refusal (403)."""
    await receive()  # websocket.connect
    if "websocket.http.response" in scope.get("extensions", {}):
        await send({"type": "websocket.http.response.start", "status": 404, "headers": []})
        await send({"type": "websocket.http.response.body", "body": b""})
    else:
        await send({"type": "websocket.close"})
