"""Where the Procfile's Daphne listens (issue 26): only where the bundle's nginx reaches it, 127.0.0.1.

With R2D2_TRUSTED_PROXIES set, the server takes the client's address from X-Forwarded-For (chat/edge/proxy.py);
a Daphne reachable on the host's own address would let any host that reaches port 8000 name its own address
there, past the sign-in lockout and the connection caps."""

from __future__ import annotations

import re
import socket

import pytest

from testkit.server import ROOT, server_env
from tests.production.bundle import ProcfileServer, environment_properties, procfile_commands


def outward_address() -> str | None:
    """This host's address on its default route (no packet is sent: a UDP socket's connect only picks a route)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.200", 9))
        except OSError:
            return None
        address = probe.getsockname()[0]
    return None if address.startswith("127.") else address


def reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def test_the_procfile_binds_where_nginx_proxies():
    web = procfile_commands()["web"]
    application = (ROOT / ".platform/nginx/conf.d/elasticbeanstalk/00_application.conf").read_text()
    [upstream] = re.findall(r"proxy_pass\s+http://([\d.]+):\d+;", application)
    assert re.search(r"(^|\s)-b\s+(\S+)", web).group(2) == upstream == "127.0.0.1"
    assert environment_properties()["R2D2_TRUSTED_PROXIES"] == "2"


@pytest.mark.django_db(transaction=True)
def test_the_procfile_server_is_not_reachable_from_other_hosts(fake_llm, tmp_path):
    """The Procfile's command, run verbatim: nginx's 127.0.0.1 reaches it, the host's own address does not."""
    outward = outward_address()
    if outward is None:
        pytest.skip("this host has no address but loopback")
    env = server_env(fake_llm, **{k: v for k, v in environment_properties().items() if k != "PORT"})
    server = ProcfileServer(env, tmp_path / "web.log", ROOT).start()
    try:
        assert reachable("127.0.0.1", server.port)
        assert not reachable(outward, server.port), f"Daphne answers on {outward}:{server.port}"
    finally:
        server.stop()
