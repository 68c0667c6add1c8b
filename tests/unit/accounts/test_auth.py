"""Principals in-process: API keys (hashed, checked, revoked), the session cookie, R2D2_REQUIRE_AUTH, continuing."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from decimal import Decimal

import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import CommandError

from chat import llm
from chat.accounts import auth
from chat.models import ApiKey, ChatSession, EndReason
from r2d2site.asgi import application
from testkit.server import ROOT, server_env
from testkit.wait import async_wait_until

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
async def _close_model_client():
    yield
    await llm.close_clients()


@pytest.fixture
def require_auth(settings):
    settings.R2D2_REQUIRE_AUTH = True


class Client:
    def __init__(self, key: str | None = None, headers: list[tuple[bytes, bytes]] | None = None) -> None:
        extra = [(b"authorization", f"Bearer {key}".encode())] if key else []
        self.ws = WebsocketCommunicator(application, "/", headers=[(b"host", b"localhost"), *extra, *(headers or [])])

    async def connect(self) -> None:
        connected, _ = await self.ws.connect()
        assert connected

    async def send(self, frame: dict) -> None:
        await self.ws.send_to(text_data=json.dumps(frame))

    async def recv(self, timeout: float = 5) -> dict:
        return json.loads(await self.ws.receive_from(timeout))

    async def start(self, **fields) -> dict:
        await self.send({"action": "chatbot_session_start", **fields})
        return await self.recv()

    async def post(self, session_id: str, text: str) -> list[dict]:
        await self.send({"action": "chatbot_post_message", "session_id": session_id, "user_message": text})
        frames = [await self.recv()]
        while frames[-1]["type"] not in ("processing_end", "error") or (
            frames[-1]["type"] == "error" and len(frames) > 1
        ):
            frames.append(await self.recv())
        return frames

    async def refused(self) -> str:
        """The one `unauthorized` frame, then close code 4401; returns the frame's message."""
        frame = await self.recv()
        assert frame["type"] == "error" and frame["data"]["code"] == "unauthorized", frame
        closed = await self.ws.receive_output(5)
        assert closed == {"type": "websocket.close", "code": 4401}, closed
        return frame["data"]["message"]


make_key = sync_to_async(auth.create_api_key)


def test_the_database_holds_only_a_hash_of_the_key():
    row, key = auth.create_api_key("ci")
    assert key.startswith("r2d2_") and len(key) > 40
    stored = ApiKey.objects.filter(id=row.id).values().get()
    assert all(key not in str(value) for value in stored.values())
    assert row.key_hash == auth.hash_key(key) and key.startswith(row.prefix) and len(row.prefix) == 12
    assert auth.find_key(key) == row
    assert auth.find_key(key[:-1] + ("A" if key[-1] != "A" else "B")) is None
    assert auth.find_key("not-a-key") is None


async def test_anonymous_is_refused_when_auth_is_required(require_auth):
    client = Client()
    await client.connect()
    assert "API key" in await client.refused()


async def test_anonymous_works_when_auth_is_off(fake_llm):
    client = Client()
    await client.connect()
    frame = await client.start()
    assert frame["type"] == "session_start"
    session = await ChatSession.objects.aget(id=frame["data"]["session_id"])
    assert session.user_id is None and session.api_key_id is None
    await client.ws.disconnect()


async def test_a_valid_key_is_the_sessions_principal(require_auth, fake_llm):
    row, key = await make_key("ci")
    client = Client(key)
    await client.connect()
    frame = await client.start()
    frames = await client.post(frame["data"]["session_id"], "hello")
    assert {"type": "message", "data": "Echo: hello"} in frames
    session = await ChatSession.objects.aget(id=frame["data"]["session_id"])
    assert session.api_key_id == row.id
    assert (await ApiKey.objects.aget(id=row.id)).last_used_at is not None
    await client.ws.disconnect()


@pytest.mark.parametrize("header", [b"Bearer r2d2_wrong", b"Basic dXNlcjpwYXNz", b"Bearer not-even-ours"])
async def test_a_wrong_key_is_refused_even_when_auth_is_off(header):
    client = Client(headers=[(b"authorization", header)])
    await client.connect()
    await client.refused()


async def test_a_revoked_key_is_refused_and_revoking_closes_its_socket(require_auth, fake_llm):
    row, key = await make_key("ci")
    client = Client(key)
    await client.connect()
    session_id = (await client.start())["data"]["session_id"]
    await sync_to_async(auth.revoke)(row)
    assert "revoked" in await client.refused()

    async def ended() -> bool:  # its sessions end as it closes: revoked, not merely disconnected
        return bool((await ChatSession.objects.aget(id=session_id)).end_reason)

    await async_wait_until(ended, timeout=10)
    assert (await ChatSession.objects.aget(id=session_id)).end_reason == EndReason.REVOKED

    again = Client(key)
    await again.connect()
    assert "revoked" in await again.refused()


