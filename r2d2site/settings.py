"""R2D2 settings: one module, every value read from the environment (12-factor).

Unset variables mean the embedded defaults: SQLite, the in-memory channel layer
and, without OPENAI_API_KEY / OPENAI_BASE_URL, the offline responder. So a
fresh clone runs with nothing installed but the requirements.
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

from chat.llm import upstreams as _upstreams
from chat.ops import prices as _prices

BASE_DIR = Path(__file__).resolve().parent.parent


def env_bool(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        return default
    return value.strip().lower() in {"1", "true", "yes", "on"}


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    return int(value) if value else default


def env_float(name: str, default: float) -> float:
    value = os.environ.get(name, "").strip()
    return float(value) if value else default


def env_list(name: str, default: list[str] | None = None) -> list[str]:
    value = os.environ.get(name, "")
    items = [item.strip() for item in value.split(",") if item.strip()]
    return items or list(default or [])


# Off unless asked for: Daphne, the Procfile and any process started without the
# variable run as in production. `manage.py runserver` (the README's quick start)
# is the one place that defaults it on (manage.py); an explicit value always wins.
DEBUG = env_bool("DJANGO_DEBUG", False)

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "")
if not SECRET_KEY:
    if not DEBUG:
        raise ImproperlyConfigured(
            "DJANGO_SECRET_KEY is not set. Production (DJANGO_DEBUG unset or 0) needs a long random "
            "secret: generate one with `python -c 'import secrets; print(secrets.token_urlsafe(50))'` "
            "and set it in the environment (for Elastic Beanstalk: `eb setenv DJANGO_SECRET_KEY=...`)."
        )
    SECRET_KEY = "django-insecure-r2d2-local-development-only"  # dev only: refused above when DEBUG is off

# Even with DEBUG on, the error page never shows credentials (chat/ops/redaction.py).
DEFAULT_EXCEPTION_REPORTER_FILTER = "chat.ops.redaction.CredentialRedactingFilter"

ALLOWED_HOSTS = env_list("DJANGO_ALLOWED_HOSTS", ["localhost", "127.0.0.1", "[::1]"])

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "channels",
    # Sign-in lockout (chat/accounts/lockout.py).
    "axes",
    "chat",
]

MIDDLEWARE = [
    "chat.web.health.HealthCheckMiddleware",
    # /metrics for private peers (a Prometheus in the VPC): plain HTTP, any Host (chat/web/metrics.py).
    "chat.web.metrics.PrivateScrapeMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    # Last, as django-axes asks: turns a locked-out sign-in into the 429 page.
    "axes.middleware.AxesMiddleware",
]

ROOT_URLCONF = "r2d2site.urls"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

ASGI_APPLICATION = "r2d2site.asgi.application"
WSGI_APPLICATION = None


# Database: DATABASE_URL, else Elastic Beanstalk's RDS_* variables, else SQLite.
def database_config() -> dict:
    url = os.environ.get("DATABASE_URL", "").strip()
    if not url and os.environ.get("RDS_HOSTNAME"):
        from urllib.parse import quote

        url = "postgres://{user}:{password}@{host}:{port}/{name}".format(
            user=quote(os.environ.get("RDS_USERNAME", ""), safe=""),
            password=quote(os.environ.get("RDS_PASSWORD", ""), safe=""),
            host=os.environ["RDS_HOSTNAME"],
            port=os.environ.get("RDS_PORT", "5432"),
            name=os.environ.get("RDS_DB_NAME", "ebdb"),
        )
    if not url:
        return {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": os.environ.get("R2D2_SQLITE_PATH", str(BASE_DIR / "db.sqlite3")),
            # Many async ORM threads write at once; wait for the lock instead of failing.
            "OPTIONS": {"timeout": 20, "transaction_mode": "IMMEDIATE"},
        }
    config = dj_database_url.parse(url)
    if config["ENGINE"] == "django.db.backends.postgresql":
        # Async ORM calls run in threads, each holding a connection: a bounded
        # pool keeps hundreds of sockets from exhausting max_connections.
        config["CONN_MAX_AGE"] = 0
        # The pool checks a connection before lending it (one empty round trip): after a restart or a
        # failover its idle connections are dead, and each would otherwise fail one ORM call.
        config["CONN_HEALTH_CHECKS"] = True
        config.setdefault("OPTIONS", {})["pool"] = {
            "min_size": env_int("R2D2_DB_POOL_MIN", 2),
            "max_size": env_int("R2D2_DB_POOL_MAX", 10),
            "timeout": env_float("R2D2_DB_POOL_TIMEOUT", 30.0),
        }
    return config


DATABASES = {"default": database_config()}
# PostgreSQL only: connections per process for the turns' own writes, which run on the event
# loop beside the ORM's pool (chat/turns/pgpool.py). Each statement takes well under a millisecond,
# so a few connections serve hundreds of turns a second; more would only queue in the server.
R2D2_DB_TURN_POOL_MAX = env_int("R2D2_DB_TURN_POOL_MAX", 4)
# How long a turn or a frame waits for PostgreSQL or Redis to come back before its client is told
# `storage_unavailable` (chat/ops/storage.py): a restart takes under a second; an RDS failover 20-60 s.
R2D2_STORAGE_RETRY_SECONDS = env_float("R2D2_STORAGE_RETRY_SECONDS", 10.0)
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"


# Channel layer: Redis when REDIS_URL is set, in-memory otherwise.
REDIS_URL = os.environ.get("REDIS_URL", "").strip()
if REDIS_URL:
    CHANNEL_LAYERS = {
        "default": {
            # channels_redis's layer with a pool that queues commands (chat/channel_layer.py).
            "BACKEND": "chat.channel_layer.RedisChannelLayer",
            "CONFIG": {
                # redis-py 8 reads with a 5 s socket timeout by default, the same as
                # channels-redis's 5 s BZPOPMIN: every idle consumer's receive then
                # raised TimeoutError and Daphne closed the socket (1011) about 5 s
                # after it opened. Reads must outlast the blocking pop.
                "hosts": [
                    {
                        "address": REDIS_URL,
                        "socket_timeout": env_float("R2D2_REDIS_SOCKET_TIMEOUT", 30.0),
                        # Concurrent Redis commands per process; more wait (up to `timeout` s).
                        "max_connections": env_int("R2D2_REDIS_MAX_CONNECTIONS", 100),
                        "timeout": env_float("R2D2_REDIS_POOL_TIMEOUT", 20.0),
                    }
                ],
                # channels-redis silently drops a message sent to a full
                # channel; the default of 100 is too small for bursts.
                "capacity": env_int("R2D2_CHANNEL_CAPACITY", 1000),
                "expiry": 60,
                "prefix": os.environ.get("R2D2_CHANNEL_PREFIX", "r2d2"),
            },
        }
    }
else:
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels.layers.InMemoryChannelLayer",
            "CONFIG": {"capacity": env_int("R2D2_CHANNEL_CAPACITY", 1000)},
        }
    }

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = os.environ.get("DJANGO_STATIC_ROOT", "").strip() or BASE_DIR / "staticfiles"
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {
        "BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"
        if DEBUG
        else "whitenoise.storage.CompressedManifestStaticFilesStorage"
    },
}

# Behind Elastic Beanstalk's HTTPS load balancer.
if not DEBUG:
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    SECURE_SSL_REDIRECT = env_bool("DJANGO_SECURE_SSL_REDIRECT", True)
    SECURE_REDIRECT_EXEMPT = [r"^healthz$"]
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True
    SECURE_HSTS_SECONDS = env_int("DJANGO_HSTS_SECONDS", 31536000)
    SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("DJANGO_HSTS_INCLUDE_SUBDOMAINS", True)
    SECURE_HSTS_PRELOAD = env_bool("DJANGO_HSTS_PRELOAD", False)
    SECURE_CONTENT_TYPE_NOSNIFF = True
    if not SECURE_HSTS_PRELOAD:
        # Preloading is a deliberate, hard-to-undo choice per domain (and impossible
        # for *.elasticbeanstalk.com): opt in with DJANGO_HSTS_PRELOAD=1.
        SILENCED_SYSTEM_CHECKS = ["security.W021"]
CSRF_TRUSTED_ORIGINS = env_list("DJANGO_CSRF_TRUSTED_ORIGINS")


# The model API.
# Or from AWS Secrets Manager / SSM Parameter Store, read on first use and kept for
# the process's life (chat/llm/credentials.py): so no other command pays for it.
OPENAI_API_KEY = os.environ.get("OPENAI_API_KEY", "").strip()
OPENAI_API_KEY_SECRET_ID = os.environ.get("OPENAI_API_KEY_SECRET_ID", "").strip()
OPENAI_API_KEY_PARAMETER = os.environ.get("OPENAI_API_KEY_PARAMETER", "").strip()
OPENAI_BASE_URL = os.environ.get("OPENAI_BASE_URL", "").strip() or None
# Sent to OpenAI itself as OpenAI-Organization / OpenAI-Project when set (the openai client read them too).
OPENAI_ORG_ID = os.environ.get("OPENAI_ORG_ID", "").strip()
OPENAI_PROJECT_ID = os.environ.get("OPENAI_PROJECT_ID", "").strip()

# Several upstreams, fallback chains and circuit breakers (chat/llm/upstreams.py, chat/llm/router.py,
# chat/llm/breaker.py; docs/failover.md). More OpenAI-compatible endpoints besides the default one
# (`openai`): "azure=https://x.openai.azure.com/openai/v1,vllm=http://10.0.3.7:8000/v1", each one's key
# in R2D2_UPSTREAM_<NAME>_API_KEY (or _API_KEY_SECRET_ID / _API_KEY_PARAMETER); a model `name/model`
# goes to upstream `name`. The alternates of a model a client may ask for, tried in order when it
# fails before its first chunk: "gpt-4o-mini=azure/gpt-4o-mini|bedrock/amazon.nova-lite-v1:0;gpt-4o=azure/gpt-4o".
# An entry that does not parse stops start-up here, naming it.
try:
    R2D2_UPSTREAMS = _upstreams.parse(os.environ.get("R2D2_UPSTREAMS", ""), os.environ)
    R2D2_FALLBACKS = _upstreams.parse_fallbacks(os.environ.get("R2D2_FALLBACKS", ""))
except _upstreams.ConfigError as exc:
    raise ImproperlyConfigured(str(exc)) from None
# A chain moves on when a member sends no first chunk within this (the turn's R2D2_UPSTREAM_TIMEOUT still bounds all).
R2D2_FAILOVER_FIRST_CHUNK_SECONDS = env_float("R2D2_FAILOVER_FIRST_CHUNK_SECONDS", 15.0)
# A chain member (upstream, model) that failed this many times within the window is skipped for the cooldown.
R2D2_CIRCUIT_FAILURES = env_int("R2D2_CIRCUIT_FAILURES", 5)
R2D2_CIRCUIT_WINDOW_SECONDS = env_float("R2D2_CIRCUIT_WINDOW_SECONDS", 60.0)
R2D2_CIRCUIT_COOLDOWN_SECONDS = env_float("R2D2_CIRCUIT_COOLDOWN_SECONDS", 30.0)

# R2D2's own knobs (every variable read here is documented in docs/configuration.md; tests/test_docs.py checks).
R2D2_DEFAULT_MODEL = os.environ.get("R2D2_DEFAULT_MODEL", "").strip() or "gpt-3.5-turbo"
R2D2_ALLOWED_MODELS = env_list("R2D2_ALLOWED_MODELS")
R2D2_MAX_CONTEXT_CHARS = env_int("R2D2_MAX_CONTEXT_CHARS", 48_000)
R2D2_MAX_MESSAGE_CHARS = env_int("R2D2_MAX_MESSAGE_CHARS", 16_000)
R2D2_MAX_QUEUED_MESSAGES = env_int("R2D2_MAX_QUEUED_MESSAGES", 4)
R2D2_MAX_SESSIONS_PER_CONNECTION = env_int("R2D2_MAX_SESSIONS_PER_CONNECTION", 8)
#: Sessions one socket may watch at once (chatbot_session_watch, chat/sessions/watch.py).
R2D2_MAX_WATCHES_PER_SOCKET = env_int("R2D2_MAX_WATCHES_PER_SOCKET", 16)
R2D2_RATE_LIMIT_PER_MINUTE = env_int("R2D2_RATE_LIMIT_PER_MINUTE", 30)
# A model call's deadlines (chat/llm/base.py): its first chunk (connect, response headers and
# first chunk, retries included), each gap between chunks, and the whole reply.
R2D2_UPSTREAM_TIMEOUT = env_float("R2D2_UPSTREAM_TIMEOUT", 60.0)
R2D2_UPSTREAM_IDLE_TIMEOUT = env_float("R2D2_UPSTREAM_IDLE_TIMEOUT", 60.0)
R2D2_MAX_REPLY_SECONDS = env_float("R2D2_MAX_REPLY_SECONDS", 900.0)
R2D2_UPSTREAM_RETRIES = env_int("R2D2_UPSTREAM_RETRIES", 2)
# A streamed reply is saved while it streams, at most this far behind what was sent.
R2D2_CHECKPOINT_SECONDS = env_float("R2D2_CHECKPOINT_SECONDS", 1.0)
# Outgoing WebSocket frames (a whole reply is one `message` frame) may be this large;
# incoming frames keep Daphne's own 1 MiB limit (chat/edge/daphne.py).
R2D2_MAX_OUTGOING_FRAME_BYTES = env_int("R2D2_MAX_OUTGOING_FRAME_BYTES", 16 * 1024 * 1024)
# Past this many bytes waiting in a socket's send buffer, the turns sending to it stop reading
# their model until it drains; a client that takes nothing for R2D2_STALLED_READER_SECONDS
# while frames wait is closed with code 4408 (chat/edge/flow.py).
R2D2_SEND_BUFFER_BYTES = max(1, env_int("R2D2_SEND_BUFFER_BYTES", 256 * 1024))
R2D2_STALLED_READER_SECONDS = env_float("R2D2_STALLED_READER_SECONDS", 30.0)
# Who may read /metrics besides staff and private addresses: `Authorization: Bearer <token>` (chat/web/metrics.py).
R2D2_METRICS_TOKEN = os.environ.get("R2D2_METRICS_TOKEN", "")
# Images in model replies (web page and admin transcript) load from other sites
# only when this is on: off, a reply cannot make a reader's browser fetch a URL
# (a tracking pixel, or data smuggled out in a query string).
R2D2_PAGE_REMOTE_IMAGES = env_bool("R2D2_PAGE_REMOTE_IMAGES", False)
# Proxies in front of the server that append to X-Forwarded-For (chat/edge/proxy.py):
# 0 trusts no header (the peer is the client); the Elastic Beanstalk bundle sets 2
# (the load balancer and nginx).
R2D2_TRUSTED_PROXIES = env_int("R2D2_TRUSTED_PROXIES", 0)
# Open WebSockets across processes on Redis (chat/edge/connection_limits.py); 0: no cap. Anonymous
# ones per client address (IPv6 by /64); those of a principal (an API key, a signed-in person) per principal.
R2D2_MAX_CONNECTIONS_PER_ADDRESS = env_int("R2D2_MAX_CONNECTIONS_PER_ADDRESS", 20)
R2D2_MAX_CONNECTIONS_PER_PRINCIPAL = env_int("R2D2_MAX_CONNECTIONS_PER_PRINCIPAL", 50)
# Liveness of server processes (chat/sessions/liveness.py): a process beats every
# R2D2_HEARTBEAT_SECONDS; one silent for R2D2_PROCESS_STALE_SECONDS is gone and
# its live sessions are ended as orphaned (swept every R2D2_ORPHAN_SWEEP_SECONDS).
R2D2_HEARTBEAT_SECONDS = env_float("R2D2_HEARTBEAT_SECONDS", 10.0)
R2D2_PROCESS_STALE_SECONDS = env_float("R2D2_PROCESS_STALE_SECONDS", 45.0)
R2D2_ORPHAN_SWEEP_SECONDS = env_float("R2D2_ORPHAN_SWEEP_SECONDS", 60.0)
# Resumable sessions (chat/sessions/resume.py): a session whose socket closed stays live this long,
# its frames kept, waiting for the client to resume it; then it ends as abandoned.
R2D2_RESUME_WINDOW_SECONDS = env_float("R2D2_RESUME_WINDOW_SECONDS", 300.0)
# On SIGTERM (chat/sessions/drain.py): how long turns in progress may run before sockets close with 1012.
R2D2_DRAIN_SECONDS = env_float("R2D2_DRAIN_SECONDS", 30.0)

# Who may spend the model budget (chat/accounts/auth.py, chat/accounts/quotas.py). Required by
# default in production (DEBUG off) and not in local development; explicit wins.
R2D2_REQUIRE_AUTH = env_bool("R2D2_REQUIRE_AUTH", not DEBUG)
# Quotas per principal (a signed-in user or an API key), across all its
# connections and server processes; an API key's own limits override them. 0: no limit.
R2D2_QUOTA_MESSAGES_PER_MINUTE = env_int("R2D2_QUOTA_MESSAGES_PER_MINUTE", 20)
R2D2_QUOTA_TOKENS_PER_DAY = env_int("R2D2_QUOTA_TOKENS_PER_DAY", 200_000)
R2D2_QUOTA_MAX_SESSIONS = env_int("R2D2_QUOTA_MAX_SESSIONS", 8)
R2D2_QUOTA_MODELS = env_list("R2D2_QUOTA_MODELS")
# A revoked key's sockets are closed at once over the channel layer; a socket the
# revocation could not reach (in-memory layer, another process) re-checks its key
# before spending anything when its last check is older than this.
R2D2_AUTH_RECHECK_SECONDS = env_float("R2D2_AUTH_RECHECK_SECONDS", 5.0)
# Dollars per million input:output tokens: "gpt-4o-mini=0.15:0.60,gpt-4o=2.50:10" (0: free). What a
# turn costs, for the money limits below and the admin's cost figures (chat/ops/prices.py).
# An entry that does not parse stops start-up here, naming it, rather than letting a spending
# limit count nothing.
R2D2_MODEL_PRICES = os.environ.get("R2D2_MODEL_PRICES", "")
try:
    _prices.parse(R2D2_MODEL_PRICES)
except _prices.PriceError as exc:
    raise ImproperlyConfigured(str(exc)) from None
# Money limits per principal, in dollars (a key's or a user's own limit wins; 0: none): per UTC
# day and per calendar month (UTC). A principal with one may use only priced models.
R2D2_QUOTA_USD_PER_DAY = env_float("R2D2_QUOTA_USD_PER_DAY", 0.0)
R2D2_QUOTA_USD_PER_MONTH = env_float("R2D2_QUOTA_USD_PER_MONTH", 0.0)
# What a turn reserves for its reply when its key sets no output cap (--max-output-tokens): about
# a long chat answer. A reply may use more; it is charged what it used when the turn ends.
R2D2_QUOTA_RESERVE_OUTPUT_TOKENS = env_int("R2D2_QUOTA_RESERVE_OUTPUT_TOKENS", 500)

# Sign-in lockout with django-axes (chat/accounts/lockout.py): after this many failed sign-ins
# for one username from one client address, that pair is refused (429) for this many minutes
# after its last attempt, on the page's sign-in and the admin's. `manage.py axes_reset` lifts it.
R2D2_SIGNIN_FAILURE_LIMIT = env_int("R2D2_SIGNIN_FAILURE_LIMIT", 10)
R2D2_SIGNIN_LOCKOUT_MINUTES = env_int("R2D2_SIGNIN_LOCKOUT_MINUTES", 15)
AUTHENTICATION_BACKENDS = [
    "axes.backends.AxesStandaloneBackend",  # first: refuses a locked-out pair before any password check
    "django.contrib.auth.backends.ModelBackend",
]
AXES_FAILURE_LIMIT = R2D2_SIGNIN_FAILURE_LIMIT
AXES_COOLOFF_TIME = timedelta(minutes=R2D2_SIGNIN_LOCKOUT_MINUTES)
AXES_LOCKOUT_PARAMETERS = [["username", "ip_address"]]
AXES_USERNAME_FORM_FIELD = "username"  # the sign-in forms' field (axes' default is a lazy lookup of the same)
AXES_RESET_ON_SUCCESS = True  # a person's own typos do not add up across successful sign-ins
AXES_CLIENT_IP_CALLABLE = "chat.accounts.lockout.client_address"
AXES_CLIENT_STR_CALLABLE = "chat.accounts.lockout.describe"
AXES_LOCKOUT_CALLABLE = "chat.web.lockout.locked_out"

LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "chat"
LOGOUT_REDIRECT_URL = "chat"
# Amazon Bedrock (chat/llm/bedrock.py). These model ids, and any name starting with
# "bedrock/", are answered by Bedrock's Converse API with boto3's usual credential
# chain (on Elastic Beanstalk, the instance role); every other name goes to the
# OpenAI-compatible provider. The endpoint override is for tests and VPC endpoints
# (boto3 also honours AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_BEDROCK_RUNTIME itself).
R2D2_BEDROCK_MODELS = env_list("R2D2_BEDROCK_MODELS")
R2D2_BEDROCK_REGION = (
    os.environ.get("R2D2_BEDROCK_REGION", "").strip()
    or os.environ.get("AWS_REGION", "").strip()
    or os.environ.get("AWS_DEFAULT_REGION", "").strip()
    or None
)
R2D2_BEDROCK_ENDPOINT_URL = os.environ.get("R2D2_BEDROCK_ENDPOINT_URL", "").strip() or None

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"json": {"()": "chat.ops.logging.JsonFormatter"}},
    # Lines a client can cause at will (a 4xx, a bad Host, a failed sign-in): at most one per
    # client per minute, with a count of the rest (chat/ops/throttle.py).
    "filters": {"client_triggered": {"()": "chat.ops.throttle.ClientTriggeredFilter"}},
    # stderr, where Daphne and Django write their own messages too (Elastic Beanstalk
    # collects both streams of the Procfile's process into web.stdout.log).
    "handlers": {
        "stderr": {
            "class": "logging.StreamHandler",
            "stream": "ext://sys.stderr",
            "formatter": "json",
            "filters": ["client_triggered"],
        }
    },
    "root": {"handlers": ["stderr"], "level": os.environ.get("R2D2_LOG_LEVEL", "INFO")},
    "loggers": {
        # Django gives its "django" logger a plain-text console handler of its own (DEBUG on, as under
        # `manage.py runserver`); its records also reach the root's JSON handler, so every line (the
        # autoreloader's, Daphne's runserver's "WebSocket CONNECT", ...) was printed twice. One handler.
        "django": {"handlers": [], "level": "INFO"},
        # botocore logs request details (and, at DEBUG, bodies and signed headers): never.
        "botocore": {"level": "WARNING"},
        "urllib3": {"level": "WARNING"},
        # django-axes says at INFO that it runs for every failed sign-in; its warnings (a failure,
        # a lockout) are the lines worth keeping, throttled per client.
        "axes": {"level": "WARNING"},
        # psycopg's pool warns at every failed reconnect (once a second per missing connection while the
        # database is down): chat/ops/storage.py logs an outage once when it starts and once when it ends.
        "psycopg.pool": {"level": "ERROR"},
    },
}
