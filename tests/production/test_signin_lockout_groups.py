"""Sign-in lockout counts a client as the caps do (issue 26): IPv6 by its /64, an IPv4-mapped IPv6 address as
its IPv4 address (chat/ops/addresses.py). A host picks any address of its /64 at will: counted one by one, each
new address would bring ten fresh guesses."""

from __future__ import annotations

import asyncio

import pytest

from tests.production.test_signin_lockout import GUESS, LIMIT, Browser, attempt, create_user, refused, signed_in

pytestmark = pytest.mark.django_db(transaction=True)


async def guess(port: int, address: str, times: int) -> None:
    browser = Browser(port, address)
    for index in range(times):
        status, _, _ = await asyncio.to_thread(browser.sign_in, "/accounts/login/", "ada", f"{GUESS}-{index}")
        assert status in (200, 429), status


async def test_addresses_of_one_ipv6_64_are_one_client(daphne_factory):
    server = daphne_factory(R2D2_TRUSTED_PROXIES="1", R2D2_REQUIRE_AUTH="1")
    await create_user("ada")
    for host in ("a", "b", "c"):
        await guess(server.port, f"2001:db8:7:1::{host}", LIMIT)
    # A fourth address of the same /64, with the right password: the same client, locked out.
    assert refused(await attempt(server.port, "/accounts/login/", "ada", "2001:db8:7:1:ffff::d"))
    # Another /64 is another client.
    assert signed_in(await attempt(server.port, "/accounts/login/", "ada", "2001:db8:7:2::a"))


async def test_an_ipv4_mapped_address_is_its_ipv4_address(daphne_factory):
    server = daphne_factory(R2D2_TRUSTED_PROXIES="1", R2D2_REQUIRE_AUTH="1")
    await create_user("ada")
    await guess(server.port, "::ffff:203.0.113.9", LIMIT)
    assert refused(await attempt(server.port, "/accounts/login/", "ada", "203.0.113.9"))
    assert signed_in(await attempt(server.port, "/accounts/login/", "ada", "203.0.113.10"))
