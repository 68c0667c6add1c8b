"""Regenerate and edit are turns like a post across two live Daphne processes on PostgreSQL and Redis (issue 29):
a regeneration resumed on the other process mid-reply, a holder killed mid-regeneration with an edit waiting
behind it, and the tree the new holder reads back from the database."""

from __future__ import annotations

import pytest

from chat.models import ChatMessage, MessageStatus
from testkit.client import ProtocolClient
from tests.e2e.test_branches import asked, history
from tests.e2e.test_resume import SLOW, SLOW_REPLY, check_sequence, resume, start
from tests.production.conftest import FAST_LIVENESS

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.django_db(transaction=True)]


async def with_ids(client: ProtocolClient, action: str, session_id: str, **fields) -> None:
    await client.send({"action": action, "session_id": session_id, "with_ids": True, "stream": True, **fields})


async def test_a_regeneration_resumed_on_the_other_process_mid_reply(daphne_factory, fake_llm):
    """The socket drops while a regeneration streams: on the other process the client gets the rest of it, ids
    included, and the new holder continues from the new reply."""
    server_a, server_b = daphne_factory(**FAST_LIVENESS), daphne_factory(**FAST_LIVENESS)
    client = await ProtocolClient.connect(server_a.url)
    session_id, token = await start(client)
    await with_ids(client, "chatbot_post_message", session_id, user_message=SLOW)
    first = await client.until("processing_end", timeout=20)
    await with_ids(client, "chatbot_regenerate", session_id, message_id=first[-1]["reply_id"])
    before = [await client.recv() for _ in range(4)]
    assert before[0]["message_id"] == first[0]["message_id"]
    await client.connection.close()

    client = await ProtocolClient.connect(server_b.url)
    assert (await resume(client, session_id, token, before[-1]["seq"]))["type"] == "session_resumed"
    after = await client.until("processing_end", timeout=20)
    check_sequence(first + before + after, session_id)
    regenerated = after[-1]["reply_id"]
    assert regenerated not in {None, first[-1]["reply_id"]} and after[-2]["data"] == SLOW_REPLY
    tree = await history(client, session_id)
    assert tree["leaf_id"] == regenerated
    assert {m["id"]: m["parent_id"] for m in tree["messages"]}[regenerated] == first[0]["message_id"]

    frames = await client.post(session_id, "and then?")
    assert frames[1]["data"] == "Echo: and then?"
    assert asked(fake_llm)[-1] == [("user", SLOW), ("assistant", SLOW_REPLY), ("user", "and then?")]
    parent = (
        await ChatMessage.objects.filter(session_id=session_id, content="and then?")
        .values_list("parent_id", flat=True)
        .aget()
    )
    assert parent == regenerated  # B placed it on the regenerated branch, read back from the database
    await client.close()


async def test_holder_killed_mid_regeneration_with_an_edit_waiting(daphne_factory, fake_llm):
    """A killed mid-regeneration: the client resuming on B gets turn_interrupted for it, B answers the edit that
    waited (with exactly its path), a resend of the edit is recognised there, and a retry regenerates."""
    server_a, server_b = daphne_factory(**FAST_LIVENESS), daphne_factory(**FAST_LIVENESS)
    client = await ProtocolClient.connect(server_a.url)
    session_id, token = await start(client)
    await with_ids(client, "chatbot_post_message", session_id, user_message="first")
    one = await client.until("processing_end")
    u1 = one[0]["message_id"]
    await with_ids(client, "chatbot_post_message", session_id, user_message=SLOW)
    two = await client.until("processing_end", timeout=20)
    await with_ids(client, "chatbot_regenerate", session_id)
    edit = {"message_id": u1, "user_message": "first, edited", "client_message_id": "e-1"}
    await with_ids(client, "chatbot_edit_message", session_id, **edit)
    frames = [await client.recv() for _ in range(15)]  # past the first checkpoint (1 s)
    server_a.kill()
    with pytest.raises(Exception):  # noqa: B017 (the socket is gone, whichever way websockets says it)
        while True:
            frames.append(await client.recv(timeout=5))
    fake_llm.reset()

    client = await ProtocolClient.connect(server_b.url)
    assert (await resume(client, session_id, token, frames[-1]["seq"]))["type"] == "session_resumed"
    rest = await client.until("processing_end", timeout=20)
    assert [f["type"] for f in rest] == ["error", "processing_end"] and rest[0]["data"]["code"] == "turn_interrupted"
    edited = await client.until("processing_end", timeout=20)
    assert [f["data"] for f in edited if f["type"] == "message"] == ["Echo: first, edited"]
    assert asked(fake_llm) == [[("user", "first, edited")]]  # nothing of the branch it replaces
    check_sequence(one + two + frames + rest + edited, session_id)

    await client.send({"action": "chatbot_edit_message", "session_id": session_id, **edit})
    refused = await client.recv()
    assert refused["data"]["code"] == "duplicate_message" and "answered" in refused["data"]["message"]

    tree = await history(client, session_id)
    by_content = {m["content"]: m for m in tree["messages"]}
    assert by_content["first, edited"]["parent_id"] is None
    assert tree["leaf_id"] == by_content["Echo: first, edited"]["id"]
    interrupted = [m for m in tree["messages"] if m["status"] == MessageStatus.INTERRUPTED]
    assert len(interrupted) == 1 and interrupted[0]["parent_id"] == two[0]["message_id"]
    assert SLOW_REPLY.startswith(interrupted[0]["content"])

    # Back to the interrupted branch, and a retry of its reply: the path is the original one.
    await client.send({"action": "chatbot_switch_branch", "session_id": session_id, "message_id": u1})
    assert (await client.recv())["data"]["leaf_id"] == interrupted[0]["id"]
    await client.send({"action": "chatbot_regenerate", "session_id": session_id})
    await client.until("processing_end", timeout=20)
    assert asked(fake_llm)[-1] == [("user", "first"), ("assistant", "Echo: first"), ("user", SLOW)]
    await client.close()
