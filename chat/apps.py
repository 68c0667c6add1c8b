from django.apps import AppConfig


class ChatConfig(AppConfig):
    default_auto_field = "django.db.models.BigAutoField"
    name = "chat"
    verbose_name = "R2D2 chat"

    def ready(self) -> None:
        """Start-up: before Daphne builds its server, give it R2D2's WebSocket protocol; register the checks,
        the signals that close a user's sockets when they sign out or are deactivated, and
        the one that ends a withdrawn principal's sessions (accounts announces it, sessions acts on it)."""
        from chat import checks  # noqa: F401 (registers the system checks)
        from chat.edge import daphne
        from chat.ops import storage

        daphne.install()
        storage.steady_reconnects()

        from django.contrib.auth import get_user_model
        from django.contrib.auth.signals import user_logged_out
        from django.db.models.signals import post_save, pre_save

        from chat.accounts import auth
        from chat.sessions import lifecycle

        user_logged_out.connect(auth.signed_out, dispatch_uid="r2d2-signed-out")
        pre_save.connect(auth.account_saving, sender=get_user_model(), dispatch_uid="r2d2-account-saving")
        post_save.connect(auth.account_saved, sender=get_user_model(), dispatch_uid="r2d2-account-saved")
        auth.sessions_withdrawn.connect(lifecycle.end_withdrawn, dispatch_uid="r2d2-sessions-withdrawn")
