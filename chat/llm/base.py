"""What every model provider shares: the reply being filled in, the error it raises, its interface."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

from chat.protocol.errors import ClientError, ErrorCode


@dataclass(slots=True)
class Reply:
    """What a model call reported besides its text (the text is what `generate` yields: the caller keeps it)."""

    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None
    headers_received: bool = False  # the model began answering (a later failure cut it off)
    # The model that answered, as routed (e.g. `azure/gpt-4o-mini`), and the one asked for: they differ when
    # a fallback chain moved on (chat/llm/__init__.py). Tokens and cost are counted at the first's price.
    model: str = ""
    requested: str = ""
    # The request went to the model and was not refused: from here a cancel, a timeout or a cut
    # costs at least the prompt (chat/accounts/quotas.py). Cleared when an attempt is refused
    # (an error status) or never connects: the model did no work.
    sent: bool = False

    @property
    def latency_ms(self) -> int:
        return int(((self.finished or time.monotonic()) - self.started) * 1000)


class Deadlines:
    """A model call's three deadlines, in event-loop time: the first chunk (connect, response headers
    and the first chunk of the body, retries included), each gap between chunks after it, and the
    whole reply. Providers bound each wait on the model by `next()` and call `arrived()` whenever
    the model sends something, so a reply that keeps streaming is never cut before the last."""

    __slots__ = ("_loop", "first_by", "idle", "end_by", "receiving")

    def __init__(self, *, first: float, idle: float, whole: float) -> None:
        self._loop = asyncio.get_running_loop()
        now = self._loop.time()
        self.first_by = now + first
        self.idle = idle
        self.end_by = now + whole
        self.receiving = False  # the first chunk came

    def within(self, first: float) -> Deadlines:
        """These deadlines for one member of a fallback chain: its first chunk due within `first`
        seconds as well (never later than the turn's), the idle and whole-reply ones unchanged."""
        member = Deadlines.__new__(Deadlines)
        member._loop, member.idle, member.end_by, member.receiving = self._loop, self.idle, self.end_by, False
        member.first_by = min(self.first_by, self._loop.time() + first)
        return member

    def next(self) -> float:
        """When the next thing from the model must have arrived by."""
        if not self.receiving:
            return min(self.first_by, self.end_by)
        return min(self._loop.time() + self.idle, self.end_by)

    def arrived(self) -> None:
        """The model sent something: from now on, only the idle and whole-reply deadlines apply."""
        self.receiving = True

    def missed(self) -> str:
        """Which deadline a timeout was (for the log): first_chunk, idle or whole_reply."""
        if self._loop.time() >= self.end_by:
            return "whole_reply"
        return "idle" if self.receiving else "first_chunk"


class UpstreamError(ClientError):
    """A model call that failed. `retryable`: another attempt may succeed (if it fits the deadline);
    `retry_after`: the wait the provider asked for, if it said; `ours`: R2D2's own failure (it could
    not read its credentials), which neither moves a fallback chain on nor counts against the upstream."""

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        *,
        retryable: bool = False,
        retry_after: float | None = None,
        ours: bool = False,
    ) -> None:
        super().__init__(code, message)
        self.retryable = retryable
        self.retry_after = retry_after
        self.ours = ours


def interrupted() -> UpstreamError:
    return UpstreamError(ErrorCode.UPSTREAM_STREAM_INTERRUPTED, "The model's answer was cut off midway.")


def timed_out() -> UpstreamError:
    return UpstreamError(ErrorCode.UPSTREAM_TIMEOUT, "The model did not answer in time.")


def unavailable() -> UpstreamError:
    return UpstreamError(ErrorCode.UPSTREAM_UNAVAILABLE, "The model server could not be reached.", retryable=True)


def connection_failed(exc: BaseException) -> bool:
    """True when the cause chain holds a failure to connect (refused, reset, no route, unresolvable host).

    Transports report these under many names (aiohttp's ClientConnectorError is itself an
    OSError, and its connect timeout may carry a refused connection underneath); the
    operating system's error underneath says what happened.
    `TimeoutError` is an OSError too, and is the one that is not a connection failure.
    """
    seen: BaseException | None = exc
    for _ in range(10):
        if seen is None:
            return False
        if isinstance(seen, OSError) and not isinstance(seen, TimeoutError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


class Provider(Protocol):
    """One way of reaching models. `generate` makes one attempt: the caller retries and owns the deadline."""

    name: str

    def generate(
        self,
        *,
        model: str,
        messages: list[dict[str, str]],
        stream: bool,
        reply: Reply,
        deadlines: Deadlines,
        max_output_tokens: int | None = None,
    ) -> AsyncIterator[str]:
        """Yield the reply's text (one chunk when not streaming), filling `reply`; `max_output_tokens`
        is sent as the request's output limit (None: the model's own).

        Each wait on the model is bounded by `deadlines.next()` and may raise TimeoutError
        (`deadlines.arrived()` after each thing the model sends); every other failure is an
        `UpstreamError`. Closing the iterator (the turn was cancelled) closes the upstream request.
        """
        ...

    def is_configured(self) -> bool:
        """True when this provider can reach a model with the settings given."""
        ...

    async def close(self) -> None:
        """Release the running loop's connections (tests, and anything whose loop ends)."""
        ...
