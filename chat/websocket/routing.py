from django.urls import path

from chat.websocket.consumer import ChatConsumer

websocket_urlpatterns = [
    # The seed's clients connect to the root URL; /ws/ is there for proxies that route by path.
    path("", ChatConsumer.as_asgi()),
    path("ws/", ChatConsumer.as_asgi()),
]
