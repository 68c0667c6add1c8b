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
"""

import os

os.environ.setdefault("DJANGO_SECRET_KEY", "test-only-secret-key-not-for-any-deployment-0123456789")
os.environ.setdefault("DJANGO_DEBUG", "1")
os.environ.setdefault("R2D2_MAX_CONNECTIONS_PER_PRINCIPAL", "0")

from r2d2site.settings import *  # noqa: F403
