"""The principal travels with the session (issue 19, item 5), across two live Daphne processes on
PostgreSQL and Redis: whichever process holds a session charges its principal and applies its quotas;
only that principal resumes it; revoking its key, deactivating its account or changing its password
withdraws it; any of its sockets may cancel its turn; and a reply left `incomplete` is closed by the
heartbeat of the process holding it."""

from __future__ import annotations

import asyncio
import json
import re
import time
from datetime import UTC, datetime

import pytest
import websockets
from asgiref.sync import sync_to_async
from django.contrib.auth import get_user_model
from django.db.models import QuerySet
from django.test import AsyncClient

from chat.accounts import auth, quotas
from chat.accounts.principals import Principal
from chat.models import ApiKey, ChatMessage, ChatSession, EndReason, MessageStatus, Role
from testkit.client import ProtocolClient
from testkit.contract import check_frame
from testkit.wait import async_wait_until
from tests.e2e.test_resume import SLOW, check_sequence, post, resume, start, wait_for
from tests.production.conftest import FAST_LIVENESS

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.django_db(transaction=True)]

make_key = sync_to_async(auth.create_api_key)

#: As in production, every connection names its principal; liveness fast enough to judge within a test.
SERVER = {**FAST_LIVENESS, "R2D2_REQUIRE_AUTH": "1"}

WORDS = [f"word{i}" for i in range(200)]
#: A streamed reply of 200 words, one every 0.1 s: still being generated 20 s after it starts, so
#: long after a revocation (a management command's start-up included) or a cancel should have stopped it.
LONG = "[[token_delay=0.1 text=" + "_".join(WORDS) + "]] tell me a very long story"
LONG_REPLY = " ".join(WORDS)
QUEUED = "queued behind the long one"


# Principals ------------------------------------------------------------------------


async def with_key(server, key: str) -> ProtocolClient:
    return await ProtocolClient.connect(server.url, additional_headers={"Authorization": f"Bearer {key}"})


async def sign_in(user) -> str:
    """A browser sign-in (a Django session in the shared database): its `sessionid` cookie."""
    browser = AsyncClient()
    await browser.aforce_login(user)
    return browser.cookies["sessionid"].value


async def with_cookie(server, cookie: str) -> ProtocolClient:
    return await ProtocolClient.connect(server.url, additional_headers={"Cookie": f"sessionid={cookie}"})


async def new_user(name: str):
    return await get_user_model().objects.acreate_user(name, password="pw-for-tests-1")


async def refused(client: ProtocolClient, timeout: float = 5.0) -> str:
    """The socket is withdrawn: one `unauthorized` frame, then close code 4401; returns the frame's message."""
    frame = await client.recv(timeout=timeout)
    assert frame["type"] == "error" and frame["data"]["code"] == "unauthorized", frame
    with pytest.raises(websockets.ConnectionClosed) as closed:
        await client.recv(timeout=5)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == auth.UNAUTHORIZED_CLOSE_CODE, repr(closed.value)
    return frame["data"]["message"]


async def quiet(client: ProtocolClient, seconds: float = 1.0) -> None:
    """The socket gets nothing for that long."""
    with pytest.raises(asyncio.TimeoutError):
        frame = await client.recv(timeout=seconds)
        pytest.fail(f"expected nothing, got {frame}")


# What the database says ----------------------------------------------------------------


async def session_row(session_id: str) -> ChatSession:
    return await ChatSession.objects.aget(id=session_id)


async def spent(session_id: str) -> int:
    """The tokens the model reported for the session's replies (what its principal must have been charged)."""
    replies = ChatMessage.objects.filter(session_id=session_id, role=Role.ASSISTANT)
    return sum([(r.prompt_tokens or 0) + (r.completion_tokens or 0) async for r in replies])


async def tokens_today(principal: Principal) -> int:
    return (await quotas.usage(principal))["tokens_today"]


async def charged(principal: Principal, expected: int) -> None:
    """The principal's counter reaches `expected` (charged as a turn ends, in the background), and stays."""

    async def reached() -> bool:
        return await tokens_today(principal) >= expected

    await async_wait_until(reached, timeout=10, interval=0.1)
    await asyncio.sleep(0.3)  # a second charge for the same turn would land by now
    got = await tokens_today(principal)
    assert got == expected, f"{principal.label} was charged {got} tokens today; its replies cost {expected}"


async def user_row(session_id: str, content: str) -> ChatMessage:
    return await ChatMessage.objects.aget(session_id=session_id, role=Role.USER, content=content)


