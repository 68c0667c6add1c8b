"""`manage.py create_api_key NAME`: make an API key for a programmatic client; the key is printed once."""

from __future__ import annotations

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError, CommandParser

from chat.accounts import auth
from chat.models import ApiKey


class Command(BaseCommand):
    help = (
        "Create an API key. Clients send it as 'Authorization: Bearer <key>' in the WebSocket handshake. "
        "Only its hash is stored: the key is printed once, alone on the last line of stdout. Limits not "
        "given follow the R2D2_QUOTA_* settings (0: no limit)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("name", help="A unique name for the key (who or what uses it).")
        parser.add_argument("--user", help="Username of the key's owner (their conversations include the key's).")
        parser.add_argument("--messages-per-minute", type=int, help="Messages per minute across all its sockets.")
        parser.add_argument("--tokens-per-day", type=int, help="Model tokens (prompt + completion) per UTC day.")
        parser.add_argument("--max-sessions", type=int, help="Concurrent live sessions.")
        parser.add_argument("--models", help="Comma-separated models it may use (default: R2D2_QUOTA_MODELS, or any).")

    def handle(self, *args, name: str, **options) -> None:
        if ApiKey.objects.filter(name=name).exists():
            raise CommandError(f"An API key named {name!r} already exists.")
        user = None
        if options["user"]:
            try:
                user = get_user_model().objects.get_by_natural_key(options["user"])
            except get_user_model().DoesNotExist:
                raise CommandError(f"No user named {options['user']!r}.") from None
        for limit in ("messages_per_minute", "tokens_per_day", "max_sessions"):
            if options[limit] is not None and options[limit] < 0:
                raise CommandError(f"--{limit.replace('_', '-')} must be 0 or more.")
        models = [m.strip() for m in (options["models"] or "").split(",") if m.strip()]
        row, key = auth.create_api_key(
            name,
            user=user,
            messages_per_minute=options["messages_per_minute"],
            tokens_per_day=options["tokens_per_day"],
            max_sessions=options["max_sessions"],
            models=models,
        )
        self.stdout.write(f"Created API key {row.name!r} ({row.prefix}…). It is shown only now; keep it secret:")
        self.stdout.write(key)