async def test_a_revocation_the_group_missed_is_caught_before_spending(require_auth, fake_llm, settings):
    """E.g. the in-memory channel layer and `revoke_api_key` run in another process."""
    settings.R2D2_AUTH_RECHECK_SECONDS = 0
    row, key = await make_key("ci")
    client = Client(key)
    await client.connect()
    session_id = (await client.start())["data"]["session_id"]
    await ApiKey.objects.filter(id=row.id).aupdate(revoked_at=row.created_at)  # no event sent
    await client.send({"action": "chatbot_post_message", "session_id": session_id, "user_message": "hi"})
    await client.refused()
    assert not fake_llm.requests


async def test_a_signed_in_user_is_the_principal(require_auth, fake_llm, client):
    user = await get_user_model().objects.acreate_user("ada", password="pw-for-tests-1")
    await sync_to_async(client.force_login)(user)
    cookie = f"sessionid={client.cookies['sessionid'].value}".encode()
    ws = Client(headers=[(b"cookie", cookie)])
    await ws.connect()
    frame = await ws.start()
    assert (await ChatSession.objects.aget(id=frame["data"]["session_id"])).user_id == user.id
    await ws.ws.disconnect()


async def test_signing_out_closes_that_sign_ins_sockets_and_no_other(require_auth, fake_llm):
    """Signing out in the browser withdraws the sockets that sign-in opened (`unauthorized`, 4401); the same
    person's other sign-in keeps its socket; deactivating the account then closes that one too."""
    from django.test import AsyncClient

    user = await get_user_model().objects.acreate_user("ada", password="pw-for-tests-1")
    sockets = []
    browsers = [AsyncClient(), AsyncClient()]
    for browser in browsers:
        await browser.aforce_login(user)
        ws = Client(headers=[(b"cookie", f"sessionid={browser.cookies['sessionid'].value}".encode())])
        await ws.connect()
        assert (await ws.start())["type"] == "session_start"
        sockets.append(ws)

    await browsers[0].post("/accounts/logout/")
    assert await sockets[0].refused() == "You signed out."
    assert await sockets[1].ws.receive_nothing(timeout=0.3)
    user.is_active = False
    await user.asave()
    assert await sockets[1].refused() == "That account is no longer active."


async def test_continue_a_session_carries_its_conversation(require_auth, fake_llm):
    row, key = await make_key("ci")
    first = Client(key)
    await first.connect()
    old = (await first.start(gpt_model="gpt-4o-mini"))["data"]["session_id"]
    await first.send(
        {
            "action": "chatbot_post_message",
            "session_id": old,
            "user_message": "my name is Ada",
            "system_message": "Be brief.",
        }
    )
    assert (await first.recv())["type"] == "processing_start"
    assert (await first.recv())["type"] == "message"
    assert (await first.recv())["type"] == "processing_end"
    await first.send({"action": "chatbot_session_end", "session_id": old})
    assert (await first.recv())["type"] == "session_end"

    frame = await first.start(continue_session_id=old)
    new = frame["data"]["session_id"]
    await first.post(new, "what is my name?")
    assert fake_llm.requests[-1].messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "my name is Ada"},
        {"role": "assistant", "content": "Echo: my name is Ada"},
        {"role": "user", "content": "what is my name?"},
    ]
    session = await ChatSession.objects.aget(id=new)
    assert session.continued_from_id is not None and session.model == "gpt-4o-mini"

    _, other_key = await make_key("other")
    other = Client(other_key)
    await other.connect()
    refused = await other.start(continue_session_id=old)
    assert refused["data"]["code"] == "session_not_owned"
    await first.ws.disconnect()
    await other.ws.disconnect()


async def test_same_principal_may_end_and_cancel_but_others_may_not(require_auth, fake_llm):
    _, key = await make_key("ci")
    _, other_key = await make_key("other")
    holder, twin, stranger = Client(key), Client(key), Client(other_key)
    for c in (holder, twin, stranger):
        await c.connect()
    session_id = (await holder.start())["data"]["session_id"]

    await stranger.send({"action": "chatbot_session_end", "session_id": session_id})
    assert (await stranger.recv())["data"]["code"] == "session_not_owned"
    await twin.send({"action": "chatbot_post_message", "session_id": session_id, "user_message": "hi"})
    refused = await twin.recv()
    assert refused["data"]["code"] == "session_not_owned" and "continue_session_id" in refused["data"]["message"]

    await twin.send({"action": "chatbot_session_end", "session_id": session_id})
    assert await twin.recv() == {"type": "session_end", "data": None}
    assert await holder.recv() == {"type": "session_end", "data": {"session_id": session_id, "reason": "client"}}
    for c in (holder, twin, stranger):
        await c.ws.disconnect()


