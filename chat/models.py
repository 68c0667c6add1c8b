"""Chat sessions and their messages: what a conversation leaves behind."""

from __future__ import annotations

import uuid
from datetime import timedelta

from django.conf import settings
from django.core.validators import MinValueValidator
from django.db import models
from django.db.models import Count, Q, Sum
from django.db.models.functions import Coalesce
from django.utils import timezone


class EndReason(models.TextChoices):
    CLIENT = "client", "Ended by the client"
    DISCONNECT = "disconnect", "Socket closed"
    OPERATOR = "operator", "Ended by an operator"
    ORPHANED = "orphaned", "Server process gone"
    ABANDONED = "abandoned", "Not resumed in time"
    REVOKED = "revoked", "Key revoked or account deactivated"


class Role(models.TextChoices):
    SYSTEM = "system", "System"
    USER = "user", "User"
    ASSISTANT = "assistant", "Assistant"


class MessageStatus(models.TextChoices):
    """A turn's state lives on its rows. A user's message is `accepted` while it waits, `started` once
    its turn begins (answered once a reply row points to it), or `failed`, `cancelled` or `interrupted`
    when its turn ended without a reply. A reply is `incomplete` while it streams, then `complete`,
    `cancelled` or `interrupted` (its holder died, was fenced, drained or timed out)."""

    COMPLETE = "complete", "Complete"
    CANCELLED = "cancelled", "Cancelled (partial reply)"
    INCOMPLETE = "incomplete", "Streaming (saved so far)"
    INTERRUPTED = "interrupted", "Interrupted (partial reply)"
    ACCEPTED = "accepted", "Accepted"
    STARTED = "started", "Started"
    FAILED = "failed", "Failed (no reply)"


class ChatSessionQuerySet(models.QuerySet):
    def live(self) -> ChatSessionQuerySet:
        return self.filter(ended_at__isnull=True)

    def ended(self) -> ChatSessionQuerySet:
        return self.filter(ended_at__isnull=False)

    def with_stats(self) -> ChatSessionQuerySet:
        """Message count and token totals in the same query (the admin's list)."""
        return self.annotate(
            message_count=Count("messages", filter=~Q(messages__role=Role.SYSTEM)),
            total_tokens=Coalesce(Sum("messages__prompt_tokens"), 0) + Coalesce(Sum("messages__completion_tokens"), 0),
        )


