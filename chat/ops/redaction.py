"""Keeping credentials out of Django's error pages (DEFAULT_EXCEPTION_REPORTER_FILTER).

Django's own filter hides settings whose *names* look secret (SECRET_KEY,
OPENAI_API_KEY, DATABASES' PASSWORD), but credentials also live inside values:
REDIS_URL and the channel layer's host address carry the Redis password, a
DATABASE_URL in a traceback's local variables carries the database's. With
DEBUG on, the page for any request with an unlisted Host lists every setting,
so those values are scrubbed wherever they appear.
"""

from __future__ import annotations

import re
from typing import Any

from django.conf import settings
from django.views.debug import SafeExceptionReporterFilter

#: The password of `scheme://user:password@host`; the user name stays (it helps, and is not a secret).
_URL_PASSWORD = re.compile(r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.\-]*://[^:/@\s]*:)(?P<password>[^@/\s]+)@")
MASK = SafeExceptionReporterFilter.cleansed_substitute


def scrub_url_credentials(text: str) -> str:
    """`redis://:s3cret@host:6379/0` -> `redis://:********************@host:6379/0`."""
    return _URL_PASSWORD.sub(lambda m: f"{m['head']}{MASK}@", text)


def _known_secrets() -> list[str]:
    """The secret values themselves, so that they are masked even where no URL or name gives them away."""
    values = [getattr(settings, "SECRET_KEY", ""), getattr(settings, "OPENAI_API_KEY", "")]
    values += [db.get("PASSWORD", "") for db in getattr(settings, "DATABASES", {}).values()]
    values += [m["password"] for m in _URL_PASSWORD.finditer(getattr(settings, "REDIS_URL", "") or "")]
    # Short values would mask innocent text (a password "a" everywhere) and are no secret anyway.
    return sorted({v for v in values if isinstance(v, str) and len(v) >= 6}, key=len, reverse=True)


def scrub(text: str) -> str:
    text = scrub_url_credentials(text)
    for secret in _known_secrets():
        text = text.replace(secret, MASK)
    return text


class CredentialRedactingFilter(SafeExceptionReporterFilter):
    """Django's filter, plus credentials inside values, in settings and in traceback variables alike."""

    def cleanse_setting(self, key: Any, value: Any) -> Any:
        # Django's version recurses into dicts, lists and tuples through this method,
        # so every nested string (CHANNEL_LAYERS' host address) passes here.
        cleansed = super().cleanse_setting(key, value)
        # str(): a lazy object wrapping a string passes isinstance (django-axes sets one) but not re.sub.
        return scrub(str(cleansed)) if isinstance(cleansed, str) else cleansed

    def get_traceback_frame_variables(self, request, tb_frame) -> list[tuple[str, Any]]:
        return [
            (name, self.cleanse_setting(name, value))
            for name, value in super().get_traceback_frame_variables(request, tb_frame)
        ]
