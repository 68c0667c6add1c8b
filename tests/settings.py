"""The test run's settings: the app's own, with what a run needs supplied before they load.

pytest-django loads settings before any conftest runs, so the environment is set
here (pyproject.toml names this module). The values go into os.environ, so the
Daphne and manage.py processes the tests start inherit them too; a variable set
by whoever runs the tests wins.

- DJANGO_SECRET_KEY: with debug off, the settings refuse to load without one.
- DJANGO_DEBUG=1: the suite exercises the development settings (plain HTTP, static
  files from the finders), as `manage.py runserver` runs; the production-mode tests
  start their servers with DJANGO_DEBUG=0 and their own key.
- R2D2_MAX_CONNECTIONS_PER_PRINCIPAL=0: in-process tests (a WebsocketCommunicator on r2d2site.asgi's
  application, a new event loop per test) would count their keys' sockets in Redis with a task per loop;
  the caps have their own tests against live servers (tests/production/test_connection_limits.py).
- REDIS_URL, under pytest-xdist: worker gwN uses database number (the URL's + N), so that a test that
  empties its Redis (tests/e2e/test_operator_end.py flushes it, as a restart would) or counts what is
  left there never sees another worker's keys. The URL's number is the first of the run's.
"""

import os
import re

_worker = os.environ.get("PYTEST_XDIST_WORKER", "")
if _worker.startswith("gw") and os.environ.get("REDIS_URL", "").strip():
    _url = os.environ["REDIS_URL"].strip()
    _match = re.match(r"^(rediss?://[^/?#]*)(?:/(\d+))?(.*)$", _url)
    if _match:
        _db = int(_match.group(2) or 0) + int(_worker[2:])
        if _db > 15:
            raise RuntimeError(f"REDIS_URL {_url}: worker {_worker} would need Redis database {_db} (0-15 exist)")
        os.environ["REDIS_URL"] = f"{_match.group(1)}/{_db}{_match.group(3)}"

os.environ.setdefault("DJANGO_SECRET_KEY", "test-only-secret-key-not-for-any-deployment-0123456789")
os.environ.setdefault("DJANGO_DEBUG", "1")
os.environ.setdefault("R2D2_MAX_CONNECTIONS_PER_PRINCIPAL", "0")

from r2d2site.settings import *  # noqa: E402, F403 (the environment above must be set first)