async def reply_to(message: ChatMessage) -> ChatMessage | None:
    return await ChatMessage.objects.filter(reply_to=message).afirst()


async def ended_as_revoked(sessions: QuerySet[ChatSession], expected: set[str], since: datetime) -> None:
    """Exactly the `expected` sessions, every one ended as `revoked`, within 5 s of `since`."""

    async def ended() -> bool:
        return not await sessions.filter(ended_at__isnull=True).aexists()

    await wait_for(ended, timeout=15)
    ends = {str(s.id): (s.end_reason, (s.ended_at - since).total_seconds()) async for s in sessions}
    assert set(ends) == expected
    for reason, after in ends.values():
        assert reason == EndReason.REVOKED and after < 5, ends


async def stopped_not_finished(fake_llm, session_id: str) -> None:
    """The long turn's model request was closed before its end, and its reply is saved partial; the message
    queued behind it was never sent to the model and has no reply (given time to get one)."""
    assert await sync_to_async(fake_llm.wait_for)(lambda f: f.disconnects >= 1), "the model request was not closed"
    reply = await reply_to(await user_row(session_id, LONG))
    assert reply is not None and reply.content, "the words said before the end were not saved"
    assert reply.status != MessageStatus.COMPLETE and reply.status != MessageStatus.INCOMPLETE, reply.status
    assert LONG_REPLY.startswith(reply.content) and len(reply.content) < len(LONG_REPLY)
    await asyncio.sleep(2)  # an answer to the queued message would come at once (an echo)
    assert await reply_to(await user_row(session_id, QUEUED)) is None
    assert [r.messages[-1]["content"] for r in fake_llm.requests] == [LONG]
    assert fake_llm.completed == 0


async def detached_with_a_turn_in_flight(server, key: str) -> tuple[str, str, int]:
    """A resumable session whose socket closed while its long turn streamed and a message waited behind
    it: (session_id, resume token, the last seq the client saw)."""
    client = await with_key(server, key)
    session_id, token = await start(client)
    await post(client, session_id, LONG)
    await post(client, session_id, QUEUED)
    seen = [await client.recv() for _ in range(4)]  # processing_start and three deltas
    assert [f["type"] for f in seen] == ["processing_start"] + ["message_delta"] * 3
    await client.close()
    return session_id, token, seen[-1]["seq"]


# 1. Charged to its principal wherever it is held -------------------------------------------


async def test_a_session_resumed_on_the_other_process_is_charged_to_its_key(daphne_factory, fake_llm):
    """Admitted and charged from the session's key on whichever process holds it: a turn answered on B
    after the resume is the key's, and past the day's tokens the next post is refused there."""
    server_a, server_b = daphne_factory(**SERVER), daphne_factory(**SERVER)
    row, key = await make_key("metered", tokens_per_day=200, max_output_tokens=20)
    principal = await sync_to_async(auth.principal_for_key)(row)

    client = await with_key(server_a, key)
    session_id, token = await start(client)
    frames = await client.post(session_id, "hi")
    assert frames[1]["data"] == "Echo: hi"
    on_a = await spent(session_id)
    assert 0 < on_a < 200
    await charged(principal, on_a)
    holder_a = (await session_row(session_id)).owner_process
    await client.close()

    client = await with_key(server_b, key)
    assert (await resume(client, session_id, token, frames[-1]["seq"]))["type"] == "session_resumed"
    question = "a question long enough to cost most of the rest of the day's tokens " * 6
    frames = await client.post(session_id, question)
    assert frames[1]["type"] == "message", frames
    assert (await session_row(session_id)).owner_process not in {"", holder_a}  # B answered it
    total = await spent(session_id)
    assert total > on_a
    await charged(principal, total)  # the turn answered on B is the key's

    await client.send({"action": "chatbot_post_message", "session_id": session_id, "user_message": question})
    frame = await client.recv()
    assert frame["type"] == "error" and frame["data"]["code"] == "quota_exceeded", frame
    assert frame["data"]["message"].startswith(f"Tokens per day: {total} of 200 used")
    assert len(fake_llm.requests) == 2  # nothing reached the model
    await client.close()


# 2. Resumed only by its principal -------------------------------------------------------------


