"""`manage.py end_orphaned_sessions`: end live sessions whose server process is gone."""

from __future__ import annotations

from django.conf import settings
from django.core.management.base import BaseCommand, CommandParser

from chat.sessions import lifecycle, liveness


class Command(BaseCommand):
    help = (
        "End, with reason 'orphaned', every live session whose owning server process has not sent a "
        "heartbeat within the staleness window (R2D2_PROCESS_STALE_SECONDS). Safe with live processes: "
        "their sessions are left alone."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--stale-after",
            type=float,
            default=None,
            help="Seconds without a heartbeat after which a process is gone "
            f"(default {settings.R2D2_PROCESS_STALE_SECONDS:g}).",
        )
        parser.add_argument(
            "--dry-run", action="store_true", help="List the sessions that would be ended; change nothing."
        )

    def handle(self, *args, stale_after: float | None, dry_run: bool, **options) -> None:
        if dry_run:
            orphaned = list(liveness.orphaned_sessions(stale_after=stale_after).values_list("id", "owner_process"))
            for session_id, owner in orphaned:
                self.stdout.write(f"{session_id} (process {owner or 'unknown'})")
            self.stdout.write(f"{len(orphaned)} orphaned session(s) would be ended.")
            return
        ended = lifecycle.end_orphaned(stale_after=stale_after)
        self.stdout.write(self.style.SUCCESS(f"Ended {ended} orphaned session(s)."))
