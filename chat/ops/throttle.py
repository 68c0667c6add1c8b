"""Log lines a client can cause at will: at most one per client per minute, with a count of the rest.

A client can make the server log a warning as often as it likes: a wrong resume token, a
failed sign-in, a page that does not exist, a model name the model server refuses. Written
every time, one client fills the log and buries everything else. So such a line is written
the first time a key (the client's address, as a rule) causes it, then at most once per
WINDOW_SECONDS. The lines dropped meanwhile are counted: the next line written for that key
carries the count as `suppressed`; a key that falls silent has its count written as a line
of its own (the same message, `suppressed` set) by the next throttled line after its window,
whoever causes it.

Two ways in, sharing one table:
- `warn_throttled(logger, message, key=..., extra=...)` at a call site of R2D2's own;
- `ClientTriggeredFilter` on the log handler, for what Django and django-axes log about a
  request (a 4xx, a bad Host, a CSRF failure, a failed sign-in), keyed by the request's client.

The table is bounded (MAX_KEYS): past it, new keys share one entry per message, so an
attacker with many addresses still costs at most one line per message per window.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from chat.ops.addresses import address_group

WINDOW_SECONDS = 60.0
MAX_KEYS = 10_000
# Marks the line that reports a silent key's count, so the filter lets it through as it is.
_SUMMARY = "_throttle_summary"

#: The client of the WebSocket connection the running task serves (set by chat/edge/connection_limits.py;
#: tasks a connection starts inherit it), for call sites that have no request at hand.
CLIENT: ContextVar[str | None] = ContextVar("r2d2_client", default=None)


def client() -> str | None:
    """The running connection's client (its address, IPv6 by /64), or None outside one."""
    return CLIENT.get()


@dataclass(slots=True)
class _Window:
    opened: float
    logger: logging.Logger
    level: int
    message: str
    extra: dict[str, Any] = field(default_factory=dict)
    suppressed: int = 0


class Throttle:
    """Which lines to write: one per key per window (thread-safe: Django's sync views log from threads)."""

    def __init__(
        self, window: float = WINDOW_SECONDS, max_keys: int = MAX_KEYS, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.window = window
        self.max_keys = max_keys
        self.clock = clock
        self._windows: dict[Hashable, _Window] = {}
        self._lock = threading.Lock()
        self._next_sweep = 0.0

    def admit(
        self, key: Hashable, *, logger: logging.Logger, level: int, message: str, extra: dict[str, Any] | None = None
    ) -> int | None:
        """None: drop the line (it is counted). Otherwise write it: the number of its key's lines dropped before it."""
        now = self.clock()
        with self._lock:
            current = self._windows.get(key)
            if current is not None and now - current.opened < self.window:
                current.suppressed += 1
                return None
            silent = self._sweep(now, keep=key)
            if current is None and len(self._windows) >= self.max_keys:
                key = ("overflow", logger.name, message)
                current = self._windows.get(key)
                if current is not None and now - current.opened < self.window:
                    current.suppressed += 1
                    return None
            suppressed = current.suppressed if current is not None else 0
            self._windows[key] = _Window(now, logger, level, message, dict(extra or {}))
        for window in silent:  # outside the lock: writing a line may come back here
            window.logger.log(
                window.level, window.message, extra={**window.extra, "suppressed": window.suppressed, _SUMMARY: True}
            )
        return suppressed

    def _sweep(self, now: float, keep: Hashable) -> list[_Window]:
        """Forget windows that ended (at most once a second); returns those with a count still to report."""
        if now < self._next_sweep:
            return []
        self._next_sweep = now + 1.0
        ended = [k for k, w in self._windows.items() if now - w.opened >= self.window and k != keep]
        return [w for w in (self._windows.pop(k) for k in ended) if w.suppressed]


THROTTLE = Throttle()


def warn_throttled(
    logger: logging.Logger,
    message: str,
    *,
    key: Hashable,
    extra: dict[str, Any] | None = None,
    level: int = logging.WARNING,
) -> None:
    """`logger.warning(message, extra=extra)`, at most once per `key` (a client's address) per minute.

    A line written after others were dropped carries `suppressed`: how many."""
    suppressed = THROTTLE.admit((logger.name, message, key), logger=logger, level=level, message=message, extra=extra)
    if suppressed is None:
        return
    logger.log(level, message, extra={**(extra or {}), **({"suppressed": suppressed} if suppressed else {})})


def _request_client(record: logging.LogRecord) -> str | None:
    request = getattr(record, "request", None)
    meta = getattr(request, "META", None)
    address = meta.get("REMOTE_ADDR") if isinstance(meta, dict) else None
    return address_group(address) if address else None


def client_triggered(record: logging.LogRecord) -> Hashable | None:
    """The throttle key of a line a client causes at will, or None for every other line.

    - `django.request` 4xx (a missing page, a refused /metrics, a sign-in locked out) and
      `django.security.*` (a Host outside ALLOWED_HOSTS, a CSRF failure): by the request's client;
    - `axes` warnings (a failed sign-in): their text names the client (chat/accounts/lockout.py).
    Server errors (5xx) are never throttled.
    """
    if record.levelno < logging.WARNING or getattr(record, _SUMMARY, False):
        return None
    if record.name == "django.request":
        status = getattr(record, "status_code", None)
        if not (isinstance(status, int) and 400 <= status < 500):
            return None
        return (record.name, record.msg, _request_client(record))
    if record.name.startswith("django.security"):
        return (record.name, record.msg, _request_client(record))
    if record.name.startswith("axes"):
        return (record.name, record.getMessage())
    return None


class ClientTriggeredFilter(logging.Filter):
    """On the log handler (r2d2site/settings.py LOGGING): throttles what `client_triggered` picks out."""

    def __init__(self, name: str = "", throttle: Throttle | None = None) -> None:
        super().__init__(name)
        self.throttle = throttle or THROTTLE

    def filter(self, record: logging.LogRecord) -> bool:
        key = client_triggered(record)
        if key is None:
            return True
        suppressed = self.throttle.admit(
            key,
            logger=logging.getLogger(record.name),
            level=record.levelno,
            message=record.getMessage(),
            extra=_context(record),
        )
        if suppressed is None:
            return False
        if suppressed:
            record.suppressed = suppressed
        return True


def _context(record: logging.LogRecord) -> dict[str, Any]:
    """What a silent key's summary line repeats of the record: its status, never the request object."""
    status = getattr(record, "status_code", None)
    return {"status_code": status} if status is not None else {}
