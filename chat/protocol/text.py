"""Repairing model text so that it can be stored and sent whatever the model emits."""

from __future__ import annotations


class TextRepair:
    """Feed a stream's chunks in order; get back text with no NUL and no unpaired surrogate.

    A surrogate pair split across two chunks (one JSON escape each) is rejoined;
    an unpaired surrogate becomes U+FFFD. PostgreSQL refuses NUL in text, and
    neither UTF-8 nor a WebSocket text frame can carry a lone surrogate.
    """

    def __init__(self) -> None:
        self._pending = ""  # a high surrogate that may pair with the next chunk's first character

    def feed(self, chunk: str) -> str:
        text = self._pending + chunk
        self._pending = ""
        if text and "\ud800" <= text[-1] <= "\udbff":
            text, self._pending = text[:-1], text[-1]
        return clean(text)

    def flush(self) -> str:
        """What is left at the end of the stream (a high surrogate nothing followed)."""
        text, self._pending = self._pending, ""
        return clean(text)


def clean(text: str) -> str:
    """`text` without NUL, its surrogate pairs joined, unpaired surrogates replaced by U+FFFD."""
    if "\x00" in text:
        text = text.replace("\x00", "")
    if not has_surrogates(text):
        return text
    return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


def has_surrogates(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def storable(text: str) -> bool:
    """True when `text` can be stored and sent as it is (no NUL, no surrogate)."""
    return "\x00" not in text and not has_surrogates(text)
