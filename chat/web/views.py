"""The HTTP views: the pages people open in a browser (the chat page, sign-in, past conversations),
the published protocol document, the favicon, and the load balancer's health check."""

from __future__ import annotations

import uuid
from pathlib import Path

from django.conf import settings
from django.contrib.auth import views as auth_views
from django.contrib.auth.decorators import login_required
from django.http import FileResponse, Http404, HttpRequest, HttpResponse
from django.shortcuts import render
from django.utils.decorators import method_decorator
from django.views.decorators.cache import cache_control
from django.views.decorators.http import require_GET

from chat.models import ChatSession, MessageStatus, Role
from chat.sessions import history
from chat.web import markdown
from chat.web.csp import content_security_policy

ASYNCAPI_PATH = Path(settings.BASE_DIR) / "asyncapi.yaml"
FAVICON_PATH = Path(__file__).resolve().parent.parent / "static" / "chat" / "favicon.svg"


@require_GET
@content_security_policy
def chat_page(request: HttpRequest) -> HttpResponse:
    """The web chat: one HTML page whose script speaks the WebSocket protocol to this server.

    With R2D2_REQUIRE_AUTH on, a visitor who is not signed in gets the sign-in form instead."""
    signed_in = request.user.is_authenticated
    if settings.R2D2_REQUIRE_AUTH and not signed_in:
        return render(request, "chat/login.html", {"form": auth_views.AuthenticationForm(request), "next": "/"})
    config = {
        "defaultModel": settings.R2D2_DEFAULT_MODEL,
        # With an allow-list the page offers exactly those; otherwise any name may be typed.
        "models": list(settings.R2D2_ALLOWED_MODELS) or [settings.R2D2_DEFAULT_MODEL],
        "modelsFixed": bool(settings.R2D2_ALLOWED_MODELS),
        "maxMessageChars": settings.R2D2_MAX_MESSAGE_CHARS,
        # Read by the Markdown renderer (chat/static/chat/markdown.js); the CSP's img-src matches it.
        "remoteImages": settings.R2D2_PAGE_REMOTE_IMAGES,
    }
    context: dict = {"config": config}
    if signed_in:
        context["past"] = history.past_conversations(user_id=request.user.pk)
        earlier = _own_session(request, request.GET.get("continue"))
        if earlier is not None:
            # The page shows the earlier turns and starts its session with continue_session_id.
            config["continueFrom"] = {
                "sessionId": str(earlier.id),
                "model": earlier.model,
                "messages": [{"role": m.role, "content": m.content} for m in _transcript(earlier)],
            }
    return render(request, "chat/index.html", context)


def _own_session(request: HttpRequest, session_id: str | None) -> ChatSession | None:
    """The signed-in person's session with that id (theirs or their keys'), else None."""
    try:
        wanted = uuid.UUID(session_id or "")
    except ValueError:
        return None
    return ChatSession.objects.filter(id=wanted, user_id=request.user.pk).first()


def _transcript(session: ChatSession) -> list:
    """What a person reads of a conversation: their messages and the replies (system messages are settings)."""
    return [
        m
        for m in history.messages_of(session)
        if m.role == Role.USER or (m.role == Role.ASSISTANT and m.status != MessageStatus.INCOMPLETE)
    ]


@require_GET
@login_required
@content_security_policy
def conversation_page(request: HttpRequest, session_id: uuid.UUID) -> HttpResponse:
    """One of the signed-in person's past conversations as a transcript, with a way to continue it."""
    session = _own_session(request, str(session_id))
    if session is None:
        raise Http404("No conversation of yours has that id.")
    messages = _transcript(session)
    for m in messages:
        # Sanitized server side, as in the admin (chat/web/markdown.py): this page runs no script.
        m.content_html = markdown.render(m.content) if m.role == Role.ASSISTANT else None
    return render(request, "chat/conversation.html", {"session": session, "messages": messages})


@method_decorator(content_security_policy, name="dispatch")
class LoginView(auth_views.LoginView):
    """Django's sign-in, in the chat page's style and under its Content-Security-Policy."""

    template_name = "chat/login.html"
    redirect_authenticated_user = True


@require_GET
def asyncapi(request: HttpRequest) -> FileResponse:
    """The AsyncAPI 3 document of the protocol, exactly as kept in the repository."""
    return FileResponse(ASYNCAPI_PATH.open("rb"), content_type="application/yaml; charset=utf-8")


@require_GET
@cache_control(max_age=86400, public=True)
def favicon(request: HttpRequest) -> FileResponse:
    """/favicon.ico: browsers ask for it on every page (the admin, the protocol document) whatever the HTML says."""
    return FileResponse(FAVICON_PATH.open("rb"), content_type="image/svg+xml")
