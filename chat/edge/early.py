"""The base of the middlewares that answer before Django's HTTPS redirect and Host check."""

from __future__ import annotations

from collections.abc import Callable

from asgiref.sync import iscoroutinefunction, markcoroutinefunction


class EarlyMiddleware:
    """An async middleware placed before SecurityMiddleware: what it answers skips the HTTPS
    redirect and the Host check (this one and chat/web/metrics.py's PrivateScrapeMiddleware)."""

    async_capable = True
    sync_capable = False

    def __init__(self, get_response: Callable) -> None:
        self.get_response = get_response
        if iscoroutinefunction(self.get_response):
            markcoroutinefunction(self)
