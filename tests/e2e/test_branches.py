"""Conversations people can reshape (issue 29): regenerate a reply, edit a message, switch branches, read the
history, over real sockets on the embedded defaults. Each model request (recorded by the fake model) must hold
exactly the path to the message answered, never a sibling branch."""

from __future__ import annotations

import json

import pytest
from asgiref.sync import sync_to_async

from chat.accounts import auth
from chat.models import ChatSession
from testkit.client import ProtocolClient
from testkit.fake_llm import Script
from tests.e2e.test_resume import SLOW, SLOW_REPLY

pytestmark = pytest.mark.django_db(transaction=True)


async def turn(client: ProtocolClient, action: str, session_id: str, **fields) -> list[dict]:
    """One turn asked for with ids on the wire: its frames up to processing_end."""
    await client.send({"action": action, "session_id": session_id, "with_ids": True, **fields})
    return await client.until("processing_end")


async def history(client: ProtocolClient, session_id: str) -> dict:
    await client.send({"action": "chatbot_history", "session_id": session_id})
    frame = await client.recv()
    assert frame["type"] == "history", frame
    return frame["data"]


async def refusal(client: ProtocolClient, frame: dict) -> str:
    await client.send(frame)
    answer = await client.recv()
    assert answer["type"] == "error", answer
    return answer["data"]["code"]


def asked(fake_llm) -> list[list[tuple[str, str]]]:
    """Each model request's messages, as (role, content)."""
    return [[(m["role"], m["content"]) for m in r.messages] for r in fake_llm.requests]


async def test_regenerate_twice_edit_the_first_message_and_switch_back(daphne, fake_llm):
    """The whole tree is in `history`, and every model request holds exactly the path to the message it answers."""
    client = await ProtocolClient.connect(daphne.url)
    session_id = await client.start_session()
    post = "chatbot_post_message"
    fake_llm.enqueue(Script(text="R1"), Script(text="R2"), Script(text="R2b"), Script(text="R2c"), Script(text="R1e"))

    one = await turn(client, post, session_id, user_message="one", system_message="Be brief.")
    u1, r1 = one[0]["message_id"], one[-1]["reply_id"]
    assert one[1] == {"type": "message", "data": "R1", "reply_id": r1}
    two = await turn(client, post, session_id, user_message="two")
    u2, r2 = two[0]["message_id"], two[-1]["reply_id"]

    again = await turn(client, "chatbot_regenerate", session_id)  # the leaf's reply
    assert again[0]["message_id"] == u2 and again[1]["data"] == "R2b"
    r2b = again[-1]["reply_id"]
    third = await turn(client, "chatbot_regenerate", session_id, message_id=r2, stream=True)
    assert [f["type"] for f in third] == ["processing_start", "message_delta", "message", "processing_end"]
    r2c = third[-1]["reply_id"]
    edit = await turn(client, "chatbot_edit_message", session_id, message_id=u1, user_message="one, edited")
    u1e, r1e = edit[0]["message_id"], edit[-1]["reply_id"]
    assert edit[1]["data"] == "R1e"

    system = ("system", "Be brief.")
    assert asked(fake_llm) == [
        [system, ("user", "one")],
        [system, ("user", "one"), ("assistant", "R1"), ("user", "two")],
        [system, ("user", "one"), ("assistant", "R1"), ("user", "two")],  # never R2, its sibling
        [system, ("user", "one"), ("assistant", "R1"), ("user", "two")],  # never R2 nor R2b
        [system, ("user", "one, edited")],  # the first message's other branch: nothing of the first
    ]

    tree = await history(client, session_id)
    assert tree["leaf_id"] == r1e
    shape = [(m["id"], m["parent_id"], m["role"], m["content"]) for m in tree["messages"]]
    assert shape == [
        (u1, None, "user", "one"),
        (r1, u1, "assistant", "R1"),
        (u2, r1, "user", "two"),
        (r2, u2, "assistant", "R2"),
        (r2b, u2, "assistant", "R2b"),
        (r2c, u2, "assistant", "R2c"),
        (u1e, None, "user", "one, edited"),
        (r1e, u1e, "assistant", "R1e"),
    ]
    assert {m["status"] for m in tree["messages"] if m["role"] == "assistant"} == {"complete"}

    # Back to the first version: the leaf is its newest descendant, and the next post continues from it.
    await client.send({"action": "chatbot_switch_branch", "session_id": session_id, "message_id": u1})
    assert await client.recv() == {"type": "branch_switched", "data": {"session_id": session_id, "leaf_id": r2c}}
    assert (await history(client, session_id))["leaf_id"] == r2c
    three = await turn(client, post, session_id, user_message="three")
    assert asked(fake_llm)[-1] == [
        system,
        ("user", "one"),
        ("assistant", "R1"),
        ("user", "two"),
        ("assistant", "R2c"),
        ("user", "three"),
    ]
    tree = await history(client, session_id)
    assert tree["leaf_id"] == three[-1]["reply_id"]
    assert tree["messages"][-2]["parent_id"] == r2c
    await client.close()


