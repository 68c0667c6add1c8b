"""The web chat page in two tabs of one signed-in person (issue 28), in Debian's Chromium: the second tab lists the
first's running session, follows it as it streams, and may type into it; both tabs see every reply."""

from __future__ import annotations

import pytest
from django.contrib.auth import get_user_model
from playwright.sync_api import expect

from testkit.fake_llm import Script
from tests.interfaces.test_chat_page import in_thread

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.django_db(transaction=True)]

STORY = " ".join(f"word{n}" for n in range(40))


def test_two_tabs_follow_one_conversation_and_either_may_type(browser_page, daphne_factory, fake_llm):
    server = daphne_factory(R2D2_REQUIRE_AUTH="1")
    in_thread(lambda: get_user_model().objects.create_user("ada", password="pw-for-tests-1"))
    first = browser_page
    first.goto(server.http_url + "/")
    first.fill("#id_username", "ada")
    first.fill("#id_password", "pw-for-tests-1")
    first.click("#sign-in")
    expect(first.locator("#connection")).to_have_text("Connected")
    first.click("#start")
    expect(first.locator("#session-bar")).to_be_visible()
    session_id = first.locator("#session-id").inner_text()

    # The first tab's reply streams; the second tab (same sign-in) lists the session and follows it mid-reply.
    fake_llm.enqueue(Script(text=STORY, token_delay=0.15))
    first.fill("#input", "Tell me a story")
    first.keyboard.press("Enter")
    expect(first.locator(".msg-assistant .text").last).to_contain_text("word3")
    second = first.context.new_page()
    second.goto(server.http_url + "/")
    expect(second.locator("#running")).to_be_visible()
    follow = second.locator(f'#running-list button[data-session-id="{session_id}"]')
    expect(follow).to_be_visible()
    follow.click()
    expect(second.locator("#session-id")).to_have_text(session_id)
    expect(second.locator(".msg-user .text").first).to_have_text("Tell me a story")
    reply = second.locator(".msg-assistant .text").last
    second.wait_for_function(
        "([el, full]) => el.textContent.length > 0 && el.textContent.length < full.length",
        arg=[reply.element_handle(), STORY],
    )
    expect(reply).to_have_text(STORY)
    expect(first.locator(".msg-assistant .text").last).to_have_text(STORY)

    # The second tab types: the reply streams in both.
    expect(second.locator("#send")).to_be_enabled()
    second.fill("#input", "And then?")
    second.keyboard.press("Enter")
    expect(second.locator(".msg-assistant .text").last).to_have_text("Echo: And then?")
    expect(first.locator(".msg-assistant .text").last).to_have_text("Echo: And then?")
    expect(first.locator(".msg-user.earlier .text").last).to_have_text("(sent from another tab or device)")

    # The first tab ends it: the second is told, and lists nothing running.
    first.click("#end")
    expect(second.locator("#setup")).to_be_visible()
    expect(second.locator("#running")).to_be_hidden()
