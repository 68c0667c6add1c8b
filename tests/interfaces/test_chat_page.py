"""The web chat page, in Debian's Chromium, against a live Daphne and the local model server."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import connections
from playwright.sync_api import expect

from chat.models import ChatMessage, ChatSession, EndReason, MessageStatus, Role
from testkit.drops import PostDroppingProxy, error_codes, restarting
from testkit.fake_llm import SECRET_DETAIL, Script
from testkit.server import bedrock_env
from testkit.wait import wait_until
from tests.conftest import ARTIFACTS

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.django_db(transaction=True)]


def in_thread(query):
    """Run an ORM query off the Playwright thread (its sync API keeps an event loop running there)."""

    def run():
        try:
            return query()
        finally:
            connections.close_all()

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(run).result()


STORY = "Beep boop. " + " ".join(f"word{n}" for n in range(60))


@pytest.mark.django_db
def test_page_is_served_with_its_own_assets(client):
    """GET / is the chat page; its script and stylesheet come from this server, not a CDN."""
    response = client.get("/")
    assert response.status_code == 200
    html = response.content.decode()
    assert '<script src="/static/chat/chat.js"' in html
    assert '<link rel="stylesheet" href="/static/chat/chat.css">' in html
    assert "https://" not in html and "http://" not in html


def test_chat_in_a_real_browser(browser_page, daphne, fake_llm):
    """Start a session, watch a reply stream in, stop one, see an error, end the session, survive a dropped socket."""
    page = browser_page
    page.goto(daphne.http_url + "/")
    expect(page.locator("#connection")).to_have_text("Connected")

    page.fill("#model", "gpt-4o-mini")
    page.fill("#system", "You are a test droid.")
    page.click("#start")
    expect(page.locator("#session-bar")).to_be_visible()
    session_id = page.locator("#session-id").inner_text()
    assert in_thread(lambda: ChatSession.objects.get(id=session_id).model) == "gpt-4o-mini"

    # A streamed reply appears piece by piece, then whole.
    reply_text = "Hello there, I am R2D2 and these words arrive one at a time."
    fake_llm.enqueue(Script(text=reply_text, token_delay=0.08))
    page.fill("#input", "Hello, droid")
    page.keyboard.press("Enter")
    expect(page.locator(".msg-user .text")).to_have_text("Hello, droid")
    reply = page.locator(".msg-assistant .text").last
    page.wait_for_function(
        "([el, full]) => el.textContent.length > 0 && el.textContent.length < full.length",
        arg=[reply.element_handle(), reply_text],
    )
    expect(reply).to_have_text(reply_text)
    expect(page.locator("#send")).to_be_enabled()
    request = fake_llm.requests[-1]
    assert request.body["stream"] is True
    assert request.messages[0] == {"role": "system", "content": "You are a test droid."}

    # Stop a long reply midway: the partial text stays, marked as stopped, and is saved as cancelled.
    fake_llm.enqueue(Script(text=STORY, token_delay=0.1))
    page.fill("#input", "Tell me a long story")
    page.click("#send")
    expect(page.locator("#stop")).to_be_visible()
    story = page.locator(".msg-assistant .text").last
    expect(story).to_contain_text("word2")
    page.click("#stop")
    expect(page.locator(".msg-assistant").last).to_have_class("msg msg-assistant stopped")
    expect(page.locator(".msg-assistant .meta").last).to_have_text("R2D2 · stopped")
    expect(page.locator("#stop")).to_be_hidden()
    shown = story.inner_text()
    assert STORY.startswith(shown) and len(shown) < len(STORY)
    assert fake_llm.wait_for(lambda f: f.disconnects == 1)
    saved = in_thread(lambda: ChatMessage.objects.filter(session_id=session_id, role=Role.ASSISTANT).last())
    assert saved.status == MessageStatus.CANCELLED and STORY.startswith(saved.content)

    # An upstream failure is shown to the person, with no upstream detail.
    fake_llm.enqueue(Script(status=401))
    page.fill("#input", "Are you there?")
    page.click("#send")
    error = page.locator(".msg-error").last
    expect(error).to_contain_text("The server's model credentials were refused.")
    expect(error.locator(".meta")).to_have_text("Error · upstream_auth_failed")
    expect(page.locator("#send")).to_be_enabled()
    assert SECRET_DETAIL not in page.content()

    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "chat-page.png"), full_page=True)

    # End the session: the page goes back to the start form and the server records why.
    page.click("#end")
    expect(page.locator("#setup")).to_be_visible()
    expect(page.locator(".note").last).to_have_text("Session ended.")
    assert in_thread(lambda: ChatSession.objects.get(id=session_id).end_reason) == EndReason.CLIENT

    # The socket drops (the server restarts): the page says so, reconnects, and can chat again.
    page.click("#start")
    expect(page.locator("#session-bar")).to_be_visible()
    daphne.stop()  # SIGTERM: the server drains, releases the (resumable) session and closes with 1012
    expect(page.locator(".notice")).to_contain_text("The connection dropped. Reconnecting")
    expect(page.locator("#connection")).to_have_text("Disconnected")
    daphne.start()
    expect(page.locator("#connection")).to_have_text("Connected", timeout=20_000)
    if settings.REDIS_URL:  # the new process resumes the session from the frames kept in Redis
        expect(page.locator(".notice")).to_have_text("Reconnected.")
    else:  # the embedded defaults keep frames in the old process's memory only: nothing to resume from
        expect(page.locator(".notice")).to_have_text("Reconnected. Start a new session to carry on.")
        page.click("#start")
    page.fill("#input", "Back again")
    page.keyboard.press("Enter")
    expect(page.locator(".msg-assistant .text").last).to_have_text("Echo: Back again")
    page.screenshot(path=str(ARTIFACTS / "chat-page-reconnected.png"), full_page=True)


def test_regenerate_edit_versions_and_reload_in_a_real_browser(browser_page, daphne, fake_llm):
    """↻ regenerates a reply, ‹ › moves between its versions, ✎ edits a message in place, and a reload shows the
    same branch, rebuilt from the session's history."""
    page = browser_page
    page.goto(daphne.http_url + "/")
    expect(page.locator("#connection")).to_have_text("Connected")
    page.click("#start")
    expect(page.locator("#session-bar")).to_be_visible()
    fake_llm.enqueue(Script(text="First answer"), Script(text="Second answer"), Script(text="Edited answer"))
    page.fill("#input", "one")
    page.keyboard.press("Enter")
    reply = page.locator(".msg-assistant .text")
    expect(reply).to_have_text("First answer")

    page.get_by_role("button", name="Regenerate this reply").click()
    expect(reply).to_have_text("Second answer")
    expect(page.locator(".msg-assistant + .controls .version")).to_have_text("2/2")
    page.get_by_role("button", name="Previous version").click()
    expect(reply).to_have_text("First answer")
    expect(page.locator(".msg-assistant + .controls .version")).to_have_text("1/2")

    page.get_by_role("button", name="Edit this message").click()
    page.fill(".msg-user textarea.edit", "one, edited")
    page.keyboard.press("Enter")
    expect(reply).to_have_text("Edited answer")
    expect(page.locator(".msg-user .text")).to_have_text("one, edited")
    expect(page.locator(".msg-user + .controls .version")).to_have_text("2/2")
    assert [[m["content"] for m in r.messages] for r in fake_llm.requests] == [["one"], ["one"], ["one, edited"]]

    page.reload()
    expect(page.locator("#connection")).to_have_text("Connected")
    expect(page.locator(".msg-user .text")).to_have_text("one, edited")
    expect(reply).to_have_text("Edited answer")
    expect(page.locator(".msg-user + .controls .version")).to_have_text("2/2")
    page.get_by_role("button", name="Previous version").first.click()  # the user message's first version
    expect(page.locator(".msg-user .text")).to_have_text("one")
    expect(reply).to_have_text("Second answer")  # a switch goes to the newest message below the one chosen
    page.screenshot(path=str(ARTIFACTS / "chat-page-branches.png"), full_page=True)


