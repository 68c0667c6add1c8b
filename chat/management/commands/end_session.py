"""`manage.py end_session <session_id>`: an operator ends one live session, wherever it is held."""

from __future__ import annotations

import uuid

from django.core.management.base import BaseCommand, CommandError, CommandParser

from chat.models import ChatSession
from chat.sessions import lifecycle
from chat.sessions.lifecycle import Ended


class Command(BaseCommand):
    help = (
        "End a live session as an operator. The server process holding it (any process sharing the Redis "
        "channel layer) stops its generation, records reason 'operator' and sends its client session_end. "
        "If that process is gone or cannot be reached, the session is ended in the database directly."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("session_id", type=uuid.UUID, help="The session's id (the protocol's session_id).")
        parser.add_argument(
            "--wait",
            type=float,
            default=10.0,
            help="Seconds to wait for the holding process to confirm (default 10).",
        )

    def handle(self, *args, session_id: uuid.UUID, wait: float, **options) -> None:
        before = ChatSession.objects.filter(id=session_id).first()
        outcome = lifecycle.request_end_now(session_id, wait=wait)
        owner = (before.owner_process if before else "") or "(unknown)"
        match outcome:
            case Ended.NOT_FOUND:
                raise CommandError(f"No session has id {session_id}.")
            case Ended.ALREADY:
                after = ChatSession.objects.get(id=session_id)
                self.stdout.write(
                    f"Session {session_id} already ended at {after.ended_at:%Y-%m-%d %H:%M:%S} ({after.end_reason})."
                )
                return
            case Ended.BY_OWNER:
                self.stdout.write(
                    self.style.SUCCESS(f"Session {session_id} ended by its process {owner}; its client was told.")
                )
                return
            case Ended.OWNER_GONE:
                self.stderr.write(f"Process {owner} is gone; ending the session in the database.")
            case Ended.OWNER_UNREACHABLE:
                self.stderr.write(
                    "The channel layer is in-memory (no REDIS_URL): this command cannot reach the server process, "
                    "so the session is ended in the database; its client is refused with session_ended "
                    "when it next posts."
                )
            case Ended.NO_CONFIRMATION:
                self.stderr.write(f"Process {owner} did not confirm within {wait:g}s; ending it in the database.")
        self.stdout.write(self.style.SUCCESS(f"Session {session_id} ended in the database."))
