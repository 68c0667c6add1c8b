"""The offline responder: a dev convenience so a fresh clone chats end to end with no model.

It says plainly that no model is configured, and shows that memory works: how many
earlier messages it was given and what the previous one said. Never used to test
the model integration (tests use a real local model server).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

from chat.llm.base import Deadlines, Reply

logger = logging.getLogger(__name__)

NOTICE = (
    "R2D2 has no model configured (set OPENAI_API_KEY, and OPENAI_BASE_URL for a "
    "self-hosted server), so this is the offline responder talking."
)


def answer(messages: list[dict[str, str]]) -> str:
    """What the offline responder says to a request's messages."""
    said = [m for m in messages if m["role"] != "system"]
    last = said[-1]["content"] if said else ""
    earlier = said[:-1]
    asked_before = [m["content"] for m in earlier if m["role"] == "user"]
    if not earlier:
        memory = "This is the first message of our conversation."
    else:
        count = f"{len(earlier)} earlier message{'s' if len(earlier) != 1 else ''}"
        memory = f"I was given {count}" + (
            f'; before this you said: "{_preview(asked_before[-1])}".' if asked_before else "."
        )
    return f"{NOTICE} You said: {_sentence(last)} {memory}"


def _sentence(text: str) -> str:
    """`text` ending as a sentence, so that the next one does not run into it ("Hello This is ...")."""
    text = text.rstrip()
    ends_a_sentence = text.rstrip("\"')]”’").endswith((".", "!", "?", "…"))
    return text if ends_a_sentence else text + "."


def _preview(text: str, limit: int = 80) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


class OfflineProvider:
    name = "offline"
    _warned = False

    def is_configured(self) -> bool:
        return True

    async def close(self) -> None:
        pass

    async def generate(
        self,
        *,
        model: str,
        messages: list[dict[str, str]],
        stream: bool,
        reply: Reply,
        deadlines: Deadlines,
        max_output_tokens: int | None = None,  # its answer is short: no cap to honour
    ) -> AsyncIterator[str]:
        if not OfflineProvider._warned:
            OfflineProvider._warned = True
            logger.warning("no model configured (OPENAI_API_KEY, OPENAI_BASE_URL unset): the offline responder answers")
        reply.headers_received = True
        for index, word in enumerate(answer(messages).split(" ")):
            await asyncio.sleep(0.01)
            yield word if index == 0 else " " + word
        reply.finished = time.monotonic()