def test_errors_from_the_server_are_shown(browser_page, daphne_factory):
    """Refusals (a model outside the allow-list, a rate limit) appear with the server's sentence; the page recovers."""
    server = daphne_factory(R2D2_ALLOWED_MODELS="gpt-4o-mini,gpt-4o", R2D2_RATE_LIMIT_PER_MINUTE="1")
    page = browser_page
    page.goto(server.http_url + "/")
    expect(page.locator("#connection")).to_have_text("Connected")
    expect(page.locator("#model option")).to_have_text(["gpt-4o-mini", "gpt-4o"])
    page.evaluate("document.getElementById('model').append(new Option('gpt-banned', 'gpt-banned', true, true))")
    page.click("#start")
    error = page.locator(".msg-error")
    expect(error).to_contain_text("Model not allowed here; choose one of: gpt-4o-mini, gpt-4o.")
    expect(page.locator("#setup")).to_be_visible()
    expect(page.locator("#start")).to_be_enabled()

    page.select_option("#model", "gpt-4o")
    page.click("#start")
    page.fill("#input", "one")
    page.keyboard.press("Enter")
    expect(page.locator(".msg-assistant .text")).to_have_text("Echo: one")
    page.fill("#input", "two")
    page.keyboard.press("Enter")
    expect(page.locator(".msg-error").last).to_contain_text("Too many messages; try again in")
    expect(page.locator(".msg-error .meta").last).to_have_text("Error · rate_limited")
    expect(page.locator("#send")).to_be_enabled()


