#!/usr/bin/env python
"""Django's command-line utility for administrative tasks."""

import os
import sys

#: The development server, and the quick start's other commands run on a developer's machine (making an API key
#: for the local server too: docs/accounts.md). On Elastic Beanstalk DJANGO_DEBUG=0 is set, and wins.
DEVELOPMENT_COMMANDS = {
    "runserver",
    "migrate",
    "makemigrations",
    "createsuperuser",
    "chat",
    "create_api_key",
    "revoke_api_key",
}


def main() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "r2d2site.settings")
    if sys.argv[1:2] and sys.argv[1] in DEVELOPMENT_COMMANDS:
        # The README's local commands default debug on, so a fresh clone needs no secret
        # key; settings default it off everywhere else (Daphne, the Procfile, `check`).
        # DJANGO_DEBUG=0 in the environment (the Elastic Beanstalk bundle sets it) still wins.
        os.environ.setdefault("DJANGO_DEBUG", "1")
    if sys.argv[1:2] == ["runserver"]:
        # Daphne's runserver, on the event loop production runs on (before Daphne is imported).
        from r2d2site import loop

        loop.install()
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)


if __name__ == "__main__":
    main()
