"""chat/ops/throttle.py: a line a client can cause at will is written at most once per key per minute,
with the count of those dropped; Django's own 4xx and security lines are throttled by client."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from django.test import Client

from chat.ops import throttle
from chat.ops.throttle import ClientTriggeredFilter, Throttle


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Lines(logging.Handler):
    """The records a handler with the throttle filter writes."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def messages(self) -> list[tuple[str, int]]:
        return [(r.getMessage(), getattr(r, "suppressed", 0)) for r in self.records]


@pytest.fixture
def clock(monkeypatch) -> Clock:
    """The module's own table on a clock the test moves."""
    clock = Clock()
    monkeypatch.setattr(throttle, "THROTTLE", Throttle(clock=clock))
    return clock


@pytest.fixture
def lines() -> Lines:
    logger = logging.getLogger("tests.throttle")
    handler = Lines()
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    yield handler
    logger.removeHandler(handler)
    logger.propagate = True


def warn(key: str, message: str = "resume refused: wrong token") -> None:
    throttle.warn_throttled(logging.getLogger("tests.throttle"), message, key=key, extra={"session_id": "s1"})


def test_one_line_per_key_per_minute_then_the_count(clock, lines):
    for _ in range(6):
        warn("203.0.113.9")
        clock.now += 5
    assert lines.messages() == [("resume refused: wrong token", 0)]
    assert lines.records[0].session_id == "s1"

    clock.now += 60  # the minute is over: the next line carries what was dropped
    warn("203.0.113.9")
    assert lines.messages()[-1] == ("resume refused: wrong token", 5)
    assert not hasattr(lines.records[0], "suppressed"), "a line with nothing dropped before it has no count"


def test_keys_and_messages_are_counted_apart(clock, lines):
    warn("203.0.113.9")
    warn("203.0.113.9")
    warn("198.51.100.7")
    warn("203.0.113.9", "another warning")
    assert lines.messages() == [
        ("resume refused: wrong token", 0),
        ("resume refused: wrong token", 0),
        ("another warning", 0),
    ]


def test_a_key_that_falls_silent_has_its_count_written(clock, lines):
    for _ in range(4):
        warn("203.0.113.9")
    clock.now += 61
    warn("198.51.100.7")  # any throttled line after the window reports the silent key's count
    assert lines.messages() == [
        ("resume refused: wrong token", 0),
        ("resume refused: wrong token", 3),
        ("resume refused: wrong token", 0),
    ]
    clock.now += 61
    warn("192.0.2.1")
    assert len(lines.records) == 4, "a count is reported once"


def test_many_addresses_share_one_entry_past_the_bound(monkeypatch, lines):
    clock = Clock()
    monkeypatch.setattr(throttle, "THROTTLE", Throttle(clock=clock, max_keys=3))
    for index in range(50):
        warn(f"2001:db8::{index}")
    assert len(lines.records) == 4  # three keys of their own, then one line for all the others


@contextmanager
def filtered(name: str) -> Iterator[Lines]:
    """What a handler with the settings' filter writes of logger `name`'s lines."""
    handler = Lines()
    handler.addFilter(ClientTriggeredFilter(throttle=throttle.THROTTLE))
    logging.getLogger(name).addHandler(handler)
    try:
        yield handler
    finally:
        logging.getLogger(name).removeHandler(handler)


@pytest.mark.django_db
def test_django_4xx_lines_are_throttled_by_client_and_5xx_never(clock, settings):
    settings.DEBUG = False
    client = Client()
    with filtered("django.request") as handler:
        for index in range(20):
            assert client.get(f"/no-such-page-{index}", REMOTE_ADDR="203.0.113.9").status_code == 404
        assert client.get("/no-such-page", REMOTE_ADDR="198.51.100.7").status_code == 404
        assert [m for m, _ in handler.messages()] == ["Not Found: /no-such-page-0", "Not Found: /no-such-page"]

        # Server errors are the operator's to see, every one.
        for _ in range(3):
            logging.getLogger("django.request").error("Internal Server Error: /", extra={"status_code": 500})
        assert len(handler.records) == 5


@pytest.mark.django_db
def test_a_host_outside_allowed_hosts_is_logged_once_a_minute_per_client(clock, settings):
    settings.DEBUG = False
    client = Client()
    with filtered("django.security.DisallowedHost") as handler:
        for _ in range(10):
            assert client.get("/", HTTP_HOST="evil.example", REMOTE_ADDR="2001:db8:1:2::5").status_code == 400
        # The same /64 is the same client.
        assert client.get("/", HTTP_HOST="evil.example", REMOTE_ADDR="2001:db8:1:2::6").status_code == 400
        assert client.get("/", HTTP_HOST="evil.example", REMOTE_ADDR="2001:db8:1:3::6").status_code == 400
        assert len(handler.records) == 2
        clock.now += 61
        assert client.get("/", HTTP_HOST="evil.example", REMOTE_ADDR="2001:db8:1:2::5").status_code == 400
        assert handler.records[-1].suppressed == 10