async def test_another_key_holding_the_token_is_refused_and_sees_nothing(daphne_factory, fake_llm):
    server_a, server_b = daphne_factory(**SERVER), daphne_factory(**SERVER)
    _, key = await make_key("owner")
    _, other_key = await make_key("other")
    owner = await with_key(server_a, key)
    session_id, token = await start(owner)
    before = await session_row(session_id)
    await post(owner, session_id, SLOW)
    seen = [await owner.recv() for _ in range(3)]

    # Held on A with its socket open: the other key tries on B, then on A itself.
    for server in (server_b, server_a):
        thief = await with_key(server, other_key)
        answer = await resume(thief, session_id, token, 0)
        assert answer["type"] == "error" and answer["data"]["code"] == "session_not_owned", answer
        await quiet(thief)  # while the owner's reply streams
        await thief.close()
    seen += [await owner.recv() for _ in range(2)]

    # Detached (the owner's socket dropped): the other key still cannot take it over from B.
    await owner.close()
    thief = await with_key(server_b, other_key)
    answer = await resume(thief, session_id, token, seen[-1]["seq"])
    assert answer["type"] == "error" and answer["data"]["code"] == "session_not_owned", answer
    await quiet(thief)
    assert (await thief.start_session()) != session_id  # its socket stays usable, for its own sessions
    after = await session_row(session_id)
    assert (after.owner_process, after.fence, after.ended_at) == (before.owner_process, before.fence, None)

    # The owner resumes on B and gets every frame it missed, unbroken.
    owner = await with_key(server_b, key)
    assert (await resume(owner, session_id, token, seen[-1]["seq"]))["type"] == "session_resumed"
    rest = await owner.until("processing_end")
    check_sequence(seen + rest, session_id)
    assert "session_end" not in [f["type"] for f in rest]
    await owner.close()
    await thief.close()


# 3, 4. Withdrawn: revoked key, deactivated account --------------------------------------------


async def test_revoking_a_key_ends_its_sessions_detached_ones_included(daphne_factory, fake_llm, manage):
    server_a, server_b = daphne_factory(**SERVER), daphne_factory(**SERVER)
    ada = await new_user("ada")
    row, key = await make_key("ada-ci", user=ada)
    detached, token, last_seq = await detached_with_a_turn_in_flight(server_a, key)
    on_b = await with_key(server_b, key)
    attached, _ = await start(on_b)

    result = await sync_to_async(manage)("revoke_api_key", "ada-ci")  # a third process
    assert result.returncode == 0, result.stderr
    assert "revoked" in await refused(on_b)
    revoked_at = (await ApiKey.objects.aget(id=row.id)).revoked_at
    await ended_as_revoked(ChatSession.objects.filter(api_key_id=row.id), {detached, attached}, revoked_at)
    await stopped_not_finished(fake_llm, detached)

    # Later, its owner (Ada, signed in) resumes it, on either process: it has ended.
    cookie = await sign_in(ada)
    for server in (server_a, server_b):
        browser = await with_cookie(server, cookie)
        answer = await resume(browser, detached, token, last_seq)
        assert answer["type"] == "error" and answer["data"]["code"] == "session_ended", answer
        await browser.close()


async def test_revoking_a_key_ends_plain_sessions_on_open_sockets_as_revoked(daphne_factory, fake_llm, manage):
    """Not only the detached ones: a plain session whose socket the revocation closes ends as `revoked`
    too (not `disconnect`), busy (its turn stopped) or idle, on either process."""
    server_a, server_b = daphne_factory(**SERVER), daphne_factory(**SERVER)
    row, key = await make_key("ci")
    busy, idle = await with_key(server_a, key), await with_key(server_b, key)
    busy_session, idle_session = await busy.start_session(), await idle.start_session()
    await post(busy, busy_session, LONG)
    assert (await busy.recv())["type"] == "processing_start"

    result = await sync_to_async(manage)("revoke_api_key", "ci")
    assert result.returncode == 0, result.stderr
    assert "revoked" in await refused(idle)
    frames = []
    with pytest.raises(websockets.ConnectionClosed) as closed:
        while True:
            frames.append(await busy.recv(timeout=5))
    assert closed.value.rcvd is not None and closed.value.rcvd.code == auth.UNAUTHORIZED_CLOSE_CODE
    assert frames[-1]["type"] == "error" and frames[-1]["data"]["code"] == "unauthorized", frames[-1]
    revoked_at = (await ApiKey.objects.aget(id=row.id)).revoked_at
    await ended_as_revoked(ChatSession.objects.filter(api_key_id=row.id), {busy_session, idle_session}, revoked_at)
    assert await sync_to_async(fake_llm.wait_for)(lambda f: f.disconnects == 1)


DEACTIVATE = """
import time
from django.contrib.auth import get_user_model
from django.db.models import QuerySet
user = get_user_model().objects.get(username="ada")
user.is_active = False
print("deactivated at", time.time(), flush=True)
user.save()
"""


