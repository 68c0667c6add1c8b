"""At most R2D2_MAX_CONNECTIONS_PER_ADDRESS open sockets per client address, over real sockets against
live Daphne processes; across processes when they share Redis."""

from __future__ import annotations

import asyncio
import json
import random

import pytest
import redis.asyncio as aioredis
import websockets
from django.conf import settings

from chat.edge.connection_limits import CLOSE_TOO_MANY_CONNECTIONS, PROCESS_TTL
from tests.client import ProtocolClient

pytestmark = pytest.mark.django_db(transaction=True)

CAP = 3


def fresh_address() -> str:
    """A documentation address of its own, so runs sharing one Redis never count each other's sockets."""
    return f"198.51.{random.randint(0, 255)}.{random.randint(1, 254)}"


async def connect(server, address: str) -> websockets.ClientConnection:
    return await websockets.connect(server.url, additional_headers={"X-Forwarded-For": address})


async def assert_refused(server, address: str) -> None:
    connection = await connect(server, address)  # the handshake itself is accepted
    frame = json.loads(await asyncio.wait_for(connection.recv(), 10))
    assert frame["type"] == "error" and frame["data"]["code"] == "too_many_connections", frame
    with pytest.raises(websockets.ConnectionClosed):
        await asyncio.wait_for(connection.recv(), 10)
    assert connection.close_code == CLOSE_TOO_MANY_CONNECTIONS == 4429


async def connect_when_released(server, address: str, timeout: float = 10.0) -> ProtocolClient:
    """A new socket once a closed one has been released (its application finishing takes a moment)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        connection = await connect(server, address)
        try:
            frame = json.loads(await asyncio.wait_for(connection.recv(), 0.3))
        except TimeoutError:
            return ProtocolClient(connection)  # no refusal frame: accepted
        assert frame["data"]["code"] == "too_many_connections"
        assert asyncio.get_running_loop().time() < deadline, "the closed socket was never released"
        await asyncio.sleep(0.2)


async def test_one_address_gets_at_most_the_cap(daphne_factory):
    server = daphne_factory(R2D2_MAX_CONNECTIONS_PER_ADDRESS=str(CAP), R2D2_TRUSTED_PROXIES="1")
    address = fresh_address()
    clients = [ProtocolClient(await connect(server, address)) for _ in range(CAP)]
    for client in clients:
        assert await client.start_session()
    await assert_refused(server, address)
    # Another address is not affected.
    other = ProtocolClient(await connect(server, fresh_address()))
    assert await other.start_session()

    await clients.pop().close()
    again = await connect_when_released(server, address)
    assert await again.start_session()
    for client in [*clients, again, other]:
        await client.close()


async def test_zero_disables_the_cap(daphne_factory):
    server = daphne_factory(R2D2_MAX_CONNECTIONS_PER_ADDRESS="0")
    clients = [await ProtocolClient.connect(server.url) for _ in range(CAP + 2)]
    for client in clients:
        assert await client.start_session()
        await client.close()


@pytest.mark.redis
async def test_the_cap_holds_across_processes_and_forgets_a_killed_one(daphne_factory):
    env = {"R2D2_MAX_CONNECTIONS_PER_ADDRESS": str(CAP), "R2D2_TRUSTED_PROXIES": "1"}
    first, second = daphne_factory(**env), daphne_factory(**env)
    address = fresh_address()
    held = [await connect(first, address) for _ in range(CAP - 1)] + [await connect(second, address)]
    for connection in held:
        await connection.send(json.dumps({"action": "chatbot_session_start"}))
        assert json.loads(await asyncio.wait_for(connection.recv(), 10))["type"] == "session_start"
    await assert_refused(first, address)
    await assert_refused(second, address)

    # A SIGKILLed process's sockets stop counting once its liveness key expires (PROCESS_TTL s;
    # here expired by hand rather than waited for). The first process held CAP - 1 of them.
    first.kill()
    client = aioredis.Redis.from_url(settings.REDIS_URL)
    try:
        prefix = settings.CHANNEL_LAYERS["default"]["CONFIG"]["prefix"]
        counts = {k.decode(): int(v) for k, v in (await client.hgetall(f"{prefix}:conns:{address}")).items()}
        assert sorted(counts.values()) == [1, CAP - 1]
        [killed] = [process for process, count in counts.items() if count == CAP - 1]
        process_key = f"{prefix}:conns-process:{killed}"
        assert 0 < await client.ttl(process_key) <= PROCESS_TTL, "a process key must expire by itself"
        await client.delete(process_key)
    finally:
        await client.aclose()
    survivor = await connect_when_released(second, address)
    assert await survivor.start_session()
    await survivor.close()
    await held[-1].close()
