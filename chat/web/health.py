"""Middleware that must run before Django's host and HTTPS checks."""

from __future__ import annotations

from collections.abc import Callable

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.http import HttpRequest, HttpResponse


class EarlyMiddleware:
    """An async middleware placed before SecurityMiddleware: what it answers skips the HTTPS
    redirect and the Host check (this one and chat/ops/metrics.py's PrivateScrapeMiddleware)."""

    async_capable = True
    sync_capable = False

    def __init__(self, get_response: Callable) -> None:
        self.get_response = get_response
        if iscoroutinefunction(self.get_response):
            markcoroutinefunction(self)


class HealthCheckMiddleware(EarlyMiddleware):
    """Answer /healthz whatever the Host header says.

    Elastic Beanstalk's health checker sends the instance's private IP as Host,
    which is not in ALLOWED_HOSTS, and speaks plain HTTP: the check must neither
    fail host validation nor be redirected to HTTPS.
    """

    async def __call__(self, request: HttpRequest) -> HttpResponse:
        if request.path == "/healthz":
            from chat.web.views import healthz

            return await healthz(request)
        return await self.get_response(request)