def test_operator_ends_a_chat_from_the_admin(browser_page, daphne, fake_llm):
    """A person chats; an operator finds the session in the admin by its text and ends it; the person is told."""
    in_thread(lambda: get_user_model().objects.create_superuser("operator", "op@example.com", "droids-are-us-42"))
    person = browser_page
    person.goto(daphne.http_url + "/")
    person.click("#start")
    person.fill("#input", "Where are the secret plans?")
    person.keyboard.press("Enter")
    expect(person.locator(".msg-assistant .text").last).to_have_text("Echo: Where are the secret plans?")
    session_id = person.locator("#session-id").inner_text()

    operator = person.context.new_page()
    operator.set_viewport_size({"width": 1600, "height": 900})
    operator.goto(daphne.http_url + "/admin/chat/chatsession/")
    operator.fill("#id_username", "operator")
    operator.fill("#id_password", "droids-are-us-42")
    operator.click("input[type=submit]")
    operator.fill("#searchbar", "secret plans")
    operator.keyboard.press("Enter")
    rows = operator.locator("#result_list tbody tr")
    expect(rows).to_have_count(1)
    expect(rows.first).to_contain_text(session_id.split("-")[0])
    rows.first.locator("th a").click()
    expect(operator.locator(".r2d2-transcript")).to_contain_text("Echo: Where are the secret plans?")
    operator.screenshot(path=str(ARTIFACTS / "admin-session.png"), full_page=True)
    operator.click("#r2d2-end-session")
    expect(operator.locator(".messagelist")).to_contain_text("Asked the server holding the session to end it")

    expect(person.locator(".notice")).to_have_text("An operator ended this session.")
    expect(person.locator("#setup")).to_be_visible()
    ended = in_thread(lambda: ChatSession.objects.get(id=session_id))
    assert ended.end_reason == EndReason.OPERATOR
    operator.reload()
    expect(operator.locator("#r2d2-end-session")).to_have_count(0)
    operator.goto(daphne.http_url + "/admin/chat/chatsession/")
    operator.screenshot(path=str(ARTIFACTS / "admin-sessions.png"), full_page=True)


def test_the_model_picker_offers_the_servers_models(browser_page, daphne_factory, fake_bedrock):
    """After connecting, the page asks for the model list: the picker suggests the Bedrock model
    too, with its provider, and choosing it chats through Bedrock; nothing trips the CSP."""
    server = daphne_factory(**bedrock_env(fake_bedrock, "amazon.nova-lite-v1:0"))
    page = browser_page
    violations: list[str] = []
    page.on("console", lambda m: "Content Security Policy" in m.text and violations.append(m.text))
    page.goto(server.http_url + "/")
    expect(page.locator("#connection")).to_have_text("Connected")
    options = page.locator("#model-options option")
    expect(options).to_have_count(2)
    assert [options.nth(i).get_attribute("value") for i in range(2)] == ["gpt-3.5-turbo", "amazon.nova-lite-v1:0"]
    assert options.nth(1).get_attribute("label") == "amazon.nova-lite-v1:0 (bedrock)"

    page.fill("#model", "amazon.nova-lite-v1:0")
    page.click("#start")
    page.fill("#input", "Hello, Bedrock")
    page.keyboard.press("Enter")
    expect(page.locator(".msg-assistant .text")).to_have_text("Echo: Hello, Bedrock")
    assert [r.model_id for r in fake_bedrock.requests] == ["amazon.nova-lite-v1:0"]
    assert violations == []


