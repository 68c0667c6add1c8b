"""One client, as counted by address: the throttles (chat/ops/throttle.py, chat/edge/connection_limits.py) group by it.

At the bottom of the layers, because the log throttle (ops) and the connection limits (edge) both need it.
"""

from __future__ import annotations

import ipaddress


def address_group(address: str) -> str:
    """An address as one client: IPv4 as it is, IPv6 by its /64.

    A /64 is one network (a home, an office, a server's allocation): a host there picks
    any of its addresses, so counting IPv6 addresses one by one lets one client be as
    many as it likes. An IPv4-mapped IPv6 address is its IPv4 address. Not an IP address: as given.
    """
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)
