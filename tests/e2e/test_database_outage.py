"""An unexpected failure in a handler costs one `internal_error` frame, never the socket (no 1011)."""

import pytest

from testkit.client import ProtocolClient

pytestmark = pytest.mark.django_db(transaction=True)


async def test_a_database_outage_answers_internal_error_and_keeps_the_socket(daphne_factory, fake_llm):
    """The server's database is unreachable (nothing listens on its port): every action that needs it
    answers `internal_error`, the socket stays open, and the failure is logged with its traceback."""
    server = daphne_factory(
        DATABASE_URL="postgres://postgres@127.0.0.1:9/r2d2_nowhere", R2D2_DB_POOL_TIMEOUT="1", R2D2_DB_POOL_MIN="0"
    )
    client = await ProtocolClient.connect(server.url)
    for _ in range(2):
        await client.send({"action": "chatbot_session_start"})
        frame = await client.recv(timeout=20)
        assert frame["type"] == "error" and frame["data"]["code"] == "internal_error", frame
    await client.send({"action": "nonsense"})
    assert (await client.recv())["data"]["code"] == "unknown_action"  # still reading frames
    assert client.connection.close_code is None  # the server never closed it (no 1011)
    await client.close()
    assert client.connection.close_code == 1000
    log = server.log()
    assert "frame handling failed" in log and "Traceback" in log
