from django.apps import AppConfig


class ChatConfig(AppConfig):
    default_auto_field = "django.db.models.BigAutoField"
    name = "chat"
    verbose_name = "R2D2 chat"

    def ready(self) -> None:
        """Start-up: before Daphne builds its server, give it R2D2's WebSocket protocol; register the checks."""
        from chat import (
            checks,  # noqa: F401 (registers the system checks)
            websocket_server,
        )

        websocket_server.install()
