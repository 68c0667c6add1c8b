"""/healthz, the load balancer's health check, answered before Django's host and HTTPS checks."""

from __future__ import annotations

import asyncio
import uuid

from asgiref.sync import sync_to_async
from channels.layers import get_channel_layer
from django.db import connection
from django.http import HttpRequest, HttpResponse, JsonResponse

from chat.edge.early import EarlyMiddleware
from chat.ops import storage
from chat.sessions import drain
from chat.turns import pgpool

#: Seconds each check may take: the load balancer waits 10 (HealthCheckTimeout, .ebextensions/01_r2d2.config),
#: and an answer it gets says more than one it gives up on.
CHECK_SECONDS = 3.0


class HealthCheckMiddleware(EarlyMiddleware):
    """Answer /healthz whatever the Host header says.

    Elastic Beanstalk's health checker sends the instance's private IP as Host,
    which is not in ALLOWED_HOSTS, and speaks plain HTTP: the check must neither
    fail host validation nor be redirected to HTTPS.
    """

    async def __call__(self, request: HttpRequest) -> HttpResponse:
        if request.path == "/healthz":
            return await healthz(request)
        return await self.get_response(request)


def _check_database_on_orm() -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")


async def _check_database_once() -> None:
    # On PostgreSQL on the event loop's own connection: the ORM's pool would wait R2D2_DB_POOL_TIMEOUT for a
    # connection while the database is down, holding the thread every async ORM call runs on.
    if pgpool.enabled():
        await pgpool.fetch_value("SELECT 1", ())
    else:
        await sync_to_async(_check_database_on_orm)()


async def _check_database() -> None:
    """`SELECT 1`, retried for CHECK_SECONDS at most (a dead pooled connection after a restart is no outage);
    an outage it meets is logged once, as the turns' are (chat/ops/storage.py)."""
    async with asyncio.timeout(CHECK_SECONDS + 0.5):
        await storage.retry(_check_database_once, within=CHECK_SECONDS)


async def healthz(request: HttpRequest) -> JsonResponse:
    """200 when the database and the channel layer answer, 503 otherwise (for the load balancer)."""
    checks: dict[str, str] = {}
    try:
        await _check_database()
        checks["database"] = "ok"
    except Exception as exc:  # any failure means unhealthy
        checks["database"] = type(exc).__name__
    try:
        layer = get_channel_layer()
        async with asyncio.timeout(3):
            channel = await layer.new_channel()
            await layer.send(channel, {"type": "health.ping", "id": uuid.uuid4().hex})
            await layer.receive(channel)
        checks["channel_layer"] = "ok"
    except Exception as exc:
        checks["channel_layer"] = type(exc).__name__
    if drain.draining:  # stopping (SIGTERM): the load balancer should send new connections elsewhere
        checks["process"] = "draining"
    healthy = all(value == "ok" for value in checks.values())
    response = JsonResponse(
        {"status": "ok" if healthy else "unhealthy", "checks": checks}, status=200 if healthy else 503
    )
    # Not one ERROR line per check while the database is down (django.request logs every 5xx): the outage is
    # logged once when it starts and once when it ends, and the load balancer counts the 503s.
    response._has_been_logged = True
    return response
