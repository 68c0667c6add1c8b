"""`manage.py create_api_key NAME`: make an API key for a programmatic client; the key is printed once."""

from __future__ import annotations

from decimal import Decimal, InvalidOperation

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError, CommandParser

from chat.accounts import auth
from chat.models import ApiKey

#: Limits given as whole numbers, and in dollars (the model's decimal places).
WHOLE = ("messages_per_minute", "tokens_per_day", "max_sessions", "max_output_tokens")
DOLLARS = ("usd_per_day", "usd_per_month")
#: The largest whole-number limit a database column holds.
MAX_WHOLE = 2**31 - 1


class Command(BaseCommand):
    help = (
        "Create an API key. Clients send it as 'Authorization: Bearer <key>' in the WebSocket handshake. "
        "Only its hash is stored: the key is printed once, alone on the last line of stdout. Limits not "
        "given follow the R2D2_QUOTA_* settings (0: no limit)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        # Limits are read as text and checked in handle(): a bad one is a CommandError naming it, and
        # nothing is created (argparse's own refusal would only print its usage).
        parser.add_argument("name", help="A unique name for the key (who or what uses it).")
        parser.add_argument("--user", help="Username of the key's owner (their conversations include the key's).")
        parser.add_argument("--messages-per-minute", help="Messages per minute across all its sockets.")
        parser.add_argument("--tokens-per-day", help="Model tokens (prompt + completion) per UTC day.")
        parser.add_argument("--max-sessions", help="Concurrent live sessions.")
        parser.add_argument("--models", help="Comma-separated models it may use (default: R2D2_QUOTA_MODELS, or any).")
        parser.add_argument(
            "--usd-per-day", help="Dollars per UTC day, at R2D2_MODEL_PRICES (it may then use only priced models)."
        )
        parser.add_argument("--usd-per-month", help="Dollars per calendar month (UTC), at R2D2_MODEL_PRICES.")
        parser.add_argument(
            "--max-output-tokens", help="Sent to the model as each request's output limit (and what a turn reserves)."
        )

    def handle(self, *args, name: str, **options) -> None:
        limits = {limit: _whole(limit, options[limit]) for limit in WHOLE}
        limits.update({limit: _dollars(limit, options[limit]) for limit in DOLLARS})
        if ApiKey.objects.filter(name=name).exists():
            raise CommandError(f"An API key named {name!r} already exists.")
        user = None
        if options["user"]:
            try:
                user = get_user_model().objects.get_by_natural_key(options["user"])
            except get_user_model().DoesNotExist:
                raise CommandError(f"No user named {options['user']!r}.") from None
        models = [m.strip() for m in (options["models"] or "").split(",") if m.strip()]
        row, key = auth.create_api_key(name, user=user, models=models, **limits)
        self.stdout.write(f"Created API key {row.name!r} ({row.prefix}…). It is shown only now; keep it secret:")
        self.stdout.write(key)


def _option(limit: str) -> str:
    return "--" + limit.replace("_", "-")


def _whole(limit: str, given: str | None) -> int | None:
    if given is None:
        return None
    try:
        value = int(given.strip())
    except ValueError:
        raise CommandError(f"{_option(limit)} must be a whole number, 0 or more, not {given!r}.") from None
    if not 0 <= value <= MAX_WHOLE:
        raise CommandError(f"{_option(limit)} must be from 0 to {MAX_WHOLE}, not {value}.")
    return value


def _dollars(limit: str, given: str | None) -> Decimal | None:
    if given is None:
        return None
    try:
        value = Decimal(given.strip().removeprefix("$"))
    except InvalidOperation:
        raise CommandError(f"{_option(limit)} must be an amount in dollars, 0 or more, not {given!r}.") from None
    if not value.is_finite() or value < 0:
        raise CommandError(f"{_option(limit)} must be an amount in dollars, 0 or more, not {given!r}.")
    if value >= Decimal(10) ** 8 or value != value.quantize(Decimal("0.0001")):
        raise CommandError(f"{_option(limit)} must be under $100,000,000, with at most 4 decimal places.")
    return value
