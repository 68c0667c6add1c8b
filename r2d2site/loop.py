"""The event loop the server runs on: uvloop, unless R2D2_UVLOOP=0.

Daphne builds its Twisted reactor on a new asyncio loop the moment `daphne.server`
is imported, with whatever event loop policy is set then; so this runs first, in
`python -m r2d2site.serve` (the Procfile's command, and each process it starts)
and in `manage.py runserver`. Every socket, timer and task of the process (the
WebSocket connections through Twisted, the model calls through aiohttp, the
database through psycopg) then goes through libuv's loop instead of asyncio's
Python one: about 15% less CPU per turn (bench/throughput.py, alternating runs).
"""

from __future__ import annotations

import asyncio
import os


def install() -> bool:
    """Set uvloop's policy for loops made from now on; False when it is turned off or not installed."""
    if os.environ.get("R2D2_UVLOOP", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    try:
        import uvloop
    except ImportError:  # not built for this platform (Windows): asyncio's own loop
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True
