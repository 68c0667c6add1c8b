"""The pages people open in a browser: the chat page and the published protocol document."""

from __future__ import annotations

from pathlib import Path

from django.conf import settings
from django.http import FileResponse, HttpRequest, HttpResponse
from django.shortcuts import render
from django.views.decorators.cache import cache_control
from django.views.decorators.http import require_GET

from chat.csp import content_security_policy

ASYNCAPI_PATH = Path(settings.BASE_DIR) / "asyncapi.yaml"
FAVICON_PATH = Path(__file__).resolve().parent / "static" / "chat" / "favicon.svg"


@require_GET
@content_security_policy
def chat_page(request: HttpRequest) -> HttpResponse:
    """The web chat: one HTML page whose script speaks the WebSocket protocol to this server."""
    config = {
        "defaultModel": settings.R2D2_DEFAULT_MODEL,
        # With an allow-list the page offers exactly those; otherwise any name may be typed.
        "models": list(settings.R2D2_ALLOWED_MODELS) or [settings.R2D2_DEFAULT_MODEL],
        "modelsFixed": bool(settings.R2D2_ALLOWED_MODELS),
        "maxMessageChars": settings.R2D2_MAX_MESSAGE_CHARS,
        # Read by the Markdown renderer (chat/static/chat/markdown.js); the CSP's img-src matches it.
        "remoteImages": settings.R2D2_PAGE_REMOTE_IMAGES,
    }
    return render(request, "chat/index.html", {"config": config})


@require_GET
def asyncapi(request: HttpRequest) -> FileResponse:
    """The AsyncAPI 3 document of the protocol, exactly as kept in the repository."""
    return FileResponse(ASYNCAPI_PATH.open("rb"), content_type="application/yaml; charset=utf-8")


@require_GET
@cache_control(max_age=86400, public=True)
def favicon(request: HttpRequest) -> FileResponse:
    """/favicon.ico: browsers ask for it on every page (the admin, the protocol document) whatever the HTML says."""
    return FileResponse(FAVICON_PATH.open("rb"), content_type="image/svg+xml")
