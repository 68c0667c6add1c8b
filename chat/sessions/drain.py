"""Stopping a server process gently (a deploy): SIGTERM drains it before it exits.

Daphne runs on Twisted, whose reactor installs its own SIGTERM handler when it
starts (`reactor.run(installSignalHandlers=True)`): it stops the reactor, Daphne
cancels every application instance, and the sockets drop mid-turn. The first
connection of the process installs `_on_sigterm` in front of it (`watch`):

1. the process is draining: `/healthz` answers 503 (the load balancer stops
   sending it new connections), new handshakes are refused, and new sessions,
   turns and resumes are refused with `server_draining`;
2. turns in progress, and messages queued behind them, run to their end, for at
   most R2D2_DRAIN_SECONDS. A turn still running then is interrupted: its client
   gets `error` `turn_interrupted` then `processing_end`, and its reply is saved as
   interrupted. A plain session's queued messages each get `error` `server_draining`;
3. resumable sessions are released (no owner in the database), so that a client
   resuming on another process takes them over at once, with every frame kept, and
   that process answers the messages still queued (they are saved as `accepted`);
4. every socket is closed with 1012 (service restart); sessions that are not
   resumable end as `disconnect`, as when any socket closes;
5. Twisted's own handler runs, and the process exits as before.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import weakref
from types import FrameType

from django.conf import settings

from chat import llm
from chat.protocol import CLOSE_SERVICE_RESTART
from chat.protocol.errors import ClientError, ErrorCode
from chat.sessions import holder
from chat.sessions.socket import SessionSocket

logger = logging.getLogger(__name__)


draining = False
_sockets: weakref.WeakSet[SessionSocket] = weakref.WeakSet()
_installed = False
_task: asyncio.Task[None] | None = None


def refuse_if_draining() -> None:
    """New sessions, turns and resumes go to another process while this one stops."""
    if draining:
        raise ClientError(ErrorCode.SERVER_DRAINING, "This server is restarting; reconnect and resume or start again.")


def watch(socket: SessionSocket) -> None:
    """Note an open socket (to close it when draining); the first one installs the SIGTERM handler."""
    _sockets.add(socket)
    _install()


def _install() -> None:
    global _installed
    if _installed:
        return
    _installed = True
    try:
        previous = signal.getsignal(signal.SIGTERM)
    except ValueError:
        return
    if not callable(previous):
        # Not under Daphne's reactor (a test process, a management command): leave SIGTERM alone.
        return
    loop = asyncio.get_running_loop()

    def _on_sigterm(signum: int, frame: FrameType | None) -> None:
        global _task
        if _task is not None:
            return  # a second SIGTERM while draining changes nothing
        logger.warning("SIGTERM: draining", extra={"drain_seconds": settings.R2D2_DRAIN_SECONDS})

        def _start() -> None:
            global _task
            _task = loop.create_task(_drain_then(lambda: previous(signum, frame)))

        loop.call_soon_threadsafe(_start)

    try:
        signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:
        # Not the main thread: `manage.py runserver` serves from a thread beside its autoreloader, which
        # owns SIGTERM. A development server has no drain to install, and nothing to warn anyone about.
        logger.debug("SIGTERM handler not installed: not on the main thread")


async def _drain_then(exit_process) -> None:
    try:
        await drain()
    except Exception:
        logger.exception("drain failed")
    exit_process()


async def drain(seconds: float | None = None) -> None:
    """Steps 1 to 4 above."""
    global draining
    draining = True
    loop = asyncio.get_running_loop()
    deadline = loop.time() + (settings.R2D2_DRAIN_SECONDS if seconds is None else seconds)
    # Polled: turns end in many ways, and this runs once in a process's life.
    while _busy() and loop.time() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.1)
    still_busy = sum(h.conversation.busy for h in holder.held_here())
    held = holder.held_here()
    await asyncio.gather(*(h.stop_for_drain() for h in held), return_exceptions=True)
    sockets = list(_sockets)
    await asyncio.gather(*(s.close(code=CLOSE_SERVICE_RESTART) for s in sockets), return_exceptions=True)
    logger.warning(
        "drained",
        extra={
            "released_sessions": sum(h.resumable for h in held),
            "closed_sockets": len(sockets),
            "cut_short": still_busy,
        },
    )
    await asyncio.sleep(0.5)  # let the close frames leave before the reactor stops
    await llm.close_clients()  # the model servers' HTTP sessions: else aiohttp logs "Unclosed client session" ERRORs


def _busy() -> bool:
    return any(h.conversation.busy for h in holder.held_here())
