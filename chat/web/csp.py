"""The chat page's Content-Security-Policy.

Model replies are untrusted text rendered as HTML in the page. The sanitizer
(DOMPurify) is the first wall; this header is the second: even markup that got
past it could not run inline script, load script or styles from another origin,
or send data anywhere but this server. Django 5.2 has no CSP of its own, and one
page needs one header, so a decorator is enough (no django-csp dependency).

The admin is not covered: Django's admin pages use inline script and are for
operators, whose transcripts are sanitized server side (chat/web/markdown.py).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps

from django.conf import settings
from django.http import HttpRequest, HttpResponse

HEADER = "Content-Security-Policy"


def page_policy(request: HttpRequest) -> str:
    """Everything from this origin only; no inline script or style, no plugins, no framing."""
    host = request.get_host()
    # 'self' covers ws(s):// to the same host in current browsers; the explicit
    # sources are for the few that predate that rule (CSP Level 3).
    sockets = f"ws://{host} wss://{host}"
    images = "'self' https:" if settings.R2D2_PAGE_REMOTE_IMAGES else "'self'"
    directives = [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        f"img-src {images}",
        f"connect-src 'self' {sockets}",
        "font-src 'self'",
        "manifest-src 'self'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
        "object-src 'none'",
    ]
    return "; ".join(directives)


def content_security_policy(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
    """Send the page's policy with the view's response (unless the view set one itself)."""

    @wraps(view)
    def wrapper(request: HttpRequest, *args, **kwargs) -> HttpResponse:
        response = view(request, *args, **kwargs)
        if HEADER not in response:
            response[HEADER] = page_policy(request)
        return response

    return wrapper
