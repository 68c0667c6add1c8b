"""chat/llm/openai_compat.py posts on its own aiohttp session, with the URL and headers it builds itself."""

import pytest

from chat.llm.base import Deadlines, Reply
from chat.llm.openai_compat import OpenAIProvider
from testkit.server import TEST_API_KEY


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
async def test_the_model_server_gets_the_key_and_a_json_body(fake_llm, stream):
    provider = OpenAIProvider()
    deadlines = Deadlines(first=10, idle=10, whole=10)
    try:
        messages = [{"role": "user", "content": "hi"}]
        parts = [
            c
            async for c in provider.generate(
                model="m", messages=messages, stream=stream, reply=Reply(), deadlines=deadlines
            )
        ]
    finally:
        await provider.close()
    assert "".join(parts) == "Echo: hi"
    [request] = fake_llm.requests
    assert request.headers["Authorization"] == f"Bearer {TEST_API_KEY}"
    assert request.headers["Content-Type"] == "application/json"
    assert request.headers["User-Agent"] == "R2D2"
    assert request.body == {"model": "m", "messages": messages} | (
        {"stream": True, "stream_options": {"include_usage": True}} if stream else {}
    )