async def test_frames_without_with_ids_are_the_seed_bytes(daphne, fake_llm):
    """A client that does not ask for ids sees exactly the frames it always did, for a regenerate and an edit too."""
    client = await ProtocolClient.connect(daphne.url)
    session_id = await client.start_session()
    await client.post(session_id, "hello")
    start = len(client.received)
    await client.send({"action": "chatbot_regenerate", "session_id": session_id})
    await client.until("processing_end")
    assert client.received[start:] == [
        '{"type": "processing_start", "data": null}',
        '{"type": "message", "data": "Echo: hello"}',
        '{"type": "processing_end", "data": null}',
    ]
    await client.close()


async def test_a_failed_turn_is_retried_by_regenerate_without_message_id(daphne, fake_llm):
    """The leaf is a user message its turn left unanswered: regenerate answers it, with the path before it."""
    client = await ProtocolClient.connect(daphne.url)
    session_id = await client.start_session()
    fake_llm.enqueue(Script(status=500), Script(status=500), Script(status=500), Script(status=500))
    frames = await turn(client, "chatbot_post_message", session_id, user_message="try me")
    assert frames[1]["data"]["code"].startswith("upstream_") and frames[-1]["reply_id"] is None
    fake_llm.reset()
    retry = await turn(client, "chatbot_regenerate", session_id)
    assert retry[0]["message_id"] == frames[0]["message_id"] and retry[1]["data"] == "Echo: try me"
    assert asked(fake_llm) == [[("user", "try me")]]
    assert (await history(client, session_id))["leaf_id"] == retry[-1]["reply_id"]
    await client.close()


async def test_each_action_waits_behind_a_running_turn_and_a_resend_is_recognised(daphne, fake_llm):
    """Regenerate and edit sent while a reply streams are queued and answered in order; a switch meanwhile is
    refused with session_busy; a resend with the same client_message_id makes no new message or call."""
    client = await ProtocolClient.connect(daphne.url)
    session_id = await client.start_session()
    first = await turn(client, "chatbot_post_message", session_id, user_message="first")
    u1 = first[0]["message_id"]
    await client.send(
        {"action": "chatbot_post_message", "session_id": session_id, "user_message": SLOW, "stream": True}
    )
    assert (await client.recv())["type"] == "processing_start"
    regenerate = {"action": "chatbot_regenerate", "session_id": session_id, "client_message_id": "r-1"}
    await client.send({**regenerate, "with_ids": True})
    edit = {"action": "chatbot_edit_message", "session_id": session_id, "message_id": u1, "user_message": "first!"}
    await client.send({**edit, "client_message_id": "e-1", "with_ids": True})
    await client.send({"action": "chatbot_switch_branch", "session_id": session_id, "message_id": u1})
    for resend in (regenerate, {**edit, "client_message_id": "e-1"}):
        await client.send(resend)
    codes = []
    frames: list[dict] = []
    while len([f for f in frames if f["type"] == "processing_end"]) < 3:
        frame = await client.recv(timeout=20)
        (codes.append(frame["data"]["code"]) if frame["type"] == "error" else frames.append(frame))
    assert codes == ["session_busy", "duplicate_message", "duplicate_message"]
    ends = [f for f in frames if f["type"] == "processing_end"]
    slow_reply_id = ends[0].get("reply_id")
    assert slow_reply_id is None  # that post did not ask for ids
    regenerated, edited = ends[1], ends[2]
    texts = [f["data"] for f in frames if f["type"] == "message"]
    assert texts == [SLOW_REPLY, SLOW_REPLY, "Echo: first!"]
    # The regeneration answered the slow message again with the path before it; the edit has no past at all.
    assert asked(fake_llm)[2] == [("user", "first"), ("assistant", "Echo: first"), ("user", SLOW)]
    assert asked(fake_llm)[3] == [("user", "first!")]
    assert len(fake_llm.requests) == 4
    tree = await history(client, session_id)
    assert tree["leaf_id"] == edited["reply_id"]
    by_id = {m["id"]: m for m in tree["messages"]}
    assert by_id[regenerated["reply_id"]]["parent_id"] == regenerated["message_id"]
    assert by_id[edited["message_id"]]["parent_id"] is None and len(tree["messages"]) == 7
    await client.close()