async def test_deactivating_an_account_ends_its_sessions_as_revoked(daphne_factory, fake_llm, manage):
    server_a, server_b = daphne_factory(**SERVER), daphne_factory(**SERVER)
    ada = await new_user("ada")
    _, key = await make_key("ada-ci", user=ada)
    detached, token, last_seq = await detached_with_a_turn_in_flight(server_a, key)
    browser = await with_cookie(server_b, await sign_in(ada))
    signed_in, _ = await start(browser)
    assert (await session_row(signed_in)).user_id == ada.id

    result = await sync_to_async(manage)("shell", "-c", DEACTIVATE)  # as the admin's "active" box does, elsewhere
    assert result.returncode == 0, result.stderr
    deactivated_at = datetime.fromtimestamp(float(re.search(r"deactivated at (\S+)", result.stdout)[1]), UTC)
    assert await refused(browser) == "That account is no longer active."
    await ended_as_revoked(ChatSession.objects.filter(user_id=ada.id), {detached, signed_in}, deactivated_at)
    await stopped_not_finished(fake_llm, detached)

    # Active again and signed in anew, Ada resumes it: it has ended, and stays so.
    ada.is_active = True
    await ada.asave()
    browser = await with_cookie(server_b, await sign_in(ada))
    answer = await resume(browser, detached, token, last_seq)
    assert answer["type"] == "error" and answer["data"]["code"] == "session_ended", answer
    await browser.close()


async def test_deactivating_an_account_closes_its_key_sockets_too(daphne_factory, fake_llm, manage):
    """docs/accounts.md: deactivating an account in the admin closes all of its sockets; those of its API keys
    too, and its keys open no new ones (else a deactivated person goes on spending)."""
    server_a, server_b = daphne_factory(**SERVER), daphne_factory(**SERVER)
    ada = await new_user("ada")
    _, key = await make_key("ada-ci", user=ada)
    program = await with_key(server_b, key)
    await program.start_session()

    result = await sync_to_async(manage)("shell", "-c", DEACTIVATE)
    assert result.returncode == 0, result.stderr
    assert await refused(program) == "That account is no longer active."
    newcomer = await with_key(server_a, key)
    await refused(newcomer)


# 5. A password change --------------------------------------------------------------------------

CHANGE_PASSWORD = """
from django.contrib.auth import get_user_model
from django.db.models import QuerySet
user = get_user_model().objects.get(username="ada")
user.set_password("a-new-password-for-tests-2")
user.save()
"""


async def test_a_password_change_closes_the_users_cookie_sockets_not_their_key_sockets(
    daphne_factory, fake_llm, manage
):
    server_a, server_b = daphne_factory(**SERVER), daphne_factory(**SERVER)
    ada = await new_user("ada")
    _, key = await make_key("ada-ci", user=ada)
    cookie = await sign_in(ada)
    browsers = [await with_cookie(server_a, cookie), await with_cookie(server_b, cookie)]
    for browser in browsers:
        session_id = await browser.start_session()
        assert (await session_row(session_id)).user_id == ada.id  # the cookie signed it in
    program = await with_key(server_b, key)
    program_session = await program.start_session()

    result = await sync_to_async(manage)("shell", "-c", CHANGE_PASSWORD)
    assert result.returncode == 0, result.stderr
    for browser in browsers:
        assert await refused(browser) == "Your password was changed; sign in again."
    await quiet(program)
    frames = await program.post(program_session, "still here")
    assert frames[1] == {"type": "message", "data": "Echo: still here"}

    # The old cookie signs nothing in any more.
    stale = await with_cookie(server_a, cookie)
    assert "Sign in" in await refused(stale)
    await program.close()


# 6. Cancel from another socket --------------------------------------------------------------------


