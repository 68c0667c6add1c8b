from django.apps import AppConfig


class ChatConfig(AppConfig):
    default_auto_field = "django.db.models.BigAutoField"
    name = "chat"
    verbose_name = "R2D2 chat"

    def ready(self) -> None:
        from chat import checks  # noqa: F401 (registers the system checks)
