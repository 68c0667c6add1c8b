"""A database that cannot be reached costs each frame one `storage_unavailable` frame, never the socket (no 1011)."""

import pytest

from testkit.client import ProtocolClient

pytestmark = pytest.mark.django_db(transaction=True)


async def test_a_database_outage_answers_storage_unavailable_and_keeps_the_socket(daphne_factory, fake_llm):
    """The server's database is unreachable (nothing listens on its port): every action that needs it answers
    `storage_unavailable` once its retry window has passed, the socket stays open, and the outage is logged
    once as a warning, with no traceback (it is not R2D2's bug)."""
    server = daphne_factory(
        DATABASE_URL="postgres://postgres@127.0.0.1:9/r2d2_nowhere",
        R2D2_DB_POOL_TIMEOUT="1",
        R2D2_DB_POOL_MIN="0",
        R2D2_STORAGE_RETRY_SECONDS="1",
    )
    client = await ProtocolClient.connect(server.url)
    for _ in range(2):
        await client.send({"action": "chatbot_session_start"})
        frame = await client.recv(timeout=20)
        assert frame["type"] == "error" and frame["data"]["code"] == "storage_unavailable", frame
    await client.send({"action": "nonsense"})
    assert (await client.recv())["data"]["code"] == "unknown_action"  # still reading frames
    assert client.connection.close_code is None  # the server never closed it (no 1011)
    await client.close()
    assert client.connection.close_code == 1000
    log = server.log()
    assert log.count("storage unavailable") == 1, log
    assert "frame handling failed" not in log and "Traceback" not in log
