"""Where models are answered: the OpenAI-compatible upstreams (R2D2_UPSTREAMS) and the fallback
chains (R2D2_FALLBACKS), parsed when the settings load.

The default upstream, named `openai`, is OPENAI_BASE_URL with OPENAI_API_KEY (or its Secrets
Manager / SSM forms). R2D2_UPSTREAMS adds more, `name=base_url` separated by commas; each one's
key comes from R2D2_UPSTREAM_<NAME>_API_KEY (the name upper-cased, `-` as `_`), or
..._API_KEY_SECRET_ID / ..._API_KEY_PARAMETER, or none (no Authorization header is sent).

R2D2_FALLBACKS gives each model a client may ask for the alternates tried in order when it
fails before answering: `gpt-4o-mini=azure/gpt-4o-mini|bedrock/amazon.nova-lite-v1:0;gpt-4o=azure/gpt-4o`.

Imported by r2d2site/settings.py while it loads (an entry that does not parse stops start-up
with one line naming it), so nothing here reads Django's settings.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

#: The default upstream's name, and Bedrock's prefix: neither may name an entry of R2D2_UPSTREAMS.
DEFAULT = "openai"
RESERVED = frozenset({DEFAULT, "bedrock"})
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


class ConfigError(ValueError):
    """An entry of R2D2_UPSTREAMS or R2D2_FALLBACKS that does not parse; the message names it."""


@dataclass(frozen=True, slots=True)
class Upstream:
    """One OpenAI-compatible endpoint and where its key comes from."""

    name: str
    base_url: str | None  # None: OpenAI's own (https://api.openai.com/v1)
    api_key: str = ""
    api_key_secret_id: str = ""
    api_key_parameter: str = ""

    @property
    def key_setting(self) -> str:
        """The environment variable its key is read from (the AWS forms add a suffix): for messages."""
        return "OPENAI_API_KEY" if self.name == DEFAULT else f"{env_prefix(self.name)}_API_KEY"

    @property
    def configured(self) -> bool:
        return bool(self.base_url or self.api_key or self.api_key_secret_id or self.api_key_parameter)


def env_prefix(name: str) -> str:
    return "R2D2_UPSTREAM_" + name.upper().replace("-", "_")


def parse(text: str, environ: Mapping[str, str]) -> dict[str, Upstream]:
    """R2D2_UPSTREAMS as {name: Upstream}, keys read from `environ`; ConfigError names the first bad entry."""
    found: dict[str, Upstream] = {}
    for item in text.split(","):
        entry = item.strip()
        if not entry:
            continue
        name, equals, url = (part.strip() for part in entry.partition("="))
        if not equals or not name or not url:
            raise ConfigError(f"R2D2_UPSTREAMS: {entry!r} is not 'name=base_url'.")
        if name.lower() in RESERVED:
            raise ConfigError(f"R2D2_UPSTREAMS: {entry!r} uses the name {name!r}, which R2D2 keeps for itself.")
        if not _NAME.match(name):
            raise ConfigError(f"R2D2_UPSTREAMS: {entry!r} has a name that is not letters, digits, '-' and '_'.")
        if name in found:
            raise ConfigError(f"R2D2_UPSTREAMS: the name {name!r} is used twice.")
        if not _is_url(url):
            raise ConfigError(f"R2D2_UPSTREAMS: {entry!r} has a base URL that does not parse (http(s)://host/...).")
        prefix = env_prefix(name)
        found[name] = Upstream(
            name=name,
            base_url=url,
            api_key=environ.get(f"{prefix}_API_KEY", "").strip(),
            api_key_secret_id=environ.get(f"{prefix}_API_KEY_SECRET_ID", "").strip(),
            api_key_parameter=environ.get(f"{prefix}_API_KEY_PARAMETER", "").strip(),
        )
    return found


def parse_fallbacks(text: str) -> dict[str, tuple[str, ...]]:
    """R2D2_FALLBACKS as {model: (alternate, ...)}; ConfigError names the first bad entry."""
    found: dict[str, tuple[str, ...]] = {}
    for item in text.split(";"):
        entry = item.strip()
        if not entry:
            continue
        model, equals, rest = (part.strip() for part in entry.partition("="))
        alternates = tuple(a.strip() for a in rest.split("|"))
        if not equals or not model or not all(alternates):
            raise ConfigError(f"R2D2_FALLBACKS: {entry!r} is not 'model=alternate|alternate...'.")
        if model in found:
            raise ConfigError(f"R2D2_FALLBACKS: {model!r} is given alternates twice.")
        if model in alternates or len(set(alternates)) != len(alternates):
            raise ConfigError(f"R2D2_FALLBACKS: {entry!r} names a model twice.")
        found[model] = alternates
    return found


def _is_url(url: str) -> bool:
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (raises ValueError for a port that is not a number)
    except ValueError:
        return False
    return parts.scheme in {"http", "https"} and bool(parts.hostname) and " " not in url
