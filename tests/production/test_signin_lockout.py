"""Sign-in lockout (django-axes) on a live server behind a trusted proxy: after 10 failed sign-ins for
one username from one client address, that pair gets 429 for 15 minutes, on the page and in the admin;
other usernames and other addresses sign in as usual."""

from __future__ import annotations

import asyncio
import http.client
import re
import urllib.parse
from datetime import timedelta
from http.cookies import SimpleCookie

import pytest
from asgiref.sync import sync_to_async
from axes.models import AccessAttempt
from django.contrib.auth import get_user_model
from django.contrib.auth.hashers import PBKDF2PasswordHasher

pytestmark = pytest.mark.django_db(transaction=True)

PASSWORD = "correct-horse-battery-9"
GUESS = "guess-1234-wrong"
LIMIT = 10


class QuickHasher(PBKDF2PasswordHasher):
    """The server's own algorithm with few rounds (a stored hash names its rounds): each of the
    many wrong passwords below is then checked in a millisecond instead of most of a second."""

    iterations = 1000


async def create_user(username: str, *, is_staff: bool = False) -> None:
    hasher = QuickHasher()
    password = hasher.encode(PASSWORD, hasher.salt())
    await get_user_model().objects.acreate(username=username, password=password, is_staff=is_staff)


class Browser:
    """One client behind the load balancer: its address arrives in X-Forwarded-For; cookies are kept."""

    def __init__(self, port: int, forwarded_for: str) -> None:
        self.port = port
        self.forwarded_for = forwarded_for
        self.cookies: dict[str, str] = {}

    def request(self, method: str, path: str, form: dict[str, str] | None = None) -> tuple[int, dict, str]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=15)
        headers = {"Host": "localhost", "X-Forwarded-For": self.forwarded_for}
        if self.cookies:
            headers["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        body = None
        if form is not None:
            body = urllib.parse.urlencode(form)
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        try:
            connection.request(method, path, body=body, headers=headers)
            response = connection.getresponse()
            for value in response.headers.get_all("Set-Cookie") or []:
                for name, morsel in SimpleCookie(value).items():
                    self.cookies[name] = morsel.value
            return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read().decode()
        finally:
            connection.close()

    def sign_in(self, path: str, username: str, password: str) -> tuple[int, dict, str]:
        status, _, page = self.request("GET", path)
        assert status == 200, (status, page[:500])
        token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page).group(1)
        form = {"csrfmiddlewaretoken": token, "username": username, "password": password}
        if path.startswith("/admin/"):
            form["next"] = "/admin/"
        return self.request("POST", path, form)


def signed_in(result: tuple[int, dict, str]) -> bool:
    status, headers, _ = result
    return status == 302 and "sessionid" in headers.get("set-cookie", "")


def refused(result: tuple[int, dict, str]) -> bool:
    status, headers, page = result
    return status == 429 and 'id="locked-out"' in page and headers.get("retry-after") == "900"


async def lock_out(port: int, path: str, username: str, address: str) -> None:
    """LIMIT wrong passwords; each but the last is answered with the form again (200)."""
    browser = Browser(port, address)
    for attempt in range(LIMIT):
        status, _, page = await asyncio.to_thread(browser.sign_in, path, username, f"{GUESS}-{attempt}")
        assert status == (429 if attempt == LIMIT - 1 else 200), (attempt, status)


async def attempt(port: int, path: str, username: str, address: str) -> tuple[int, dict, str]:
    return await asyncio.to_thread(Browser(port, address).sign_in, path, username, PASSWORD)


@pytest.mark.parametrize("path", ["/accounts/login/", "/admin/login/"])
async def test_ten_failures_lock_that_username_from_that_address(daphne_factory, path):
    server = daphne_factory(R2D2_TRUSTED_PROXIES="1", R2D2_REQUIRE_AUTH="1")
    await create_user("ada", is_staff=True)
    await create_user("bob", is_staff=True)
    guesser, elsewhere = "203.0.113.9", "198.51.100.7"

    # Nine failures are not yet a lockout: the right password still works, and clears the count.
    browser = Browser(server.port, guesser)
    for index in range(LIMIT - 1):
        assert (await asyncio.to_thread(browser.sign_in, path, "ada", f"{GUESS}-{index}"))[0] == 200
    assert signed_in(await attempt(server.port, path, "ada", guesser))

    await lock_out(server.port, path, "ada", guesser)
    page = await attempt(server.port, path, "ada", guesser)
    assert refused(page), page[:2]  # even with the right password
    assert "Too many failed sign-ins" in page[2] and "15 minutes" in page[2]
    # The address is the one the trusted proxy saw: what the client puts before it changes nothing.
    assert refused(await attempt(server.port, path, "ada", f"10.1.2.3, {guesser}"))

    # Another username from that address, and that username from another address, are not affected.
    assert signed_in(await attempt(server.port, path, "bob", guesser))
    assert signed_in(await attempt(server.port, path, "ada", elsewhere))

    # Fifteen minutes after the last attempt, the pair may sign in again.
    [row] = [a async for a in AccessAttempt.objects.filter(username="ada", ip_address=guesser)]
    row.attempt_time -= timedelta(minutes=14)
    await row.asave(update_fields=["attempt_time"])
    assert refused(await attempt(server.port, path, "ada", guesser))
    await AccessAttempt.objects.filter(id=row.id).aupdate(attempt_time=row.attempt_time - timedelta(minutes=16))
    assert signed_in(await attempt(server.port, path, "ada", guesser))

    log = server.log()
    assert GUESS not in log and PASSWORD not in log
    assert log.count("AXES: Repeated login failure") == 1, "a client's failures are logged once a minute"


async def test_axes_reset_lifts_a_lockout(daphne_factory, manage):
    server = daphne_factory(R2D2_TRUSTED_PROXIES="1", R2D2_REQUIRE_AUTH="1")
    await create_user("ada")
    await lock_out(server.port, "/accounts/login/", "ada", "203.0.113.9")
    assert refused(await attempt(server.port, "/accounts/login/", "ada", "203.0.113.9"))
    result = await sync_to_async(manage)("axes_reset")
    assert result.returncode == 0, result.stderr
    assert signed_in(await attempt(server.port, "/accounts/login/", "ada", "203.0.113.9"))