@pytest.mark.parametrize("delivered", [True, False], ids=["reached-the-server", "lost-on-the-way"])
def test_a_message_sent_as_the_socket_drops_is_answered_once(browser_page, daphne, fake_llm, delivered):
    """Every message carries a fresh client_message_id. The socket drops right as one is sent, before its
    processing_start reaches the page (the server got it, or it was lost on the way): the page reconnects,
    resumes, sends it again with the same id, and shows exactly one answer and no error; the server saved
    it once and asked the model once."""
    proxy = PostDroppingProxy(daphne.port)
    page = browser_page
    page.goto(f"http://127.0.0.1:{proxy.port}/")
    expect(page.locator("#connection")).to_have_text("Connected")
    page.fill("#system", "You are a test droid.")
    page.click("#start")
    expect(page.locator("#session-bar")).to_be_visible()
    session_id = page.locator("#session-id").inner_text()
    page.fill("#input", "first")
    page.keyboard.press("Enter")
    expect(page.locator(".msg-assistant .text").last).to_have_text("Echo: first")

    proxy.drop_at_next_post(deliver=delivered)
    page.fill("#input", "Are you still there?")
    page.keyboard.press("Enter")
    assert proxy.dropped.wait(10)
    if delivered:  # the server has the message before the client can resume and send it again
        saved = ChatMessage.objects.filter(content="Are you still there?").exists
        assert wait_until(lambda: in_thread(saved), timeout=10)
    proxy.let_reconnect()
    expect(page.locator(".msg-assistant .text").last).to_have_text("Echo: Are you still there?", timeout=20_000)
    expect(page.locator(".notice")).to_have_text("Reconnected.")
    # What the page sent on the new connection: the resume, then the message again, the same frame.
    resumed = proxy.websockets[-1]
    assert [m["action"] for m in resumed.sent][:1] == ["chatbot_session_resume"]
    assert [m for m in resumed.sent if m["action"] == "chatbot_post_message"] == [proxy.dropped_post]
    # The socket still works; a refusal of the resend came before this reply, so the page has handled it.
    page.fill("#input", "And now?")
    page.keyboard.press("Enter")
    expect(page.locator(".msg-assistant .text").last).to_have_text("Echo: And now?")
    refusals = [m["data"]["code"] for m in resumed.received if m["type"] == "error"]
    assert refusals == (["duplicate_message"] if delivered else [])
    expect(page.locator(".msg-error")).to_have_count(0)
    expect(page.locator(".msg-user .text")).to_have_text(["first", "Are you still there?", "And now?"])
    expect(page.locator(".msg-assistant .text")).to_have_text(
        ["Echo: first", "Echo: Are you still there?", "Echo: And now?"]
    )

    rows = in_thread(
        lambda: list(
            ChatMessage.objects.filter(session_id=session_id, role=Role.USER)
            .order_by("id")
            .values_list("content", "client_message_id")
        )
    )
    assert [content for content, _ in rows] == ["first", "Are you still there?", "And now?"]
    ids = [cid for _, cid in rows]
    assert all(ids) and len(set(ids)) == 3, ids
    assert ids[1] == proxy.dropped_post["client_message_id"]
    assert [r.messages[-1]["content"] for r in fake_llm.requests] == ["first", "Are you still there?", "And now?"]
    proxy.close()


@pytest.mark.redis
def test_a_message_refused_by_a_restarting_server_is_answered_after_the_resume(browser_page, daphne, fake_llm):
    """A deploy: the server is draining when a message arrives, and refuses it with server_draining.
    The page says it will send it again (no error), resumes on the restarted server, sends it again,
    and shows its one answer."""
    proxy = PostDroppingProxy(daphne.port)  # not armed: it only shows what passes
    page = browser_page
    page.goto(f"http://127.0.0.1:{proxy.port}/")
    page.click("#start")
    page.fill("#input", "first")
    page.keyboard.press("Enter")
    expect(page.locator(".msg-assistant .text").last).to_have_text("Echo: first")
    with restarting(daphne):
        page.fill("#input", "Are you there?")
        page.keyboard.press("Enter")
        frames = proxy.websockets[-1].received
        assert wait_until(lambda: "server_draining" in error_codes(frames), timeout=5), frames
        expect(page.locator(".notice")).to_have_text(
            "The server is restarting; your message will be sent again when the page reconnects."
        )
    expect(page.locator(".msg-assistant .text").last).to_have_text("Echo: Are you there?", timeout=30_000)
    expect(page.locator(".notice")).to_have_text("Reconnected.")
    expect(page.locator(".msg-error")).to_have_count(0)
    expect(page.locator(".msg-assistant .text")).to_have_text(["Echo: first", "Echo: Are you there?"])
    session_id = page.locator("#session-id").inner_text()
    rows = in_thread(
        lambda: list(
            ChatMessage.objects.filter(session_id=session_id, role=Role.USER)
            .order_by("id")
            .values_list("content", "client_message_id")
        )
    )
    assert [content for content, _ in rows] == ["first", "Are you there?"] and all(cid for _, cid in rows)
    assert [r.messages[-1]["content"] for r in fake_llm.requests].count("Are you there?") == 1
    proxy.close()
