"""`manage.py end_session <session_id>`: an operator ends one live session, wherever it is held."""

from __future__ import annotations

import time
import uuid

from channels.layers import InMemoryChannelLayer, get_channel_layer
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone

from chat import liveness
from chat.models import ChatSession, EndReason
from chat.operator import end_session_now


class Command(BaseCommand):
    help = (
        "End a live session as an operator. The server process holding it (any process sharing the Redis "
        "channel layer) stops its generation, records reason 'operator' and sends its client session_end. "
        "If that process is gone, the session is ended in the database directly."
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
        session = ChatSession.objects.filter(id=session_id).first()
        if session is None:
            raise CommandError(f"No session has id {session_id}.")
        if not session.is_live:
            self.stdout.write(
                f"Session {session_id} already ended at {session.ended_at:%Y-%m-%d %H:%M:%S} ({session.end_reason})."
            )
            return

        cross_process = not isinstance(get_channel_layer(), InMemoryChannelLayer)
        if cross_process and liveness.is_alive(session.owner_process):
            end_session_now(session_id)
            if self._wait_until_ended(session_id, wait):
                self.stdout.write(
                    self.style.SUCCESS(
                        f"Session {session_id} ended by its process {session.owner_process}; its client was told."
                    )
                )
                return
            self.stderr.write(
                f"Process {session.owner_process} did not confirm within {wait:g}s; ending it in the database."
            )
        elif not cross_process:
            self.stderr.write(
                "The channel layer is in-memory (no REDIS_URL): this command cannot reach the server process, "
                "so the session is ended in the database only; its client is not told."
            )
        else:
            self.stderr.write(
                f"Process {session.owner_process or '(unknown)'} is gone; ending the session in the database."
            )

        ended = ChatSession.objects.filter(id=session_id, ended_at__isnull=True).update(
            ended_at=timezone.now(), end_reason=EndReason.OPERATOR
        )
        if ended:
            self.stdout.write(self.style.SUCCESS(f"Session {session_id} ended in the database."))
        else:
            session.refresh_from_db()
            self.stdout.write(f"Session {session_id} ended meanwhile ({session.end_reason}).")

    @staticmethod
    def _wait_until_ended(session_id: uuid.UUID, wait: float) -> bool:
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if ChatSession.objects.filter(id=session_id, ended_at__isnull=False).exists():
                return True
            time.sleep(0.05)
        return False
