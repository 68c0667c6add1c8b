"""chat/sessions/feed.py: how a holder numbers its frames and knows whether a reply is open, for its watchers."""

from __future__ import annotations

import uuid

from chat import protocol
from chat.protocol.branches import with_ids
from chat.sessions.feed import Marks, group


def test_every_frame_is_numbered_from_where_the_session_stood():
    marks = Marks(sent=7)  # a resumable session taken over at seq 7
    assert [marks.note(protocol.processing_start()), marks.note(protocol.message_delta("a"))] == [8, 9]


def test_a_reply_is_open_from_processing_start_to_its_message_or_processing_end():
    marks = Marks()
    marks.note(protocol.processing_start())
    assert marks.open and marks.epoch == 1
    marks.note(protocol.message_delta("processing_end"))  # a delta that says so closes nothing
    marks.note(protocol.message_delta(""))
    assert marks.open and marks.epoch == 1
    marks.note(protocol.message("Echo: hi"))
    assert not marks.open and marks.epoch == 2
    marks.note(protocol.processing_end())
    assert not marks.open and marks.epoch == 3

    # A cancelled or failed turn has no `message`: its processing_end closes it.
    marks.note(protocol.processing_start())
    marks.note(protocol.error("upstream_timeout", "The model did not answer in time."))
    assert marks.open
    marks.note(protocol.processing_end())
    assert not marks.open and marks.sent == 8


def test_a_turn_asked_with_ids_or_naming_its_model_opens_and_closes_its_reply_too():
    marks = Marks()
    marks.note(with_ids(protocol.processing_start(), message_id=4))
    assert marks.open
    marks.note(with_ids(protocol.processing_end_with_model("gpt-4o"), message_id=4, reply_id=5))
    assert not marks.open and marks.epoch == 2


def test_one_group_per_session():
    session_id = uuid.UUID("41eb27a0-d382-40c4-ad38-fbd1cb629b7f")
    assert group(session_id) == "watch.41eb27a0d38240c4ad38fbd1cb629b7f"


async def test_a_watched_holder_keeps_its_last_frames_within_a_bound(monkeypatch, settings):
    """For a watcher's gap: the recent frames, at most RECENT_FRAMES and RECENT_BYTES (the last one always)."""
    from chat.sessions import feed

    settings.REDIS_URL = ""
    monkeypatch.setattr(feed, "RECENT_FRAMES", 3)
    monkeypatch.setattr(feed, "RECENT_BYTES", 100)
    kept = feed.Feed(uuid.UUID(int=1))
    for seq in range(1, 6):
        kept.publish(seq, f"frame {seq}")
    assert kept.after(0, 5) == [(3, "frame 3"), (4, "frame 4"), (5, "frame 5")]
    assert kept.after(3, 4) == [(4, "frame 4")]
    kept.publish(6, "x" * 500)
    assert kept.after(0, 6) == [(6, "x" * 500)]
