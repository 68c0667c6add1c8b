"""Signed in on the web page, in Debian's Chromium: sign-in, past conversations, a transcript, continuing one."""

from __future__ import annotations

from decimal import Decimal

import pytest
from django.contrib.auth import get_user_model
from playwright.sync_api import expect

from chat.models import ChatSession, UserLimits
from tests.interfaces.test_chat_page import in_thread

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.django_db(transaction=True)]


def test_sign_in_see_history_and_continue_a_conversation(browser_page, daphne_factory, fake_llm):
    server = daphne_factory(R2D2_REQUIRE_AUTH="1")
    in_thread(lambda: get_user_model().objects.create_user("ada", password="pw-for-tests-1"))
    page = browser_page
    csp_errors: list[str] = []
    page.on("console", lambda m: csp_errors.append(m.text) if "Content Security Policy" in m.text else None)

    # Not signed in: the sign-in form, and no chat.
    page.goto(server.http_url + "/")
    expect(page.locator("#signin")).to_be_visible()
    expect(page.locator("#start")).to_have_count(0)
    page.fill("#id_username", "ada")
    page.fill("#id_password", "wrong")
    page.click("#sign-in")
    expect(page.locator(".notice")).to_contain_text("do not match")
    page.fill("#id_password", "pw-for-tests-1")
    page.click("#sign-in")

    # Signed in: the chat, the user's name, a session recorded as theirs.
    expect(page.locator("#signed-in")).to_have_text("ada")
    expect(page.locator("#connection")).to_have_text("Connected")
    page.click("#start")
    expect(page.locator("#session-bar")).to_be_visible()
    session_id = page.locator("#session-id").inner_text()
    page.fill("#input", "My name is Ada")
    page.keyboard.press("Enter")
    expect(page.locator(".msg-assistant .text").last).to_have_text("Echo: My name is Ada")
    page.click("#end")
    expect(page.locator("#setup")).to_be_visible()
    assert in_thread(lambda: ChatSession.objects.get(id=session_id).user.username) == "ada"

    # Past conversations, newest first; one opens as a transcript.
    page.reload()
    page.click("#history summary")
    page.click("#history a >> text=My name is Ada")
    expect(page.locator(".msg-user .text")).to_have_text("My name is Ada")
    expect(page.locator(".msg-assistant .text")).to_have_text("Echo: My name is Ada")

    # Continue it: the earlier turns are shown and the model is given them.
    page.click("#continue")
    expect(page.locator("#continuing")).to_be_visible()
    expect(page.locator("#connection")).to_have_text("Connected")
    page.click("#start")
    expect(page.locator(".msg-user.earlier .text")).to_have_text("My name is Ada")
    page.fill("#input", "What is my name?")
    page.keyboard.press("Enter")
    expect(page.locator(".msg-assistant .text").last).to_have_text("Echo: What is my name?")
    assert fake_llm.requests[-1].messages == [
        {"role": "user", "content": "My name is Ada"},
        {"role": "assistant", "content": "Echo: My name is Ada"},
        {"role": "user", "content": "What is my name?"},
    ]
    new_id = page.locator("#session-id").inner_text()
    assert in_thread(lambda: str(ChatSession.objects.get(id=new_id).continued_from_id)) == session_id

    # Sign out: back to the sign-in form.
    page.click("#sign-out")
    expect(page.locator("#signin")).to_be_visible()
    assert not csp_errors, csp_errors


@pytest.mark.django_db
def test_another_persons_conversation_is_not_found(client):
    owner = get_user_model().objects.create_user("ada")
    session = ChatSession.objects.create(model="m", user=owner)
    client.force_login(get_user_model().objects.create_user("bob"))
    assert client.get(f"/conversations/{session.id}/").status_code == 404
    assert "continueFrom" not in client.get(f"/?continue={session.id}").content.decode()
    client.logout()
    assert client.get(f"/conversations/{session.id}/").status_code == 302  # to sign in


def test_the_page_shows_todays_spend_against_the_persons_limit(browser_page, daphne_factory, fake_llm):
    """Signed in, the header shows what the person spent today against their own limit, after each turn;
    past 80% of it, marked."""
    # A tenth of a cent a token; a turn reserves its prompt and 20 tokens of reply.
    server = daphne_factory(
        R2D2_REQUIRE_AUTH="1", R2D2_MODEL_PRICES="gpt-3.5-turbo=1000:1000", R2D2_QUOTA_RESERVE_OUTPUT_TOKENS="20"
    )

    def ada() -> None:
        user = get_user_model().objects.create_user("ada", password="pw-for-tests-1")
        UserLimits.objects.create(user=user, usd_per_day=Decimal("0.037"))

    in_thread(ada)
    page = browser_page
    page.goto(server.http_url + "/")
    page.fill("#id_username", "ada")
    page.fill("#id_password", "pw-for-tests-1")
    page.click("#sign-in")
    expect(page.locator("#spend")).to_have_text("Today: $0.0000 of $0.0370 · 0 of 200,000 tokens")
    page.click("#start")
    expect(page.locator("#session-bar")).to_be_visible()
    page.fill("#input", "a question of some twenty tokens, give or take a few more words")
    page.keyboard.press("Enter")
    expect(page.locator(".msg-assistant .text").last).to_contain_text("Echo: a question")
    # It reserved 16 + 20 tokens ($0.036); the model counted 16 prompt and 14 reply tokens: 81% of the limit.
    expect(page.locator("#spend")).to_have_text("Today: $0.0300 of $0.0370 · 30 of 200,000 tokens")
    expect(page.locator("#spend")).to_have_class("who spend near")