@pytest.mark.parametrize("resumable", [False, True], ids=["plain", "resumable"])
async def test_cancel_from_another_socket_on_the_other_process(daphne_factory, fake_llm, resumable):
    server_a, server_b = daphne_factory(**SERVER), daphne_factory(**SERVER)
    _, key = await make_key("ci")
    holder = await with_key(server_a, key)
    session_id = (await start(holder))[0] if resumable else await holder.start_session()
    await post(holder, session_id, LONG)
    seen = [await holder.recv() for _ in range(4)]  # processing_start and three deltas

    sender = await with_key(server_b, key)
    await sender.send({"action": "chatbot_cancel", "session_id": session_id})
    text = await asyncio.wait_for(sender.connection.recv(), 10)  # read raw: checked against asyncapi.yaml below
    assert json.loads(text) == {"type": "cancelled", "data": {"session_id": session_id}}, text
    frames = seen + await holder.until("processing_end", timeout=5)  # not the 20 s the whole reply takes
    assert [f["type"] for f in frames if f["type"] != "message_delta"] == ["processing_start", "processing_end"]
    said = "".join(f["data"] for f in frames if f["type"] == "message_delta")
    assert said and LONG_REPLY.startswith(said) and said != LONG_REPLY
    if resumable:
        check_sequence(frames, session_id)
    reply = await reply_to(await user_row(session_id, LONG))
    assert reply is not None and (reply.status, reply.content) == (MessageStatus.CANCELLED, said)
    assert await sync_to_async(fake_llm.wait_for)(lambda f: f.disconnects == 1)

    # Nothing generating now: the sender is told so; the holder's socket carries on.
    await sender.send({"action": "chatbot_cancel", "session_id": session_id})
    answer = await sender.recv()
    assert answer["type"] == "error" and answer["data"]["code"] == "nothing_to_cancel", answer
    await quiet(holder, 0.3)
    frames = await holder.post(session_id, "after the cancel")
    assert [f["data"] for f in frames if f["type"] == "message"] == ["Echo: after the cancel"]
    check_frame(text)  # the sender's answer is in the published protocol
    await holder.close()
    await sender.close()


# 7. A reply left incomplete -----------------------------------------------------------------------


async def test_a_reply_left_incomplete_is_marked_interrupted_by_its_holders_heartbeat(daphne_factory, fake_llm):
    """Each process's sweep closes the replies its own sessions left `incomplete` (their last save failed),
    never the one a turn of its own is still writing."""
    server_a, server_b = daphne_factory(**FAST_LIVENESS), daphne_factory(**FAST_LIVENESS)
    idle_a, idle_b, busy = [await ProtocolClient.connect(s.url) for s in (server_a, server_b, server_a)]
    sessions = {server: await client.start_session() for server, client in ((server_a, idle_a), (server_b, idle_b))}
    busy_session = await busy.start_session()
    await post(busy, busy_session, LONG)
    for _ in range(3):  # processing_start and two deltas: generating
        await busy.recv()

    async def streaming_row() -> ChatMessage | None:
        return await ChatMessage.objects.filter(session_id=busy_session, role=Role.ASSISTANT).afirst()

    async def checkpointed() -> bool:
        return await streaming_row() is not None

    await wait_for(checkpointed, timeout=5)  # its first checkpoint (R2D2_CHECKPOINT_SECONDS: 1 s)

    left = {}
    for server, session_id in sessions.items():
        session = await session_row(session_id)
        assert session.owner_process and session.ended_at is None
        asked = await ChatMessage.objects.acreate(
            session_id=session_id, role=Role.USER, content="tell me", status=MessageStatus.ACCEPTED
        )
        left[server] = await ChatMessage.objects.acreate(
            session_id=session_id,
            role=Role.ASSISTANT,
            content="half a rep",
            status=MessageStatus.INCOMPLETE,
            reply_to=asked,
            model=session.model,
        )
    marked_at = time.monotonic()

    async def marked() -> bool:
        statuses = [(await ChatMessage.objects.aget(id=row.id)).status for row in left.values()]
        return statuses == [MessageStatus.INTERRUPTED] * len(statuses)

    await wait_for(marked, timeout=10)
    assert time.monotonic() - marked_at < 5  # a few sweeps (every 0.5 s)
    for row in left.values():
        assert (await ChatMessage.objects.aget(id=row.id)).content == "half a rep"  # kept as far as it got

    # Sweeps go on (every 0.5 s); the reply A's own turn is writing is left alone. Watched closely: its
    # next checkpoint would write `incomplete` over a wrong mark within a second.
    seen = set()
    for _ in range(40):
        seen.add((await streaming_row()).status)
        await asyncio.sleep(0.05)
    assert seen == {MessageStatus.INCOMPLETE}, seen
    assert LONG_REPLY.startswith((await streaming_row()).content)
    assert (await session_row(busy_session)).ended_at is None
    await busy.send({"action": "chatbot_cancel", "session_id": busy_session})
    frames = await busy.until("processing_end", timeout=5)
    assert "error" not in [f["type"] for f in frames]
    assert (await streaming_row()).status == MessageStatus.CANCELLED
    for client in (idle_a, idle_b, busy):
        await client.close()
