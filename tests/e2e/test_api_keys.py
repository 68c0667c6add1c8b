"""API keys over a real socket: live Daphne with R2D2_REQUIRE_AUTH=1, the `websockets` client, the local model."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import websockets
from asgiref.sync import sync_to_async
from django.db import connection

from chat.accounts import auth
from testkit.client import ProtocolClient, seed_conversation
from testkit.server import ROOT, bedrock_env, server_env

pytestmark = pytest.mark.django_db(transaction=True)

make_key = sync_to_async(auth.create_api_key)


def bearer(key: str) -> dict:
    return {"additional_headers": {"Authorization": f"Bearer {key}"}}


async def refused(client: ProtocolClient) -> dict:
    """The one `unauthorized` frame, then the server closes with 4401."""
    frame = await client.recv()
    assert frame["type"] == "error" and frame["data"]["code"] == "unauthorized", frame
    with pytest.raises(websockets.ConnectionClosed) as closed:
        await client.recv()
    assert closed.value.rcvd.code == 4401
    return frame


async def test_anonymous_wrong_and_revoked_keys_are_refused(daphne_factory):
    server = daphne_factory(R2D2_REQUIRE_AUTH="1")
    await refused(await ProtocolClient.connect(server.url))
    await refused(await ProtocolClient.connect(server.url, **bearer("r2d2_" + "x" * 43)))
    row, key = await make_key("ci")
    await sync_to_async(auth.revoke)(row)
    assert "revoked" in (await refused(await ProtocolClient.connect(server.url, **bearer(key))))["data"]["message"]


async def test_seed_conversation_with_a_key_byte_for_byte_and_the_key_is_nowhere(daphne_factory, fake_llm):
    """A key works through the whole seed conversation, frame for frame; then the key is in no log line,
    no frame and no database column in clear."""
    server = daphne_factory(R2D2_REQUIRE_AUTH="1", R2D2_LOG_LEVEL="DEBUG")
    row, key = await make_key("postman")
    client = await ProtocolClient.connect(server.url, **bearer(key))
    await seed_conversation(client)
    await client.close()

    # Revoke it too, so the refusal and revocation paths have logged whatever they log.
    await sync_to_async(auth.revoke)(row)
    await refused(await ProtocolClient.connect(server.url, **bearer(key)))
    server.stop()
    assert "connection refused" in server.log() and "session started" in server.log()  # the log is not empty
    secret = key[len(row.prefix) :]
    assert secret not in server.log()
    assert all(secret not in frame for frame in client.received)
    assert not await sync_to_async(database_contains)(secret)


def database_contains(text: str) -> list[str]:
    """Every text column of every table that holds `text` anywhere."""
    found = []
    with connection.cursor() as cursor:
        for table in connection.introspection.table_names():
            for column in connection.introspection.get_table_description(cursor, table):
                name = connection.ops.quote_name(column.name)
                try:
                    cursor.execute(
                        f"SELECT 1 FROM {connection.ops.quote_name(table)} WHERE CAST({name} AS TEXT) LIKE %s",
                        [f"%{text}%"],
                    )
                except Exception:
                    continue
                if cursor.fetchone():
                    found.append(f"{table}.{column.name}")
    return found


async def test_terminal_client_sends_its_key(daphne_factory, fake_llm):
    server = daphne_factory(R2D2_REQUIRE_AUTH="1")
    _, key = await make_key("terminal")

    def chat(**env: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "manage.py", "chat", "--url", server.url, "--no-stream"],
            cwd=ROOT,
            env=server_env(None, **env),
            input="Hello\n",
            capture_output=True,
            text=True,
            timeout=60,
        )

    ok = await sync_to_async(chat)(R2D2_API_KEY=key)
    assert ok.returncode == 0 and ok.stdout == "Echo: Hello\n", ok.stderr
    without = await sync_to_async(chat)()
    assert without.returncode == 1 and "unauthorized" in without.stderr and "Traceback" not in without.stderr


async def test_a_keys_model_list_is_what_it_may_use(daphne_factory):
    """`chatbot_models` answers what this principal may choose: the key's own list where it has one
    (narrowing the server's allow-list when there is one), else the server's."""
    server = daphne_factory(R2D2_REQUIRE_AUTH="1", R2D2_ALLOWED_MODELS="gpt-4o-mini,gpt-4o,o3")
    _, narrow = await make_key("narrow", models=["gpt-4o", "o3", "not-on-the-server"])
    _, plain = await make_key("plain")
    for key, expected in ((narrow, ["gpt-4o", "o3"]), (plain, ["gpt-4o-mini", "gpt-4o", "o3"])):
        client = await ProtocolClient.connect(server.url, **bearer(key))
        await client.send({"action": "chatbot_models"})
        frame = await client.recv()
        assert [m["id"] for m in frame["data"]] == expected
        await client.close()


async def test_a_keys_output_cap_is_the_requests_output_limit_on_both_providers(daphne_factory, fake_llm, fake_bedrock):
    """`--max-output-tokens 3`: the OpenAI-compatible server is sent max_tokens 3, Bedrock inferenceConfig.maxTokens
    3, and each stops the reply there; a key without a cap sends neither."""
    server = daphne_factory(R2D2_REQUIRE_AUTH="1", **bedrock_env(fake_bedrock, "amazon.nova-lite-v1:0"))
    _, capped = await make_key("capped", max_output_tokens=3)
    _, free = await make_key("free")
    client = await ProtocolClient.connect(server.url, **bearer(capped))
    for model in ("gpt-4o-mini", "amazon.nova-lite-v1:0"):
        session = await client.start_session(gpt_model=model)
        for stream in (False, True):
            frames = await client.post(session, "one two three four five six", stream=stream)
            assert {"type": "message", "data": "Echo: one two "} in frames, (model, stream, frames)
    assert [r.body["max_tokens"] for r in fake_llm.requests] == [3, 3]
    assert [r.body["inferenceConfig"] for r in fake_bedrock.requests] == [{"maxTokens": 3}] * 2

    client = await ProtocolClient.connect(server.url, **bearer(free))
    session = await client.start_session(gpt_model="gpt-4o-mini")
    assert {"type": "message", "data": "Echo: one two three"} in await client.post(session, "one two three")
    assert "max_tokens" not in fake_llm.requests[-1].body


async def test_terminal_client_prints_the_usage_frame(daphne_factory, fake_llm):
    """`manage.py chat --usage`: the server's usage frame for the key, as sent, and nothing else."""
    server = daphne_factory(R2D2_REQUIRE_AUTH="1")
    _, key = await make_key("counted", tokens_per_day=5000, max_sessions=3)
    client = await ProtocolClient.connect(server.url, **bearer(key))
    await client.post(await client.start_session(), "count me")

    result = await sync_to_async(subprocess.run)(
        [sys.executable, "manage.py", "chat", "--url", server.url, "--usage"],
        cwd=ROOT,
        env=server_env(None, R2D2_API_KEY=key),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    [line] = result.stdout.splitlines()
    frame = json.loads(line)
    assert frame["type"] == "usage"
    assert frame["data"]["sessions"] == {"used": 1, "limit": 3}
    assert frame["data"]["tokens_today"]["limit"] == 5000 and frame["data"]["tokens_today"]["used"] > 0
