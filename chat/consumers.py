"""The WebSocket consumer: parse a frame, dispatch on its action, send frames back.

Everything slow (the model call) runs in each session's `Conversation` task, so
the socket keeps reading while a reply is generated, and a cancel or a closed
socket can stop it.
"""

from __future__ import annotations

import asyncio
import logging
import uuid

from channels.generic.websocket import AsyncWebsocketConsumer
from django.conf import settings

from chat import protocol, services
from chat.conversation import Conversation
from chat.limits import TokenBucket
from chat.models import EndReason
from chat.operator import session_group
from chat.protocol import Cancel, ErrorCode, PostMessage, ProtocolError, SessionEnd, SessionStart

logger = logging.getLogger(__name__)


class ChatConsumer(AsyncWebsocketConsumer):
    async def connect(self) -> None:
        """Called when a WebSocket connection is opened (Origin was already checked)."""
        self.conversations: dict[uuid.UUID, Conversation] = {}
        self.rate = TokenBucket(settings.R2D2_RATE_LIMIT_PER_MINUTE)
        client = self.scope.get("client")
        self.client_address = client[0] if client else None
        await self.accept()

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        """Called with each frame; every refusal becomes one `error` frame."""
        try:
            if text_data is None:
                raise ProtocolError(ErrorCode.BINARY_FRAME, "Binary frames are not supported; send JSON text.")
            request = protocol.parse_text(text_data, max_message_chars=settings.R2D2_MAX_MESSAGE_CHARS)
            match request:
                case SessionStart():
                    await self.session_start(request)
                case PostMessage():
                    await self.post_message(request)
                case SessionEnd():
                    await self.end_session(request)
                case Cancel():
                    await self.cancel(request)
        except ProtocolError as exc:
            await self.send_frame(protocol.error(exc.code, exc.message))

    async def disconnect(self, code: int) -> None:
        """Called when the socket closes: stop every generation and end every session it owned."""
        conversations, self.conversations = getattr(self, "conversations", {}), {}
        if not conversations:
            return
        await asyncio.gather(*(c.close() for c in conversations.values()), return_exceptions=True)
        await services.end_sessions(session_ids=list(conversations), reason=EndReason.DISCONNECT)
        for session_id in conversations:
            await self.channel_layer.group_discard(session_group(session_id), self.channel_name)

    async def send_frame(self, text: str) -> None:
        await self.send(text_data=text)

    # Actions ---------------------------------------------------------------

    async def session_start(self, request: SessionStart) -> None:
        model = request.gpt_model or settings.R2D2_DEFAULT_MODEL
        if settings.R2D2_ALLOWED_MODELS and model not in settings.R2D2_ALLOWED_MODELS:
            raise ProtocolError(
                ErrorCode.MODEL_NOT_ALLOWED,
                f"Model not allowed here; choose one of: {', '.join(settings.R2D2_ALLOWED_MODELS)}.",
            )
        if len(self.conversations) >= settings.R2D2_MAX_SESSIONS_PER_CONNECTION:
            raise ProtocolError(
                ErrorCode.TOO_MANY_SESSIONS,
                f"This connection already has {len(self.conversations)} open sessions; end one first.",
            )
        session = await services.start_session(
            model=model, client_address=self.client_address, owner_channel=self.channel_name
        )
        self.conversations[session.id] = Conversation(session_id=session.id, model=model, send=self.send_frame)
        await self.channel_layer.group_add(session_group(session.id), self.channel_name)
        logger.info("session started", extra={"session_id": str(session.id), "model": model})
        await self.send_frame(protocol.session_start(session.id))

    async def post_message(self, request: PostMessage) -> None:
        conversation = await self.owned(request.session_id)
        conversation.check_capacity()
        if not self.rate.take():
            raise ProtocolError(
                ErrorCode.RATE_LIMITED,
                f"Too many messages; try again in {self.rate.retry_after():.0f} s.",
            )
        await services.add_user_message(
            session_id=request.session_id,
            content=request.user_message,
            system_message=request.system_message,
        )
        conversation.submit(request)

    async def end_session(self, request: SessionEnd) -> None:
        await self.owned(request.session_id)
        await self.close_session(request.session_id, EndReason.CLIENT)
        await self.send_frame(protocol.session_end())

    async def cancel(self, request: Cancel) -> None:
        conversation = await self.owned(request.session_id)
        if not conversation.cancel():
            raise ProtocolError(ErrorCode.NOTHING_TO_CANCEL, "Nothing is being generated in this session.")

    # Channel-layer events --------------------------------------------------

    async def session_end(self, event: dict) -> None:
        """Called on a `session.end` event: an operator ended one of this socket's sessions."""
        session_id = uuid.UUID(event["session_id"])
        if session_id not in self.conversations:
            return
        reason = EndReason(event.get("reason", EndReason.OPERATOR))
        await self.close_session(session_id, reason)
        await self.send_frame(protocol.session_ended_by_server(session_id, reason.value))

    # Helpers ---------------------------------------------------------------

    async def owned(self, session_id: uuid.UUID) -> Conversation:
        """The live session this connection owns, or the ProtocolError that says why not."""
        conversation = self.conversations.get(session_id)
        if conversation is not None:
            return conversation
        session = await services.get_session(session_id)
        if session is None:
            raise ProtocolError(ErrorCode.SESSION_NOT_FOUND, "No session has that session_id.")
        if not session.is_live:
            raise ProtocolError(ErrorCode.SESSION_ENDED, "That session has ended; start a new one.")
        raise ProtocolError(ErrorCode.SESSION_NOT_OWNED, "That session belongs to another connection.")

    async def close_session(self, session_id: uuid.UUID, reason: EndReason) -> None:
        conversation = self.conversations.pop(session_id)
        await conversation.close()
        await services.end_session(session_id=session_id, reason=reason)
        await self.channel_layer.group_discard(session_group(session_id), self.channel_name)
        logger.info("session ended", extra={"session_id": str(session_id), "reason": reason.value})