async def test_bad_ids_wrong_roles_other_sockets_and_ended_sessions(daphne, fake_llm):
    """Each refusal is one documented error code, never internal_error, and changes nothing."""
    client = await ProtocolClient.connect(daphne.url)
    session_id = await client.start_session()
    empty = {"session_id": session_id}
    assert await refusal(client, {"action": "chatbot_regenerate", **empty}) == "message_not_found"
    frames = await turn(client, "chatbot_post_message", session_id, user_message="hi")
    user, reply = frames[0]["message_id"], frames[-1]["reply_id"]
    other = await client.start_session()
    foreign = (await turn(client, "chatbot_post_message", other, user_message="elsewhere"))[-1]["reply_id"]
    calls = len(fake_llm.requests)

    regenerate, edit = "chatbot_regenerate", "chatbot_edit_message"
    for frame, code in [
        ({"action": regenerate, **empty, "message_id": 999999}, "message_not_found"),
        ({"action": regenerate, **empty, "message_id": foreign}, "message_not_found"),  # another session's
        ({"action": regenerate, **empty, "message_id": user}, "wrong_message_role"),
        ({"action": regenerate, **empty, "message_id": "12"}, "invalid_field_type"),
        ({"action": edit, **empty, "message_id": reply, "user_message": "x"}, "wrong_message_role"),
        ({"action": edit, **empty, "message_id": 999999, "user_message": "x"}, "message_not_found"),
        ({"action": edit, **empty, "message_id": user, "user_message": " "}, "empty_user_message"),
        ({"action": edit, **empty, "user_message": "x"}, "message_not_found"),
        ({"action": "chatbot_switch_branch", **empty, "message_id": foreign}, "message_not_found"),
        ({"action": "chatbot_switch_branch", **empty, "message_id": True}, "invalid_field_type"),
    ]:
        assert await refusal(client, frame) == code, frame
    assert len(fake_llm.requests) == calls

    # Another connection (anonymous: another principal) may neither act on the session nor read it.
    stranger = await ProtocolClient.connect(daphne.url)
    assert await refusal(stranger, {"action": regenerate, **empty}) == "session_not_owned"
    assert await refusal(stranger, {"action": "chatbot_history", **empty}) == "session_not_owned"
    missing = "00000000-0000-0000-0000-000000000000"
    assert await refusal(stranger, {"action": "chatbot_history", "session_id": missing}) == "session_not_found"
    await stranger.close()

    await client.send({"action": "chatbot_session_end", "session_id": session_id})
    assert (await client.recv())["type"] == "session_end"
    assert await refusal(client, {"action": regenerate, **empty}) == "session_ended"
    assert await refusal(client, {"action": edit, **empty, "message_id": user, "user_message": "x"}) == "session_ended"
    await client.close()


async def test_a_key_reads_its_ended_sessions_history_and_a_quota_refuses_a_regeneration(daphne, fake_llm):
    """Any socket of the session's principal reads its history, live or ended; another key gets session_not_owned;
    over the day's tokens a regeneration is refused like a post, with nothing sent to the model."""
    _, key = await sync_to_async(auth.create_api_key)("metered", tokens_per_day=200, max_output_tokens=20)
    _, other_key = await sync_to_async(auth.create_api_key)("another")
    headers = {"additional_headers": {"Authorization": f"Bearer {key}"}}
    client = await ProtocolClient.connect(daphne.url, **headers)
    session_id = await client.start_session()
    frames = await client.post(session_id, "a question that costs most of the day's tokens " * 10)
    assert frames[1]["type"] == "message", frames
    calls = len(fake_llm.requests)
    assert await refusal(client, {"action": "chatbot_regenerate", "session_id": session_id}) == "quota_exceeded"
    assert len(fake_llm.requests) == calls
    await client.send({"action": "chatbot_session_end", "session_id": session_id})
    await client.recv()
    await client.close()

    again = await ProtocolClient.connect(daphne.url, **headers)
    tree = await history(again, session_id)
    assert [m["role"] for m in tree["messages"]] == ["user", "assistant"]  # no trace of the refused regeneration
    assert tree["leaf_id"] == tree["messages"][-1]["id"]
    await again.close()
    stranger = await ProtocolClient.connect(daphne.url, additional_headers={"Authorization": f"Bearer {other_key}"})
    assert await refusal(stranger, {"action": "chatbot_history", "session_id": session_id}) == "session_not_owned"
    await stranger.close()
    assert json.dumps(tree)  # the frame was JSON all along
    assert await ChatSession.objects.filter(id=session_id, ended_at__isnull=False).aexists()
