"""Prometheus metrics: what a server process counts, and the `/metrics` page that shows them.

Several Daphne processes serve one instance (r2d2site/serve.py), so when
PROMETHEUS_MULTIPROC_DIR is set (the launcher sets it) every process writes its
values to files there and a scrape, answered by whichever process gets it, adds
up all of them. Gauges count only live processes (the launcher removes a dead
process's gauge files); counters and histograms of dead processes stay counted,
so totals never go backwards. With no directory (one process) values live in memory.

Who may read it: staff signed in to the admin, a request carrying
`Authorization: Bearer <R2D2_METRICS_TOKEN>` (compared in constant time, never
logged), or a request whose every address is private (the socket's peer and each
X-Forwarded-For hop, so a client behind the load balancer cannot claim one).
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import time

from django.conf import settings
from django.http import HttpRequest, HttpResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

from chat.llm.base import Reply

# Seconds from the model call to the first delta and to the final message: a 50 ms model
# is the lowest a real one answers, a minute is the upstream timeout.
_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

OPEN_SOCKETS = Gauge("r2d2_open_sockets", "WebSocket connections open", multiprocess_mode="livesum")
LIVE_SESSIONS = Gauge("r2d2_live_sessions", "Sessions held by live processes", multiprocess_mode="livesum")
TURNS = Counter("r2d2_turns", "Turns answered or failed", ["outcome"])
FIRST_DELTA = Histogram("r2d2_time_to_first_delta_seconds", "Model call to first message_delta", buckets=_BUCKETS)
FINAL_MESSAGE = Histogram("r2d2_time_to_message_seconds", "Model call to the final message", buckets=_BUCKETS)
UPSTREAM_ERRORS = Counter("r2d2_upstream_errors", "Failed model calls, by error code", ["code"])
TOKENS = Counter("r2d2_tokens", "Tokens the model reported", ["kind"])
REJECTED_FRAMES = Counter("r2d2_rejected_frames", "Client frames refused, by error code", ["code"])
# Once per principal per period (chat/accounts/quotas.py): its spend passed 80% of a money limit.
SPEND_WARNINGS = Counter("r2d2_spend_warnings", "Principals past 80% of a money limit, by limit", ["limit"])


# Hooks (one line at each call site) -------------------------------------------


def first_delta(reply: Reply) -> None:
    FIRST_DELTA.observe(_since(reply))


def answered(reply: Reply) -> None:
    FINAL_MESSAGE.observe(_since(reply))
    TURNS.labels("answered").inc()
    if reply.prompt_tokens:
        TOKENS.labels("prompt").inc(reply.prompt_tokens)
    if reply.completion_tokens:
        TOKENS.labels("completion").inc(reply.completion_tokens)


def turn_failed(code: str) -> None:
    TURNS.labels("failed").inc()
    if code.startswith("upstream_"):
        UPSTREAM_ERRORS.labels(code).inc()


def rejected(code: str) -> None:
    REJECTED_FRAMES.labels(code).inc()


def _since(reply: Reply) -> float:
    return time.monotonic() - reply.started


# The page ------------------------------------------------------------------------


def may_read(request: HttpRequest) -> bool:
    token = getattr(settings, "R2D2_METRICS_TOKEN", "")
    offered = request.headers.get("Authorization", "")
    if token and offered.startswith("Bearer ") and hmac.compare_digest(offered[7:].encode(), token.encode()):
        return True
    hops = [request.META.get("REMOTE_ADDR", "")]
    hops += [hop.strip() for hop in request.headers.get("X-Forwarded-For", "").split(",") if hop.strip()]
    if all(_private(hop) for hop in hops):
        return True
    user = getattr(request, "user", None)
    return bool(user is not None and user.is_active and user.is_staff)


#: A VPC's and this host's own addresses. Not `ipaddress`'s is_private, which also counts
#: documentation and other reserved ranges that a forged X-Forwarded-For could name.
PRIVATE_NETWORKS = [
    ipaddress.ip_network(net)
    for net in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "127.0.0.0/8", "::1/128", "fc00::/7")
]


def _private(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in PRIVATE_NETWORKS if net.version == ip.version)


def view(request: HttpRequest) -> HttpResponse:
    if not may_read(request):
        return HttpResponse("Forbidden\n", status=403, content_type="text/plain")
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if directory:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=directory)
        body = generate_latest(registry)
    else:
        body = generate_latest()
    return HttpResponse(body, content_type=CONTENT_TYPE_LATEST)
