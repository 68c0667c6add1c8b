"""`manage.py revoke_api_key NAME`: revoke an API key; its live sockets close within seconds, in every process."""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError, CommandParser

from chat.accounts import auth
from chat.models import ApiKey


class Command(BaseCommand):
    help = (
        "Revoke an API key: new connections with it are refused, and its open sockets (in any server process "
        "sharing the Redis channel layer) get an 'unauthorized' error frame and are closed with code 4401."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("name", help="The key's name.")

    def handle(self, *args, name: str, **options) -> None:
        try:
            api_key = ApiKey.objects.get(name=name)
        except ApiKey.DoesNotExist:
            raise CommandError(f"No API key named {name!r}.") from None
        if auth.revoke(api_key):
            self.stdout.write(f"Revoked {api_key}; its open sockets are being closed.")
        else:
            self.stdout.write(f"{api_key} was already revoked; its open sockets were told again.")
