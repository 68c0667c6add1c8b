"""The operator's admin: who may see sessions, the list, a session's page, ending a live session, exports."""

from __future__ import annotations

import json
import uuid
from urllib.parse import urlencode

import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.db import connection
from django.test import AsyncClient
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from chat.models import ChatMessage, ChatSession, EndReason, MessageStatus, Role
from r2d2site.asgi import application
from testkit.client import ProtocolClient

CHANGELIST = "/admin/chat/chatsession/"


def make_session(*, model: str = "gpt-4o-mini", live: bool = False, turns: int = 1, system: str = "") -> ChatSession:
    from django.utils import timezone

    session = ChatSession.objects.create(
        model=model,
        client_address="10.0.0.7",
        system_message=system,
        ended_at=None if live else timezone.now(),
        end_reason="" if live else EndReason.CLIENT,
    )
    if system:
        ChatMessage.objects.create(session=session, role=Role.SYSTEM, content=system)
    for n in range(turns):
        ChatMessage.objects.create(session=session, role=Role.USER, content=f"question {n}")
        ChatMessage.objects.create(
            session=session,
            role=Role.ASSISTANT,
            content=f"answer {n}",
            model=model,
            prompt_tokens=10,
            completion_tokens=5,
            latency_ms=120,
        )
    return session


def change_url(session: ChatSession) -> str:
    return reverse("admin:chat_chatsession_change", args=[session.id])


@pytest.mark.django_db
def test_only_staff_see_sessions(client, admin_client, django_user_model):
    """Anonymous people and non-staff users are sent to the login page; staff see the list, page and exports."""
    session = make_session()
    urls = [
        CHANGELIST,
        change_url(session),
        reverse("admin:chat_chatsession_export_json", args=[session.id]),
        reverse("admin:chat_chatsession_export_md", args=[session.id]),
    ]
    for url in urls:
        response = client.get(url)
        assert response.status_code == 302 and response["Location"].startswith("/admin/login/"), url
    client.force_login(django_user_model.objects.create_user("visitor", password="x"))
    for url in urls:
        response = client.get(url)
        assert response.status_code == 302 and response["Location"].startswith("/admin/login/"), url
    for url in urls:
        assert admin_client.get(url).status_code == 200, url


@pytest.mark.django_db
def test_staff_without_session_permission_is_refused(client, django_user_model):
    """Being staff is not enough: the user also needs permission to view sessions."""
    session = make_session()
    client.force_login(django_user_model.objects.create_user("intern", password="x", is_staff=True))
    assert client.get(CHANGELIST).status_code == 403
    assert client.get(reverse("admin:chat_chatsession_export_json", args=[session.id])).status_code == 403


@pytest.mark.django_db
def test_list_shows_counts_tokens_and_state_newest_first(admin_client):
    """Each row shows the session's message count (system messages excluded), token total and live state."""
    old = make_session(turns=2, system="Be brief.")
    new = make_session(turns=1, live=True, model="gpt-4o")
    response = admin_client.get(CHANGELIST)
    rows = list(response.context["cl"].result_list)
    assert [r.id for r in rows] == [new.id, old.id]
    assert [(r.message_count, r.total_tokens) for r in rows] == [(2, 15), (4, 30)]
    model_stats = {s.id: (s.message_count, s.total_tokens) for s in ChatSession.objects.with_stats()}
    assert {r.id: (r.message_count, r.total_tokens) for r in rows} == model_stats  # same numbers, cheaper query
    html = response.content.decode()
    assert "icon-yes.svg" in html and "icon-no.svg" in html  # live and ended
    assert str(new.id) in html and "10.0.0.7" in html


@pytest.mark.django_db
def test_filters_live_ended_model_reason_and_date(admin_client):
    """The live/ended, model, end reason and date filters each narrow the list."""
    ended = make_session(model="gpt-4o")
    live = make_session(live=True)

    def ids(query: str) -> set:
        return {r.id for r in admin_client.get(CHANGELIST + query).context["cl"].result_list}

    assert ids("?state=live") == {live.id}
    assert ids("?state=ended") == {ended.id}
    assert ids("?model=gpt-4o") == {ended.id}
    assert ids("?end_reason=client") == {ended.id}
    from django.utils import timezone

    midnight = timezone.now().replace(hour=0, minute=0, second=0, microsecond=0)  # the "Today" link
    assert ids("?" + urlencode({"created_at__gte": str(midnight)})) == {ended.id, live.id}
    assert ids("?" + urlencode({"created_at__lt": str(midnight.replace(year=2000))})) == set()


