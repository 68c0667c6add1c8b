"""The `/metrics` page: every server process's counters (chat/ops/metrics.py) for Prometheus.

Who may read it: staff signed in to the admin, a request carrying
`Authorization: Bearer <R2D2_METRICS_TOKEN>` (compared in constant time, never
logged), or a request whose every address is private (the client's address, the
socket's own peer and each X-Forwarded-For hop, so a client behind the load balancer
cannot claim one). A private peer is answered first thing (`PrivateScrapeMiddleware`):
over plain HTTP, whatever its Host, because a Prometheus in the VPC scrapes each
instance at its private address (deploy/prometheus/prometheus.yml) and neither
redirecting it to HTTPS nor refusing that Host leaves anything to scrape.
"""

from __future__ import annotations

import hmac
import ipaddress
import os

from asgiref.sync import sync_to_async
from django.conf import settings
from django.http import HttpRequest, HttpResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, multiprocess

from chat.edge.early import EarlyMiddleware


def may_read(request: HttpRequest) -> bool:
    token = getattr(settings, "R2D2_METRICS_TOKEN", "")
    offered = request.headers.get("Authorization", "")
    if token and offered.startswith("Bearer ") and hmac.compare_digest(offered[7:].encode(), token.encode()):
        return True
    if private_request(request):
        return True
    user = getattr(request, "user", None)
    return bool(user is not None and user.is_active and user.is_staff)


def private_request(request: HttpRequest) -> bool:
    """Every address the request came through is private: the client's, the socket's own peer
    (before chat/edge/proxy.py read X-Forwarded-For) and each X-Forwarded-For hop."""
    hops = [request.META.get("REMOTE_ADDR", "")]
    peer = getattr(request, "scope", {}).get("proxy_peer")
    if peer:
        hops.append(peer[0])
    hops += [hop.strip() for hop in request.headers.get("X-Forwarded-For", "").split(",") if hop.strip()]
    return all(_private(hop) for hop in hops)


#: A VPC's and this host's own addresses: RFC 1918, loopback, link-local, IPv6 unique local.
#: Not `ipaddress`'s is_private, which also counts documentation and other reserved ranges
#: that a forged X-Forwarded-For could name.
PRIVATE_NETWORKS = [
    ipaddress.ip_network(net)
    for net in (
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "::1/128",
        "fc00::/7",
        "fe80::/10",
    )
]


def _private(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])  # an IPv6 zone (fe80::1%eth0) says nothing more
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # a dual-stack socket's view of an IPv4 peer
    return any(ip in net for net in PRIVATE_NETWORKS if net.version == ip.version)


def exposition() -> HttpResponse:
    """Every process's metrics (PROMETHEUS_MULTIPROC_DIR), or this one's, in Prometheus text format."""
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if directory:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=directory)
        body = generate_latest(registry)
    else:
        body = generate_latest()
    return HttpResponse(body, content_type=CONTENT_TYPE_LATEST)


def view(request: HttpRequest) -> HttpResponse:
    if not may_read(request):
        return HttpResponse("Forbidden\n", status=403, content_type="text/plain")
    return exposition()


class PrivateScrapeMiddleware(EarlyMiddleware):
    """/metrics for a private peer, before Django's HTTPS redirect and Host check (see the module docstring).

    Everyone else goes the usual way: redirected to HTTPS, Host checked, then `view`
    (staff, or the bearer token)."""

    async def __call__(self, request: HttpRequest) -> HttpResponse:
        if request.path == "/metrics" and private_request(request):
            # Reading the processes' files is blocking file I/O: off the event loop.
            return await sync_to_async(exposition, thread_sensitive=False)()
        return await self.get_response(request)
