#!/usr/bin/env python
"""Django's command-line utility for administrative tasks."""

import os
import sys


def main() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "r2d2site.settings")
    if sys.argv[1:2] == ["runserver"]:
        # The development server is the one place debug defaults on (settings default it
        # off everywhere else); DJANGO_DEBUG=0 in the environment still wins.
        os.environ.setdefault("DJANGO_DEBUG", "1")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)


if __name__ == "__main__":
    main()