@pytest.mark.django_db
def test_search_by_session_id_and_by_message_text(admin_client):
    """Searching finds a session by its whole id, by part of its id, or by words from any message, once each."""
    first = make_session(turns=3)
    second = make_session(turns=1)
    ChatMessage.objects.create(session=second, role=Role.USER, content="Where is the Millennium Falcon?")
    ChatMessage.objects.create(session=second, role=Role.USER, content="The falcon again")

    def ids(term: str) -> list:
        return [r.id for r in admin_client.get(CHANGELIST, {"q": term}).context["cl"].result_list]

    assert ids("millennium") == [second.id]
    assert ids("falcon") == [second.id]  # two matching messages, one row
    assert ids(str(first.id)) == [first.id]
    assert ids(str(first.id)[:13]) == [first.id]
    assert set(ids("question")) == {first.id, second.id}
    assert ids("no such words") == []


@pytest.mark.django_db
def test_list_query_count_does_not_grow_with_sessions(admin_client):
    """The list costs the same number of queries for 3 sessions as for 60: counts and sums come with the rows."""

    def queries_for_list() -> int:
        with CaptureQueriesContext(connection) as captured:
            assert admin_client.get(CHANGELIST).status_code == 200
        return len(captured)

    for _ in range(3):
        make_session(turns=2)
    few = queries_for_list()
    for _ in range(57):
        make_session(turns=2)
    many = queries_for_list()
    assert many == few
    assert many <= 10


@pytest.mark.django_db
def test_session_page_is_a_read_only_transcript(admin_client):
    """The session's page shows every message in order with its numbers, and offers no way to edit or add one."""
    session = make_session(turns=2, system="You are a droid.")
    ChatMessage.objects.create(
        session=session, role=Role.ASSISTANT, content="partial ans", status=MessageStatus.CANCELLED, latency_ms=50
    )
    response = admin_client.get(change_url(session))
    html = response.content.decode()
    order = ["You are a droid.", "question 0", "answer 0", "question 1", "answer 1", "partial ans"]
    positions = [html.index(text) for text in order]
    assert positions == sorted(positions)
    assert "120 ms" in html and "Cancelled (partial reply)" in html
    assert 'name="_save"' not in html and "<textarea" not in html
    assert "End session now" not in html  # it has ended
    assert admin_client.post(change_url(session), {"model": "hacked"}).status_code == 403
    session.refresh_from_db()
    assert session.model == "gpt-4o-mini"
    assert admin_client.get("/admin/chat/chatmessage/").status_code == 404


@pytest.mark.django_db
def test_exports_json_and_markdown(admin_client):
    """The transcript downloads as JSON (every field) and as Markdown (readable, in order)."""
    session = make_session(turns=1, system="Be kind.")
    response = admin_client.get(reverse("admin:chat_chatsession_export_json", args=[session.id]))
    assert response["Content-Type"] == "application/json"
    assert f"r2d2-session-{session.id}.json" in response["Content-Disposition"]
    data = json.loads(response.content)
    assert data["session_id"] == str(session.id)
    assert data["system_message"] == "Be kind."
    assert data["end_reason"] == "client"
    assert [(m["role"], m["content"]) for m in data["messages"]] == [
        ("system", "Be kind."),
        ("user", "question 0"),
        ("assistant", "answer 0"),
    ]
    assert data["messages"][2] | {"time": None} == {
        "id": data["messages"][2]["id"],
        "parent_id": None,  # every message of every branch, with its parent (none here: rows made by hand)
        "role": "assistant",
        "content": "answer 0",
        "time": None,
        "status": "complete",
        "model": "gpt-4o-mini",
        "requested_model": None,  # rows made by hand name no requested model
        "prompt_tokens": 10,
        "completion_tokens": 5,
        "latency_ms": 120,
    }

    response = admin_client.get(reverse("admin:chat_chatsession_export_md", args=[session.id]))
    assert response["Content-Type"].startswith("text/markdown")
    text = response.content.decode()
    assert text.startswith(f"# R2D2 session {session.id}\n")
    assert "## System message\n\n```text\nBe kind.\n```" in text
    assert text.index("### User") < text.index("question 0") < text.index("### Assistant") < text.index("answer 0")
    assert "10 prompt + 5 completion tokens, 120 ms" in text


@pytest.mark.django_db
def test_end_button_only_for_live_sessions_and_only_by_post(admin_client):
    """Live sessions offer "End session now"; a GET to the end URL changes nothing."""
    live = make_session(live=True)
    assert "End session now" in admin_client.get(change_url(live)).content.decode()
    assert admin_client.get(reverse("admin:chat_chatsession_end", args=[live.id])).status_code == 405
    missing = reverse("admin:chat_chatsession_end", args=[uuid.uuid4()])
    assert admin_client.post(missing).status_code == 404


