"""The server runs on uvloop (r2d2site/loop.py) as the Procfile starts it, and on asyncio's own loop
with R2D2_UVLOOP=0; a conversation works on both."""

from __future__ import annotations

import pytest

from testkit.client import ProtocolClient

pytestmark = pytest.mark.django_db(transaction=True)


def loaded_uvloop(pid: int) -> bool:
    """Whether uvloop's compiled loop is mapped into the process (it is imported only to be used)."""
    with open(f"/proc/{pid}/maps") as maps:
        return any("uvloop" in line for line in maps)


@pytest.mark.parametrize(("setting", "uvloop"), [(None, True), ("0", False)], ids=["default", "R2D2_UVLOOP=0"])
async def test_the_server_loop_follows_the_setting(daphne_factory, setting, uvloop):
    server = daphne_factory(**({"R2D2_UVLOOP": setting} if setting else {}))
    client = await ProtocolClient.connect(server.url)
    session_id = await client.start_session()
    frames = await client.post(session_id, "hello")
    assert [f["type"] for f in frames] == ["processing_start", "message", "processing_end"]
    assert frames[1]["data"] == "Echo: hello"
    await client.close()
    assert loaded_uvloop(server.process.pid) is uvloop