class ChatSession(models.Model):
    """One `chatbot_session_start` … `session_end`; its id is the protocol's session_id."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    model = models.CharField(max_length=200)
    system_message = models.TextField(blank=True, default="")
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    ended_at = models.DateTimeField(null=True, blank=True)
    end_reason = models.CharField(max_length=20, choices=EndReason.choices, blank=True, default="")
    client_address = models.GenericIPAddressField(null=True, blank=True)
    # Which server process and which consumer channel hold the live session:
    # the operator's "end session" reaches it there, and sessions whose
    # process is gone are ended as orphaned.
    owner_process = models.CharField(max_length=100, blank=True, default="", db_index=True)
    owner_channel = models.CharField(max_length=200, blank=True, default="")
    # Resumable sessions (chat/sessions/resume.py): the sha256 of the resume token (never the token),
    # and when the session was last left without a holder (a drained or killed process), so
    # the sweep can end it as abandoned once the resume window has passed.
    resume_token_hash = models.CharField(max_length=64, blank=True, default="")
    released_at = models.DateTimeField(null=True, blank=True)
    # The holder's lease (chat/sessions/ownership.py): it grows at every takeover, and every write
    # of a turn is conditioned on it, so a holder that lost the session can write nothing more.
    fence = models.PositiveBigIntegerField(default=1)
    # Who spent the model budget (chat/accounts/auth.py): a signed-in user or an API key, or
    # neither when auth is off. Kept when the user or key is deleted, as history.
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="chat_sessions"
    )
    api_key = models.ForeignKey(
        "ApiKey", null=True, blank=True, on_delete=models.SET_NULL, related_name="chat_sessions"
    )
    # Started with `continue_session_id`: its memory began with that session's conversation.
    continued_from = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.SET_NULL, related_name="continuations"
    )
    # The current branch (chat/turns/tree.py): its leaf is the newest message below this one (None: the newest
    # message). Moved by a regenerate, an edit or a switch only, so a plain post writes nothing more.
    branch_anchor = models.PositiveBigIntegerField(null=True, blank=True)

    objects = ChatSessionQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at"]
        indexes = [
            models.Index(fields=["model", "-created_at"], name="chat_session_model_idx"),
            models.Index(fields=["end_reason", "-created_at"], name="chat_session_reason_idx"),
            models.Index(
                fields=["owner_process"],
                condition=Q(ended_at__isnull=True),
                name="chat_session_live_owner_idx",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.id} ({self.model})"

    @property
    def is_live(self) -> bool:
        return self.ended_at is None

    @property
    def is_resumable(self) -> bool:
        return bool(self.resume_token_hash)


class ApiKey(models.Model):
    """A programmatic client's credential. Only a hash of the key is stored: the key is shown once, when made.

    The limits left empty fall back to the R2D2_QUOTA_* settings (chat/accounts/quotas.py).
    """

    name = models.CharField(max_length=100, unique=True)
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.CASCADE, related_name="api_keys"
    )
    prefix = models.CharField(max_length=16, db_index=True, editable=False, help_text="The key's visible start.")
    key_hash = models.CharField(max_length=64, unique=True, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True, editable=False)
    revoked_at = models.DateTimeField(null=True, blank=True, editable=False)
    messages_per_minute = models.PositiveIntegerField(null=True, blank=True)
    tokens_per_day = models.PositiveIntegerField(null=True, blank=True)
    max_sessions = models.PositiveIntegerField(null=True, blank=True, help_text="Concurrent live sessions.")
    allowed_models = models.CharField(max_length=500, blank=True, default="", help_text="Comma-separated; empty: any.")
    # Money limits (chat/accounts/quotas.py): dollars per UTC day and per calendar month, at R2D2_MODEL_PRICES.
    usd_per_day = models.DecimalField(
        "USD per day", max_digits=12, decimal_places=4, null=True, blank=True, validators=[MinValueValidator(0)]
    )
    usd_per_month = models.DecimalField(
        "USD per month", max_digits=12, decimal_places=4, null=True, blank=True, validators=[MinValueValidator(0)]
    )
    max_output_tokens = models.PositiveIntegerField(
        null=True, blank=True, help_text="Sent to the model as each request's output limit; empty: none."
    )

    class Meta:
        ordering = ["-created_at"]
        verbose_name = "API key"

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}…)"

    @property
    def is_active(self) -> bool:
        return self.revoked_at is None

    @property
    def model_list(self) -> list[str]:
        return [m.strip() for m in self.allowed_models.split(",") if m.strip()]


class UserLimits(models.Model):
    """A person's own money limits (signed in on the page); left empty, the R2D2_QUOTA_USD_* settings apply.

    A key has its own (ApiKey), whoever owns it."""

    user = models.OneToOneField(
        settings.AUTH_USER_MODEL, primary_key=True, on_delete=models.CASCADE, related_name="chat_limits"
    )
    usd_per_day = models.DecimalField(
        "USD per day", max_digits=12, decimal_places=4, null=True, blank=True, validators=[MinValueValidator(0)]
    )
    usd_per_month = models.DecimalField(
        "USD per month", max_digits=12, decimal_places=4, null=True, blank=True, validators=[MinValueValidator(0)]
    )

    class Meta:
        verbose_name = "spending limits"
        verbose_name_plural = "spending limits"

    def __str__(self) -> str:
        return f"limits of user {self.user_id}"


class ChatMessage(models.Model):
    """One turn's text, in the order it was said."""

    session = models.ForeignKey(ChatSession, on_delete=models.CASCADE, related_name="messages")
    role = models.CharField(max_length=10, choices=Role.choices)
    content = models.TextField()
    created_at = models.DateTimeField(auto_now_add=True)
    status = models.CharField(max_length=12, choices=MessageStatus.choices, default=MessageStatus.COMPLETE)
    # A reply's model is the one that answered, as routed (`azure/gpt-4o-mini`); `requested_model` the one
    # the session asked for (they differ when a fallback chain moved on: chat/llm/__init__.py).
    model = models.CharField(max_length=200, blank=True, default="")
    requested_model = models.CharField(max_length=200, blank=True, default="")
    prompt_tokens = models.PositiveIntegerField(null=True, blank=True)
    completion_tokens = models.PositiveIntegerField(null=True, blank=True)
    latency_ms = models.PositiveIntegerField(
        null=True, blank=True, help_text="Time from the model call to the last token."
    )
    # A reply's user message: a user message no reply points to, still `accepted`, is unanswered.
    reply_to = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.SET_NULL, related_name="replies", db_index=False
    )
    # The message before it on its branch (chat/turns/tree.py): a reply's is its user message; None for a
    # session's first message, and for a message still waiting (its turn sets it).
    parent = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.SET_NULL, related_name="children", db_index=False
    )
    # An edit (`chatbot_edit_message`): the user message it is a new version of.
    version_of = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.SET_NULL, related_name="versions", db_index=False
    )
    # The client's own id for a message it posted (`client_message_id`): a resend is recognised.
    client_message_id = models.CharField(max_length=100, blank=True, default="")
    # How the client asked for its reply, so a holder that takes the session over answers it the same way.
    stream = models.BooleanField(default=False)

    class Meta:
        ordering = ["created_at", "id"]
        indexes = [
            models.Index(fields=["session", "created_at", "id"], name="chat_message_session_idx"),
            models.Index(fields=["reply_to"], condition=Q(reply_to__isnull=False), name="chat_message_reply_to_idx"),
        ]
        constraints = [
            models.UniqueConstraint(
                fields=["session", "client_message_id"],
                condition=~Q(client_message_id=""),
                name="chat_message_client_id_uniq",
            )
        ]

    def __str__(self) -> str:
        preview = self.content if len(self.content) <= 60 else self.content[:57] + "..."
        return f"{self.role}: {preview}"


class ServerProcessQuerySet(models.QuerySet):
    def alive(self, *, stale_after: float) -> ServerProcessQuerySet:
        """Processes whose heartbeat is fresher than `stale_after` seconds."""
        return self.filter(last_seen_at__gte=timezone.now() - timedelta(seconds=stale_after))

    def gone(self, *, stale_after: float) -> ServerProcessQuerySet:
        return self.filter(last_seen_at__lt=timezone.now() - timedelta(seconds=stale_after))


class ServerProcess(models.Model):
    """A server process that says it is alive: its heartbeat refreshes `last_seen_at` every few seconds.

    A session is held in the memory of the process named by its `owner_process`;
    when that process's heartbeat goes stale (SIGKILL, crash, lost instance), no
    one can answer or end the session, so a sweep ends it as orphaned.
    """

    process_id = models.CharField(max_length=100, primary_key=True)
    host = models.CharField(max_length=255)
    pid = models.PositiveIntegerField()
    started_at = models.DateTimeField(auto_now_add=True)
    last_seen_at = models.DateTimeField(db_index=True)

    objects = ServerProcessQuerySet.as_manager()

    class Meta:
        ordering = ["-last_seen_at"]

    def __str__(self) -> str:
        return self.process_id