@pytest.mark.django_db(transaction=True)
async def test_end_session_now_reaches_the_socket_in_process(django_user_model):
    """Staff press "End session now": the client holding the session gets session_end with the reason."""
    communicator = WebsocketCommunicator(application, "/")
    connected, _ = await communicator.connect()
    assert connected
    await communicator.send_json_to({"action": "chatbot_session_start"})
    session_id = (await communicator.receive_json_from())["data"]["session_id"]

    staff = await django_user_model.objects.acreate_superuser("operator", "op@example.com", "pw")
    admin = AsyncClient()
    await admin.aforce_login(staff)
    response = await admin.post(reverse("admin:chat_chatsession_end", args=[session_id]))
    assert response.status_code == 302

    frame = await communicator.receive_json_from(timeout=5)
    assert frame == {"type": "session_end", "data": {"session_id": session_id, "reason": "operator"}}
    session = await ChatSession.objects.aget(id=session_id)
    assert session.end_reason == EndReason.OPERATOR and session.ended_at is not None
    await communicator.disconnect()


@pytest.mark.redis
@pytest.mark.django_db(transaction=True)
async def test_end_session_now_reaches_a_live_server_over_redis(daphne, fake_llm, django_user_model):
    """Across processes: the admin here, the session's socket on a live Daphne, the channel layer between."""
    client = await ProtocolClient.connect(daphne.url)
    session_id = await client.start_session()
    staff = await django_user_model.objects.acreate_superuser("operator", "op@example.com", "pw")
    admin = AsyncClient()
    await admin.aforce_login(staff)
    page = await admin.get(reverse("admin:chat_chatsession_change", args=[session_id]))
    assert "End session now" in page.content.decode()

    response = await admin.post(reverse("admin:chat_chatsession_end", args=[session_id]), follow=True)
    assert "Asked the server holding the session to end it" in response.content.decode()
    assert await client.recv() == {"type": "session_end", "data": {"session_id": session_id, "reason": "operator"}}
    await client.send({"action": "chatbot_post_message", "session_id": session_id, "user_message": "still there?"})
    assert (await client.recv())["data"]["code"] == "session_ended"
    await client.close()
    session = await ChatSession.objects.aget(id=session_id)
    assert session.end_reason == EndReason.OPERATOR


@pytest.mark.django_db(transaction=True)
async def test_bulk_action_ends_only_the_live_sessions_selected(django_user_model):
    """The list's "End selected live sessions now" reaches each selected live session's socket, and no other."""
    sockets = []
    for _ in range(3):
        communicator = WebsocketCommunicator(application, "/")
        assert (await communicator.connect())[0]
        await communicator.send_json_to({"action": "chatbot_session_start"})
        session_id = (await communicator.receive_json_from())["data"]["session_id"]
        sockets.append((communicator, session_id))
    already_ended = await sync_to_async(make_session)()

    staff = await django_user_model.objects.acreate_superuser("operator", "op@example.com", "pw")
    admin = AsyncClient()
    await admin.aforce_login(staff)
    chosen = [sockets[0][1], sockets[1][1], str(already_ended.id)]
    response = await admin.post(CHANGELIST, {"action": "end_selected_sessions", "_selected_action": chosen})
    assert response.status_code == 302

    for communicator, session_id in sockets[:2]:
        assert await communicator.receive_json_from(timeout=5) == {
            "type": "session_end",
            "data": {"session_id": session_id, "reason": "operator"},
        }
    assert await sockets[2][0].receive_nothing(timeout=0.3)
    assert not (await ChatSession.objects.aget(id=sockets[2][1])).ended_at
    for communicator, _ in sockets:
        await communicator.disconnect()


def test_server_processes_are_listed_read_only(admin_client):
    """Operators see which server processes are beating, and cannot edit or delete them."""
    from django.utils import timezone

    from chat.models import ServerProcess

    ServerProcess.objects.create(process_id="web-1:42:abcd", host="web-1", pid=42, last_seen_at=timezone.now())
    page = admin_client.get("/admin/chat/serverprocess/")
    assert page.status_code == 200
    assert b"web-1:42:abcd" in page.content
    assert admin_client.get("/admin/chat/serverprocess/add/").status_code == 403
    assert admin_client.post("/admin/chat/serverprocess/web-1:42:abcd/delete/").status_code == 403
    assert ServerProcess.objects.filter(process_id="web-1:42:abcd").exists()
