"""A small protocol client over a real socket (the `websockets` library), for end-to-end tests."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import websockets

from testkit.contract import check_frame


class ProtocolClient:
    """Sends action frames and reads frames, keeping the exact text of each one received.

    Each received frame is checked against asyncapi.yaml, so no end-to-end test passes on an undocumented frame.
    """

    def __init__(self, connection: websockets.ClientConnection) -> None:
        self.connection = connection
        self.received: list[str] = []

    @classmethod
    async def connect(cls, url: str, **kwargs: Any) -> ProtocolClient:
        return cls(await websockets.connect(url, **kwargs))

    async def close(self) -> None:
        await self.connection.close()

    async def send(self, frame: dict[str, Any] | str | bytes) -> None:
        await self.connection.send(json.dumps(frame) if isinstance(frame, dict) else frame)

    async def recv_text(self, timeout: float = 10.0) -> str:
        text = await asyncio.wait_for(self.connection.recv(), timeout)
        self.received.append(text)
        check_frame(text)  # every frame the server sends must match the published asyncapi.yaml
        return text

    async def recv(self, timeout: float = 10.0) -> dict[str, Any]:
        return json.loads(await self.recv_text(timeout))

    async def start_session(self, **fields: Any) -> str:
        await self.send({"action": "chatbot_session_start", **fields})
        frame = await self.recv()
        assert frame["type"] == "session_start", frame
        return frame["data"]["session_id"]

    async def post(self, session_id: str, text: str, **fields: Any) -> list[dict[str, Any]]:
        """Send one message and return every frame up to and including processing_end."""
        await self.send({"action": "chatbot_post_message", "session_id": session_id, "user_message": text, **fields})
        return await self.until("processing_end")

    async def until(self, frame_type: str, timeout: float = 15.0) -> list[dict[str, Any]]:
        frames = []
        while True:
            frame = await self.recv(timeout)
            frames.append(frame)
            if frame["type"] == frame_type:
                return frames


async def seed_conversation(client: ProtocolClient) -> str:
    """The original service's whole conversation (start, a message with a system message, end), asserting
    every frame byte for byte as the seed sent it; returns the session id."""
    await client.send({"action": "chatbot_session_start", "gpt_model": "gpt-4o-mini"})
    start = await client.recv_text()
    session_id = json.loads(start)["data"]["session_id"]
    assert start == f'{{"type": "session_start", "data": {{"session_id": "{session_id}"}}}}'
    await client.send(
        {
            "action": "chatbot_post_message",
            "session_id": session_id,
            "system_message": "You are coll robot!",
            "user_message": "Please write me cool poem.",
        }
    )
    assert await client.recv_text() == '{"type": "processing_start", "data": null}'
    assert await client.recv_text() == '{"type": "message", "data": "Echo: Please write me cool poem."}'
    assert await client.recv_text() == '{"type": "processing_end", "data": null}'
    await client.send({"action": "chatbot_session_end", "session_id": session_id})
    assert await client.recv_text() == '{"type": "session_end", "data": null}'
    return session_id
