"""The page a locked-out sign-in sees (axes' AXES_LOCKOUT_CALLABLE; the lockout itself: chat/accounts/lockout.py)."""

from __future__ import annotations

from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render

from chat.web.csp import HEADER, page_policy


def locked_out(request: HttpRequest, original_response: HttpResponse | None, credentials: dict | None) -> HttpResponse:
    """AXES_LOCKOUT_CALLABLE: 429 with a page in the site's style, and when to try again."""
    minutes = settings.R2D2_SIGNIN_LOCKOUT_MINUTES
    response = render(
        request,
        "chat/locked_out.html",
        {"failure_limit": settings.AXES_FAILURE_LIMIT, "minutes": minutes},
        status=429,
    )
    response["Retry-After"] = str(int(minutes * 60))
    response[HEADER] = page_policy(request)
    return response
