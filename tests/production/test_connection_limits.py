"""At most R2D2_MAX_CONNECTIONS_PER_ADDRESS open anonymous sockets per client address (IPv6 by /64), and
R2D2_MAX_CONNECTIONS_PER_PRINCIPAL per API key or account, over real sockets against live Daphne
processes; across processes when they share Redis."""

from __future__ import annotations

import asyncio
import json
import random

import pytest
import redis.asyncio as aioredis
import websockets
from asgiref.sync import sync_to_async
from django.conf import settings

from chat.accounts import auth
from chat.edge.connection_limits import CLOSE_TOO_MANY_CONNECTIONS, PROCESS_TTL
from testkit.client import ProtocolClient

pytestmark = pytest.mark.django_db(transaction=True)

CAP = 3


def fresh_address() -> str:
    """A documentation address of its own, so runs sharing one Redis never count each other's sockets."""
    return f"198.51.{random.randint(0, 255)}.{random.randint(1, 254)}"


def fresh_network() -> str:
    """An IPv6 documentation /64 of its own (2001:db8::/32), as a prefix to add an interface id to."""
    return f"2001:db8:{random.randint(0, 0xFFFF):x}:{random.randint(0, 0xFFFF):x}:"


async def connect(server, address: str, key: str | None = None) -> websockets.ClientConnection:
    headers = {"X-Forwarded-For": address, **({"Authorization": f"Bearer {key}"} if key else {})}
    return await websockets.connect(server.url, additional_headers=headers)


async def assert_refused(server, address: str, key: str | None = None) -> str:
    """The socket gets one too_many_connections frame, then close code 4429; returns the frame's message."""
    connection = await connect(server, address, key)  # the handshake itself is accepted
    frame = json.loads(await asyncio.wait_for(connection.recv(), 10))
    assert frame["type"] == "error" and frame["data"]["code"] == "too_many_connections", frame
    with pytest.raises(websockets.ConnectionClosed):
        await asyncio.wait_for(connection.recv(), 10)
    assert connection.close_code == CLOSE_TOO_MANY_CONNECTIONS == 4429
    return frame["data"]["message"]


async def connect_when_released(server, address: str, key: str | None = None, timeout: float = 10.0) -> ProtocolClient:
    """A new socket once a closed one has been released (its application finishing takes a moment)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        connection = await connect(server, address, key)
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
        hash_key = f"{prefix}:conns:address:{address}"
        counts = {k.decode(): int(v) for k, v in (await client.hgetall(hash_key)).items()}
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


async def test_ipv6_addresses_count_by_their_64(daphne_factory):
    server = daphne_factory(R2D2_MAX_CONNECTIONS_PER_ADDRESS=str(CAP), R2D2_TRUSTED_PROXIES="1")
    network = fresh_network()
    # Each socket from another address of the same /64: one client all the same.
    clients = [ProtocolClient(await connect(server, f"{network}:{index + 1:x}")) for index in range(CAP)]
    for client in clients:
        assert await client.start_session()
    assert "This address already has 3" in await assert_refused(server, f"{network}:ffff")
    # The next /64 is another client.
    neighbour = fresh_network()
    other = ProtocolClient(await connect(server, f"{neighbour}:1"))
    assert await other.start_session()
    for client in [*clients, other]:
        await client.close()


async def test_sockets_with_a_key_count_per_key_not_per_address(daphne_factory):
    """An office behind one NAT address: each person's key has its own cap; anonymous sockets keep the address's."""
    server = daphne_factory(
        R2D2_MAX_CONNECTIONS_PER_ADDRESS="2", R2D2_MAX_CONNECTIONS_PER_PRINCIPAL=str(CAP), R2D2_TRUSTED_PROXIES="1"
    )
    office = fresh_address()
    _, ada = await sync_to_async(auth.create_api_key)("ada-laptop")
    _, bob = await sync_to_async(auth.create_api_key)("bob-laptop")

    adas = [ProtocolClient(await connect(server, office, ada)) for _ in range(CAP)]  # more than the address's 2
    for client in adas:
        assert await client.start_session()
    assert "This API key already has 3" in await assert_refused(server, office, ada)
    # Ada's key is capped wherever she connects from.
    assert "This API key" in await assert_refused(server, fresh_address(), ada)

    bobs = [ProtocolClient(await connect(server, office, bob)) for _ in range(CAP)]
    for client in bobs:
        assert await client.start_session()
    anonymous = [ProtocolClient(await connect(server, office)) for _ in range(2)]
    for client in anonymous:
        assert await client.start_session()
    assert "This address already has 2" in await assert_refused(server, office)

    # A closed socket frees its key's slot.
    await adas.pop().close()
    again = await connect_when_released(server, office, ada)
    assert await again.start_session()
    for client in [*adas, *bobs, *anonymous, again]:
        await client.close()


async def test_a_wrong_key_counts_towards_its_address(daphne_factory):
    server = daphne_factory(R2D2_MAX_CONNECTIONS_PER_ADDRESS="1", R2D2_TRUSTED_PROXIES="1")
    address = fresh_address()
    held = ProtocolClient(await connect(server, address))
    assert await held.start_session()
    await assert_refused(server, address, "r2d2_not-a-key-at-all")
    await held.close()
