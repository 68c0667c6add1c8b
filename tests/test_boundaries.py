"""Where ideas live: each has one home, and this keeps it so."""

import re
import typing
from pathlib import Path

from chat import protocol
from chat.websocket.consumer import ChatConsumer

CHAT = Path(__file__).resolve().parent.parent / "chat"


def sources() -> dict[str, str]:
    return {
        str(path.relative_to(CHAT.parent)): path.read_text()
        for path in CHAT.rglob("*.py")
        if "migrations" not in path.parts
    }


def test_only_the_openai_provider_imports_openai():
    importers = {name for name, text in sources().items() if re.search(r"^\s*(import|from) openai\b", text, re.M)}
    assert importers == {"chat/llm/openai_compat.py"}


def test_only_the_bedrock_provider_creates_a_bedrock_client():
    creators = {name for name, text in sources().items() if "bedrock-runtime" in text}
    assert creators == {"chat/llm/bedrock.py"}


def test_only_the_session_lifecycle_writes_ended_at():
    writers = {name for name, text in sources().items() if re.search(r"ended_at\s*=\s*timezone", text)}
    assert writers == {"chat/sessions/lifecycle.py"}


def test_the_consumer_writes_no_messages():
    consumer = sources()["chat/websocket/consumer.py"]
    assert "chat.turns.messages" not in consumer and "ChatMessage" not in consumer


def test_every_action_has_a_handler():
    """Adding an action is one parser in protocol.py and one entry in ChatConsumer.HANDLERS; forgetting
    the second would answer `unknown_action`, so this catches it before a client does."""
    parsed = {typing.get_type_hints(parser)["return"] for parser in protocol.PARSERS.values()}
    assert parsed == set(ChatConsumer.HANDLERS)
