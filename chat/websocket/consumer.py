"""The WebSocket consumer: parse a frame, check who may do it, dispatch, send frames back.

It reads like a table of actions (`HANDLERS`). Every session it starts or resumes is
held by a `Holder` (chat/sessions/holder.py), the same kind whether resumable or not;
everything slow (the model call) runs in the holder's `Conversation`, so the socket
keeps reading while a reply is generated, and a cancel or a closed socket can stop it.
The consumer is the holder's `SessionSocket`: it sends frames and forgets a session
its holder let go of.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

from channels.generic.websocket import AsyncWebsocketConsumer
from django.conf import settings

from chat import llm, protocol
from chat.accounts import auth, counters, principals, quotas
from chat.accounts.limits import TokenBucket
from chat.edge import flow
from chat.models import ChatSession, EndReason
from chat.ops import metrics, storage, throttle
from chat.protocol import (
    Cancel,
    ListModels,
    ListSessions,
    PostMessage,
    Request,
    Resume,
    SessionEnd,
    SessionStart,
    Unwatch,
    Usage,
    Watch,
)
from chat.protocol.errors import ClientError, ErrorCode, storage_unavailable
from chat.sessions import drain, history, holder, lifecycle, resume, watch
from chat.sessions.holder import Holder

logger = logging.getLogger(__name__)


class ChatConsumer(AsyncWebsocketConsumer):
    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            # Daphne cancels an application that outlives its close timeout (a take-over waiting,
            # a slow drain): disconnect() is never called then, and nothing it does may leak.
            if not getattr(self, "finished", True):
                self.uncount()
                holder.spawn(self.finish())

    async def connect(self) -> None:
        """Called when a WebSocket connection is opened (Origin and Host were already checked)."""
        self.sessions: dict[uuid.UUID, Holder] = {}
        # Sessions resumed here while their holder elsewhere lets go, each with the posts that wait for it.
        self.taking_over: dict[uuid.UUID, tuple[resume.TakeOver, list[PostMessage]]] = {}
        self.finished = self.counted = False
        if drain.draining:
            await self.close()  # the handshake is refused: this process is stopping
            return
        drain.watch(self)
        self.post_rate = TokenBucket(settings.R2D2_RATE_LIMIT_PER_MINUTE)
        self.start_rate = TokenBucket(settings.R2D2_RATE_LIMIT_PER_MINUTE)
        client = self.scope.get("client")
        self.client_address = client[0] if client else None
        self.principal = principals.ANONYMOUS
        self.accepted = self.refused = False
        try:
            self.principal = await auth.authenticate(self.scope)
        except auth.Unauthorized as exc:
            return await self.refuse(str(exc))
        if self.principal.is_anonymous and settings.R2D2_REQUIRE_AUTH:
            return await self.refuse("Sign in, or send an API key in the handshake: 'Authorization: Bearer <key>'.")
        # Revoking the key, signing out or deactivating the account (in any process) reaches this socket.
        for group in auth.revocation_groups(self.principal, self.scope):
            try:
                await self.channel_layer.group_add(group, self.channel_name)
            except Exception as exc:  # Redis restarting: a key is still re-checked before spending
                logger.warning("revocation group not joined", extra={"error": type(exc).__name__})
        self.checked_at = asyncio.get_running_loop().time()
        await self.accept()
        self.accepted = self.counted = True
        metrics.OPEN_SOCKETS.inc()

    async def dispatch(self, message: dict) -> None:
        # Channels closes stale ORM connections around every message it dispatches: a hop to
        # the database thread for each frame received, ~4% of the server's CPU per turn
        # (bench/throughput.py --profile). A frame's work holds no ORM connection between
        # frames (on PostgreSQL a turn's writes bypass the ORM, chat/turns/pgpool.py); connect,
        # disconnect and the heartbeat (database_sync_to_async, every few seconds, on the same
        # thread) still close them.
        if message["type"] == "websocket.receive":
            await self.websocket_receive(message)
        else:
            await super().dispatch(message)

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        """Called with each frame; every refusal becomes one `error` frame and the socket stays open."""
        if self.refused:
            return  # closing: nothing more is done for this socket
        async with self.answering():
            if text_data is None:
                raise ClientError(ErrorCode.BINARY_FRAME, "Binary frames are not supported; send JSON text.")
            request = protocol.parse_text(text_data, max_message_chars=settings.R2D2_MAX_MESSAGE_CHARS)
            handler = self.HANDLERS.get(type(request), ChatConsumer.unhandled)
            await handler(self, request)

    @contextlib.asynccontextmanager
    async def answering(self) -> AsyncIterator[None]:
        """Around the handling of a request: every refusal becomes one `error` frame, a bug `internal_error`."""
        try:
            yield
        except ClientError as exc:
            metrics.rejected(exc.code)
            if not self.refused:  # a refused socket was sent its one `unauthorized` frame
                await self.send_frame(protocol.error(exc.code, exc.message))
        except Exception as exc:
            if storage.failed(exc) is not None:
                # The database or Redis stayed down past the retry window (chat/ops/storage.py): no bug of ours,
                # and the outage is logged once, not with a traceback per frame.
                refusal = storage_unavailable()
                metrics.rejected(refusal.code)
                await self.send_frame(protocol.error(refusal.code, refusal.message))
                return
            # A bug must cost one frame, not the socket (Channels would close it with 1011).
            logger.exception("frame handling failed")
            await self.send_frame(protocol.error(ErrorCode.INTERNAL_ERROR, "R2D2 failed to handle that frame."))

    async def disconnect(self, code: int) -> None:
        """Called when the socket closes: its sessions end, or carry on detached if resumable."""
        self.uncount()
        await self.finish()

    def uncount(self) -> None:
        if getattr(self, "counted", False):  # connect() accepted it: the socket was counted
            self.counted = False
            metrics.OPEN_SOCKETS.dec()

    async def finish(self) -> None:
        """Let go of everything this socket held (once): its revocation groups and its sessions."""
        if getattr(self, "finished", True):
            return
        self.finished = True
        watch.forget(self)
        await self.release_all()  # first: Redis may be down, and the sessions must not wait for it
        for group in auth.revocation_groups(getattr(self, "principal", principals.ANONYMOUS), self.scope):
            try:
                await self.channel_layer.group_discard(group, self.channel_name)
            except Exception as exc:  # Redis restarting: the group's entry expires on its own
                logger.info("revocation group not left", extra={"error": type(exc).__name__})

    async def release_all(self) -> None:
        """Let go of every session: each ends, or carries on detached if resumable (the socket is closing)."""
        for waiting, _ in getattr(self, "taking_over", {}).values():
            waiting.stop()  # a take-over already claiming completes, and `hold` detaches its session
        held, self.sessions = list(getattr(self, "sessions", {}).values()), {}
        await asyncio.gather(*(h.detach(self) for h in held), return_exceptions=True)

    async def send_frame(self, text: str) -> None:
        await flow.writable(self.scope)  # waits while the client is behind (chat/edge/flow.py)
        await self.send(text_data=text)

    def dropped(self, session_id: uuid.UUID) -> None:
        """The holder let go of the session (ended, released, resumed elsewhere): it is not this socket's now."""
        self.sessions.pop(session_id, None)
        waiting = self.taking_over.get(session_id)
        if waiting is not None:
            waiting[0].stop()

    # Actions ---------------------------------------------------------------

    async def start_session(self, request: SessionStart) -> None:
        await self.still_authorized()
        earlier = await self.earlier_conversation(request.continue_session_id)
        model = request.gpt_model or (earlier.session.model if earlier else settings.R2D2_DEFAULT_MODEL)
        if settings.R2D2_ALLOWED_MODELS and model not in settings.R2D2_ALLOWED_MODELS:
            raise ClientError(
                ErrorCode.MODEL_NOT_ALLOWED,
                f"Model not allowed here; choose one of: {', '.join(settings.R2D2_ALLOWED_MODELS)}.",
            )
        if len(self.sessions) >= settings.R2D2_MAX_SESSIONS_PER_CONNECTION:
            raise ClientError(
                ErrorCode.TOO_MANY_SESSIONS,
                f"This connection already has {len(self.sessions)} open sessions; end one first.",
            )
        drain.refuse_if_draining()
        quotas.check_model(self.principal, model)
        if self.principal.is_anonymous:
            _take(self.start_rate, "sessions")
        started, token = await holder.start(
            self,
            model=model,
            principal=self.principal,
            resumable=request.resumable,
            client_address=self.client_address,
            memory=earlier,
        )
        self.sessions[started.session_id] = started
        logger.info(
            "session started", extra={"session_id": str(started.session_id), "model": model, "resumable": bool(token)}
        )
        if token is not None:
            await self.send_frame(protocol.resumable_session_start(started.session_id, token))
        else:
            await self.send_frame(protocol.session_start(started.session_id))

    async def post_message(self, request: PostMessage) -> None:
        drain.refuse_if_draining()  # first: a session this process just released is not "another's"
        if request.session_id in self.taking_over:
            self.taking_over[request.session_id][1].append(request)  # posted once it is held here, in order
            return
        if request.session_id not in self.sessions and watch.watched_by(self, request.session_id):
            await self.still_authorized()
            return await watch.post(self, request)  # into a session this socket watches, held elsewhere
        await self.post_held(request)

    async def post_held(self, request: PostMessage) -> None:
        held = await self.held(request.session_id)
        await self.still_authorized()
        # Nothing reaches the model over a quota: the holder admits the message, then accepts it.
        await held.post(request, tally=self.own_tally(), gate=self.message_gate())

    async def end_session(self, request: SessionEnd) -> None:
        waiting = self.taking_over.get(request.session_id)
        if waiting is not None:  # being taken over: its holder elsewhere ends it, as for another of our sockets
            waiting[0].stop()
            await lifecycle.request_end(request.session_id, EndReason.CLIENT, wait=2.0)
            await self.send_frame(protocol.session_end())
            return
        held = await self.held(request.session_id, or_mine=True)
        if isinstance(held, Holder):
            await held.end(EndReason.CLIENT, protocol.session_end())
            return
        # Held by another connection of this principal: its holder ends it and tells its client.
        await lifecycle.request_end(request.session_id, EndReason.CLIENT, wait=2.0)
        await self.send_frame(protocol.session_end())

    async def cancel_turn(self, request: Cancel) -> None:
        if request.session_id not in self.sessions and watch.watched_by(self, request.session_id):
            return await watch.cancel(self, request)
        held = await self.held(request.session_id, or_mine=True)
        if isinstance(held, Holder):
            if not held.conversation.cancel():
                raise ClientError(ErrorCode.NOTHING_TO_CANCEL, "Nothing is being generated in this session.")
            return
        if not held.owner_channel:  # released: nothing runs until a client resumes it
            raise ClientError(ErrorCode.NOTHING_TO_CANCEL, "Nothing is being generated in this session.")
        # Held by another connection of this principal, maybe in another process: ask its holder, through
        # its process's channel; its client gets processing_end, and this socket `cancelled` or an error.
        event = {"type": "session.cancel", "session_id": str(request.session_id), "reply_to": self.channel_name}
        await self.channel_layer.send(held.owner_channel, event)

    async def list_models(self, request: ListModels) -> None:
        await self.send_frame(protocol.models(llm.models(only=self.principal.limits.models)))

    async def resume_session(self, request: Resume) -> None:
        drain.refuse_if_draining()
        resumed = await resume.resume(self, self.principal, request.session_id, request.resume_token, request.last_seq)
        if isinstance(resumed, resume.TakeOver):
            # Its holder elsewhere is letting go (up to 30 s): this socket goes on handling frames meanwhile.
            earlier = self.taking_over.get(resumed.session_id)
            self.taking_over[resumed.session_id] = (resumed, earlier[1] if earlier else [])
            holder.spawn(self.hold(resumed))
        elif resumed.socket is self:
            self.sessions[resumed.session_id] = resumed

    async def hold(self, waiting: resume.TakeOver) -> None:
        """A take-over ended: hold the session it claimed, then post what the client sent meanwhile, in order."""
        taken = await waiting.result()
        entry = self.taking_over.get(waiting.session_id)
        posts = entry[1] if entry is not None and entry[0] is waiting else []
        if taken is not None and taken.socket is self:
            if self.finished:  # closed while it was claimed
                await taken.detach(self)
            else:
                self.sessions[taken.session_id] = taken
        while posts and not self.finished:
            async with self.answering():
                await self.post_held(posts.pop(0))
        if entry is not None and self.taking_over.get(waiting.session_id) is entry:
            del self.taking_over[waiting.session_id]

    async def usage(self, request: Usage) -> None:
        """The principal's use against its limits; an anonymous socket's own figures."""
        figures = await quotas.figures(self.principal, tally=self.own_tally(), socket_sessions=len(self.sessions))
        await self.send_frame(protocol.usage(figures))

    async def watch_session(self, request: Watch) -> None:
        await watch.watch(self, self.principal, request.session_id)

    async def unwatch_session(self, request: Unwatch) -> None:
        await watch.unwatch(self, request.session_id)

    async def list_sessions(self, request: ListSessions) -> None:
        await self.send_frame(protocol.sessions(await watch.sessions(self.principal)))

    async def unhandled(self, request: Request) -> None:
        raise ClientError(ErrorCode.UNKNOWN_ACTION, "This server does not handle that action.")

    #: Request type → action. A new action is one parser in chat/protocol/__init__.py and one entry here.
    HANDLERS: dict[type, Callable[[ChatConsumer, Request], Awaitable[None]]] = {
        SessionStart: start_session,
        PostMessage: post_message,
        SessionEnd: end_session,
        Cancel: cancel_turn,
        ListModels: list_models,
        Resume: resume_session,
        Usage: usage,
        Watch: watch_session,
        Unwatch: unwatch_session,
        ListSessions: list_sessions,
    }

    # Channel-layer events --------------------------------------------------

    async def session_cancelled(self, event: dict) -> None:
        """Called on a `session.cancelled` event: the holder of another socket's session answered this
        socket's `chatbot_cancel`."""
        session_id = uuid.UUID(event["session_id"])
        if event["cancelled"]:
            await self.send_frame(protocol.cancelled(session_id))
        else:
            await self.send_frame(
                protocol.error(ErrorCode.NOTHING_TO_CANCEL, "Nothing is being generated in this session.")
            )

    async def principal_revoked(self, event: dict) -> None:
        """Called on a `principal.revoked` event: this socket's key was revoked, or its user signed out,
        changed their password or was deactivated (in any process)."""
        await self.refuse(event.get("message", "That API key has been revoked."), revoked=event.get("revoked", True))

    # Helpers ---------------------------------------------------------------

    async def held(self, session_id: uuid.UUID, *, or_mine: bool = False) -> Holder | ChatSession:
        """The session this connection holds, or the ClientError that says why not.

        With `or_mine`, the session's row when another connection of the same principal holds it."""
        held = self.sessions.get(session_id)
        if held is not None:
            return held
        session = await lifecycle.get(session_id)
        if session is None:
            raise ClientError(ErrorCode.SESSION_NOT_FOUND, "No session has that session_id.")
        if not session.is_live:
            raise ClientError(ErrorCode.SESSION_ENDED, "That session has ended; start a new one.")
        if self.principal.owns(session) or session_id in self.taking_over:  # or being taken over for this socket
            if or_mine:
                return session
            raise ClientError(
                ErrorCode.SESSION_NOT_OWNED,
                "Another of your connections holds that session; post there, or start a session here "
                "with continue_session_id to carry on its conversation.",
            )
        raise ClientError(ErrorCode.SESSION_NOT_OWNED, "That session belongs to another connection.")

    async def earlier_conversation(self, session_id: uuid.UUID | None) -> history.Memory | None:
        """The conversation `continue_session_id` names, if this principal may continue it."""
        if session_id is None:
            return None
        earlier = await history.load(session_id)
        if earlier is None:
            raise ClientError(ErrorCode.SESSION_NOT_FOUND, "No session has that continue_session_id.")
        if not self.principal.owns(earlier.session):
            raise ClientError(ErrorCode.SESSION_NOT_OWNED, "Only its own sessions can be continued.")
        return earlier

    async def still_authorized(self) -> None:
        """Before spending: re-check the key when the last check is old (revocation may not have reached us)."""
        if self.principal.api_key_id is None:
            return
        now = asyncio.get_running_loop().time()
        if now - self.checked_at < settings.R2D2_AUTH_RECHECK_SECONDS:
            return
        if not await auth.still_valid(self.principal):
            await self.refuse("That API key has been revoked.", revoked=True)
            raise ClientError(ErrorCode.UNAUTHORIZED, "That API key has been revoked.")
        self.checked_at = now

    def message_gate(self) -> Callable[[], None] | None:
        """An anonymous socket's own limit of messages a minute (a principal's is its quota)."""
        if not self.principal.is_anonymous:
            return None
        return lambda: _take(self.post_rate, "messages")

    def own_tally(self) -> counters.Tally:
        """This socket's own figures (what `chatbot_usage` answers when it is anonymous), made at first use:
        an idle socket holds none."""
        tally = self.__dict__.get("tally")
        if tally is None:
            tally = self.tally = counters.Tally()
        return tally

    async def refuse(self, message: str, *, revoked: bool = False) -> None:
        """One `unauthorized` frame, then close with 4401 (the socket is accepted first so the frame arrives).
        `revoked`: the principal may spend no more, and its sessions end as `revoked`."""
        if self.refused:
            return
        self.refused = True
        if not self.accepted:
            await self.accept()
            self.accepted = True
        await self.send_frame(protocol.error(ErrorCode.UNAUTHORIZED, message))
        await self.close(code=auth.UNAUTHORIZED_CLOSE_CODE)
        if revoked:
            held, self.sessions = list(self.sessions.values()), {}
            await asyncio.gather(*(h.end(EndReason.REVOKED) for h in held), return_exceptions=True)
        await self.release_all()  # now, not when the client acknowledges the close: no more spending
        extra = {"principal": self.principal.label, "reason": message}
        throttle.warn_throttled(logger, "connection refused", key=throttle.client(), extra=extra, level=logging.INFO)


def _take(bucket: TokenBucket, what: str) -> None:
    if not bucket.take():
        raise ClientError(ErrorCode.RATE_LIMITED, f"Too many {what}; try again in {bucket.retry_after():.0f} s.")