def test_check_deploy_warns_when_auth_is_off_in_production():
    def check(**env: str) -> str:
        result = subprocess.run(
            [sys.executable, "manage.py", "check", "--deploy"],
            cwd=ROOT,
            env=server_env(None, DJANGO_DEBUG="0", DJANGO_SECRET_KEY="x" * 60, **env),
            capture_output=True,
            text=True,
        )
        return result.stdout + result.stderr

    assert "r2d2.W001" in check(R2D2_REQUIRE_AUTH="0")
    assert "r2d2.W001" not in check(R2D2_REQUIRE_AUTH="1")


def test_create_and_revoke_commands(capsys):
    get_user_model().objects.create_user("ada")
    call_command("create_api_key", "ci", "--user", "ada", "--messages-per-minute", "5", "--models", "a,b")
    key = capsys.readouterr().out.strip().splitlines()[-1]
    row = auth.find_key(key)
    assert row.name == "ci" and row.user.username == "ada" and row.messages_per_minute == 5
    assert row.model_list == ["a", "b"] and row.tokens_per_day is None
    call_command("revoke_api_key", "ci")
    assert "Revoked" in capsys.readouterr().out
    assert not auth.find_key(key).is_active


def test_create_api_key_with_money_limits_and_an_output_cap(capsys):
    call_command(
        "create_api_key", "spender", "--usd-per-day", "5", "--usd-per-month", "$40.25", "--max-output-tokens", "512"
    )
    row = auth.find_key(capsys.readouterr().out.strip().splitlines()[-1])
    assert (row.usd_per_day, row.usd_per_month, row.max_output_tokens) == (Decimal("5"), Decimal("40.25"), 512)
    limits = auth.principal_for_key(row).limits
    assert (limits.usd_per_day, limits.usd_per_month, limits.max_output_tokens) == (5.0, 40.25, 512)


@pytest.mark.parametrize(
    ("option", "value", "says"),
    [
        ("--usd-per-day", "-1", "--usd-per-day must be an amount in dollars, 0 or more, not '-1'."),
        ("--usd-per-month", "lots", "--usd-per-month must be an amount in dollars, 0 or more, not 'lots'."),
        ("--usd-per-day", "nan", "--usd-per-day must be an amount in dollars, 0 or more, not 'nan'."),
        ("--usd-per-day", "0.00001", "--usd-per-day must be under $100,000,000, with at most 4 decimal places."),
        ("--max-output-tokens", "-5", "--max-output-tokens must be from 0 to 2147483647, not -5."),
        ("--max-output-tokens", "1e3", "--max-output-tokens must be a whole number, 0 or more, not '1e3'."),
        ("--tokens-per-day", "ten", "--tokens-per-day must be a whole number, 0 or more, not 'ten'."),
        ("--max-sessions", "-1", "--max-sessions must be from 0 to 2147483647, not -1."),
    ],
)
def test_create_api_key_refuses_a_bad_limit_and_creates_nothing(option, value, says):
    with pytest.raises(CommandError) as refused:
        call_command("create_api_key", "bad", option, value)
    assert str(refused.value) == says
    assert not ApiKey.objects.exists()


def test_a_bad_limit_on_the_command_line_is_one_clear_line():
    """From a shell: exit status 1 and the CommandError's sentence, no usage text, no traceback, no key."""
    result = subprocess.run(
        [sys.executable, "manage.py", "create_api_key", "bad", "--usd-per-day", "five"],
        cwd=ROOT,
        env=server_env(None),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert result.stderr.strip() == "CommandError: --usd-per-day must be an amount in dollars, 0 or more, not 'five'."
    assert "r2d2_" not in result.stdout


async def test_concurrent_starts_stop_at_the_session_limit(require_auth):
    """Six starts at once for a key with two sessions at most: exactly two start (counted and inserted together)."""
    _, key = await make_key("two-at-most", max_sessions=2)
    clients = [Client(key) for _ in range(6)]
    for client in clients:
        await client.connect()
    frames = await asyncio.gather(*(client.start(resumable=n % 2 == 0) for n, client in enumerate(clients)))
    assert sorted(frame["type"] for frame in frames) == ["error"] * 4 + ["session_start"] * 2
    assert {frame["data"]["code"] for frame in frames if frame["type"] == "error"} == {"quota_exceeded"}
    assert await ChatSession.objects.live().acount() == 2
    for client in clients:
        await client.ws.disconnect()
