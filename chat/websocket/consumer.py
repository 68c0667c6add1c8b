"""The WebSocket consumer: parse a frame, check who may do it, dispatch, send frames back.

It reads like a table of actions (`HANDLERS`). Everything slow (the model call)
runs in each session's `Conversation`, so the socket keeps reading while a reply is
generated, and a cancel or a closed socket can stop it.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable

from channels.generic.websocket import AsyncWebsocketConsumer
from django.conf import settings

from chat import llm, protocol
from chat.accounts import auth, principals, quotas
from chat.accounts.limits import TokenBucket
from chat.edge import flow
from chat.models import EndReason
from chat.ops import metrics
from chat.protocol import Cancel, ListModels, PostMessage, Request, Resume, SessionEnd, SessionStart
from chat.protocol.errors import ClientError, ErrorCode
from chat.sessions import drain, history, lifecycle, resume
from chat.turns.conversation import Conversation

logger = logging.getLogger(__name__)


class ChatConsumer(AsyncWebsocketConsumer):
    async def connect(self) -> None:
        """Called when a WebSocket connection is opened (Origin and Host were already checked)."""
        self.conversations: dict[uuid.UUID, Conversation] = {}
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
            await self.channel_layer.group_add(group, self.channel_name)
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
        try:
            if text_data is None:
                raise ClientError(ErrorCode.BINARY_FRAME, "Binary frames are not supported; send JSON text.")
            request = protocol.parse_text(text_data, max_message_chars=settings.R2D2_MAX_MESSAGE_CHARS)
            handler = self.HANDLERS.get(type(request), ChatConsumer.unhandled)
            await handler(self, request)
        except ClientError as exc:
            metrics.rejected(exc.code)
            if not self.refused:  # a refused socket was sent its one `unauthorized` frame
                await self.send_frame(protocol.error(exc.code, exc.message))
        except Exception:
            # A bug must cost one frame, not the socket (Channels would close it with 1011).
            logger.exception("frame handling failed")
            await self.send_frame(protocol.error(ErrorCode.INTERNAL_ERROR, "R2D2 failed to handle that frame."))

    async def disconnect(self, code: int) -> None:
        """Called when the socket closes: stop every generation and end every session it held."""
        if getattr(self, "counted", False):  # connect() accepted it: the socket was counted
            metrics.OPEN_SOCKETS.dec()
        for group in auth.revocation_groups(getattr(self, "principal", principals.ANONYMOUS), self.scope):
            await self.channel_layer.group_discard(group, self.channel_name)
        await self.release_all()

    async def release_all(self) -> None:
        """Stop every generation and end every session this socket holds (it is closing)."""
        conversations, self.conversations = getattr(self, "conversations", {}), {}
        # A resumable session carries on without its socket, for the resume window.
        for session_id in list(conversations):
            held = resume.local(session_id)
            if held is not None and held.conversation is conversations[session_id]:
                held.detach(self)
                del conversations[session_id]
        metrics.LIVE_SESSIONS.dec(len(conversations))  # resumable sessions are not counted there
        if not conversations:
            return
        await asyncio.gather(*(c.close() for c in conversations.values()), return_exceptions=True)
        await lifecycle.end_many(session_ids=list(conversations), reason=EndReason.DISCONNECT)
        for session_id in conversations:
            await self.channel_layer.group_discard(lifecycle.group(session_id), self.channel_name)

    async def send_frame(self, text: str) -> None:
        await flow.writable(self.scope)  # waits while the client is behind (chat/edge/flow.py)
        await self.send(text_data=text)

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
        if len(self.conversations) >= settings.R2D2_MAX_SESSIONS_PER_CONNECTION:
            raise ClientError(
                ErrorCode.TOO_MANY_SESSIONS,
                f"This connection already has {len(self.conversations)} open sessions; end one first.",
            )
        drain.refuse_if_draining()
        quotas.check_model(self.principal, model)
        if self.principal.is_anonymous:
            _take(self.start_rate, "sessions")
        else:
            await quotas.check_sessions(self.principal)
        principal = {
            "user_id": self.principal.user_id,
            "api_key_id": self.principal.api_key_id,
            "continued_from_id": earlier.session.id if earlier else None,
        }
        token = None
        if request.resumable:
            session, token = await resume.start(self, model=model, **principal)
            conversation = self.conversations[session.id]
        else:
            session = await lifecycle.start(
                model=model, client_address=self.client_address, owner_channel=self.channel_name, **principal
            )
            conversation = Conversation(session_id=session.id, model=model, send=self.send_frame)
            self.conversations[session.id] = conversation
        conversation.on_usage = None if self.principal.is_anonymous else self.charge
        if earlier:
            conversation.system_message, conversation.history = earlier.system_message, earlier.history
        if token is not None:
            logger.info("session started", extra={"session_id": str(session.id), "model": model, "resumable": True})
            await self.send_frame(protocol.resumable_session_start(session.id, token))
            return
        metrics.LIVE_SESSIONS.inc()
        await self.channel_layer.group_add(lifecycle.group(session.id), self.channel_name)
        logger.info("session started", extra={"session_id": str(session.id), "model": model})
        await self.send_frame(protocol.session_start(session.id))

    async def post_message(self, request: PostMessage) -> None:
        conversation = await self.held(request.session_id)
        drain.refuse_if_draining()
        await self.still_authorized()
        if self.principal.is_anonymous:
            _take(self.post_rate, "messages")
        else:
            await quotas.check_message(self.principal)  # nothing reaches the model over a quota
        try:
            await conversation.accept(request)
        except ClientError as exc:
            if exc.code == ErrorCode.SESSION_ENDED:
                # Ended elsewhere while this socket held it (e.g. by a command that could not reach us).
                await self.close_session(request.session_id, reason=None)
            raise

    async def end_session(self, request: SessionEnd) -> None:
        if await self.held(request.session_id, or_mine=True) is None:
            # Held by another connection of this principal: its holder ends it and tells its client.
            await lifecycle.request_end(request.session_id, EndReason.CLIENT, wait=2.0)
        elif (held := resume.local(request.session_id)) is not None:
            await held.end(EndReason.CLIENT, protocol.session_end())
            return
        else:
            await self.close_session(request.session_id, EndReason.CLIENT)
        await self.send_frame(protocol.session_end())

    async def cancel_turn(self, request: Cancel) -> None:
        conversation = await self.held(request.session_id, or_mine=True)
        if conversation is None:
            # Held by another connection of this principal: ask its holder (its client gets processing_end).
            event = {"type": "session.cancel", "session_id": str(request.session_id)}
            await self.channel_layer.group_send(lifecycle.group(request.session_id), event)
            return
        if not conversation.cancel():
            raise ClientError(ErrorCode.NOTHING_TO_CANCEL, "Nothing is being generated in this session.")

    async def list_models(self, request: ListModels) -> None:
        await self.send_frame(protocol.models(llm.models(only=self.principal.limits.models)))

    async def resume_session(self, request: Resume) -> None:
        drain.refuse_if_draining()
        await resume.resume(self, request.session_id, request.resume_token, request.last_seq)

    async def unhandled(self, request: Request) -> None:
        raise ClientError(ErrorCode.UNKNOWN_ACTION, "This server does not handle that action.")

    #: Request type → action. A new action is one parser in chat/protocol.py and one entry here.
    HANDLERS: dict[type, Callable[[ChatConsumer, Request], Awaitable[None]]] = {
        SessionStart: start_session,
        PostMessage: post_message,
        SessionEnd: end_session,
        Cancel: cancel_turn,
        ListModels: list_models,
        Resume: resume_session,
    }

    # Channel-layer events --------------------------------------------------

    async def session_end(self, event: dict) -> None:
        """Called on a `session.end` event: one of this socket's sessions is ended from outside
        (an operator, or the orphan sweep)."""
        session_id = uuid.UUID(event["session_id"])
        if session_id not in self.conversations:
            return
        reason = EndReason(event.get("reason", EndReason.OPERATOR))
        await self.close_session(session_id, reason)
        await self.send_frame(protocol.session_ended_by_server(session_id, reason.value))

    async def resumed_elsewhere(self, session_id: uuid.UUID) -> None:
        """Another connection resumed one of this socket's resumable sessions: it is no longer ours."""
        self.conversations.pop(session_id, None)
        await self.send_frame(protocol.session_ended_by_server(session_id, "resumed_elsewhere"))

    async def session_cancel(self, event: dict) -> None:
        """Called on a `session.cancel` event: another connection of the same principal stops a generation."""
        conversation = self.conversations.get(uuid.UUID(event["session_id"]))
        if conversation is not None:
            conversation.cancel()

    async def principal_revoked(self, event: dict) -> None:
        """Called on a `principal.revoked` event: this socket's key was revoked, or its user signed out
        or was deactivated (in any process)."""
        await self.refuse(event.get("message", "That API key has been revoked."))

    # Helpers ---------------------------------------------------------------

    async def held(self, session_id: uuid.UUID, *, or_mine: bool = False) -> Conversation | None:
        """The live session this connection holds, or the ClientError that says why not.

        With `or_mine`, None when another connection of the same principal holds it."""
        conversation = self.conversations.get(session_id)
        if conversation is not None:
            return conversation
        session = await lifecycle.get(session_id)
        if session is None:
            raise ClientError(ErrorCode.SESSION_NOT_FOUND, "No session has that session_id.")
        if not session.is_live:
            raise ClientError(ErrorCode.SESSION_ENDED, "That session has ended; start a new one.")
        if self.principal.owns(session):
            if or_mine:
                return None
            raise ClientError(
                ErrorCode.SESSION_NOT_OWNED,
                "Another of your connections holds that session; post there, or start a session here "
                "with continue_session_id to carry on its conversation.",
            )
        raise ClientError(ErrorCode.SESSION_NOT_OWNED, "That session belongs to another connection.")

    async def earlier_conversation(self, session_id: uuid.UUID | None) -> history.Conversation | None:
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
            await self.refuse("That API key has been revoked.")
            raise ClientError(ErrorCode.UNAUTHORIZED, "That API key has been revoked.")
        self.checked_at = now

    async def refuse(self, message: str) -> None:
        """One `unauthorized` frame, then close with 4401 (the socket is accepted first so the frame arrives)."""
        if self.refused:
            return
        self.refused = True
        if not self.accepted:
            await self.accept()
            self.accepted = True
        await self.send_frame(protocol.error(ErrorCode.UNAUTHORIZED, message))
        await self.close(code=auth.UNAUTHORIZED_CLOSE_CODE)
        await self.release_all()  # now, not when the client acknowledges the close: no more spending
        logger.info("connection refused", extra={"principal": self.principal.label, "reason": message})

    def charge(self, reply: llm.Reply, request: list[dict[str, str]], text: str) -> None:
        """Conversation's usage hook: charge the model call's tokens to the principal's daily quota."""
        quotas.charge_in_background(self.principal, quotas.tokens_used(reply, request, text))

    async def close_session(self, session_id: uuid.UUID, reason: EndReason | None) -> None:
        """Stop holding a session; record `reason` unless it was already ended elsewhere (None)."""
        held = resume.local(session_id)
        if held is not None:
            await held.end(reason)
            return
        conversation = self.conversations.pop(session_id)
        metrics.LIVE_SESSIONS.dec()
        await conversation.close()
        if reason is not None:
            await lifecycle.end(session_id=session_id, reason=reason)
        await self.channel_layer.group_discard(lifecycle.group(session_id), self.channel_name)
        logger.info("session ended", extra={"session_id": str(session_id), "reason": reason or "elsewhere"})


def _take(bucket: TokenBucket, what: str) -> None:
    if not bucket.take():
        raise ClientError(ErrorCode.RATE_LIMITED, f"Too many {what}; try again in {bucket.retry_after():.0f} s.")
