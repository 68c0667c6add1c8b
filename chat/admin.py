"""The operator's view of sessions: a fast list, read-only transcripts, ending live sessions, exports.

Nothing here edits a message. Ending a session goes through
`chat.sessions.lifecycle.request_end`, which reaches the consumer holding the session over
the channel layer, in whatever process it runs, or ends it in the database when
that process is gone.
"""

from __future__ import annotations

import re
import uuid

from asgiref.sync import async_to_sync
from django.contrib import admin, messages
from django.contrib.auth import get_user_model
from django.contrib.auth.admin import UserAdmin
from django.core.exceptions import PermissionDenied
from django.db.models import Count, Exists, IntegerField, OuterRef, Q, QuerySet, Subquery, Sum
from django.db.models.functions import Coalesce
from django.http import HttpRequest, HttpResponse, HttpResponseNotAllowed, HttpResponseRedirect, JsonResponse
from django.shortcuts import get_object_or_404
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils.html import format_html
from django.utils.timezone import localtime

from chat.accounts import auth, principals, quotas, usage
from chat.models import ApiKey, ChatMessage, ChatSession, Role, ServerProcess, UserLimits
from chat.sessions import lifecycle, watch
from chat.web import markdown, transcripts

admin.site.site_header = "R2D2 operations"
admin.site.site_title = "R2D2 admin"
admin.site.index_title = "Sessions and users"

_HEX_OR_DASH = re.compile(r"[0-9a-fA-F-]+")


def _session_stats(queryset: QuerySet[ChatSession]) -> QuerySet[ChatSession]:
    """`message_count` and `total_tokens` as correlated subqueries.

    Unlike `ChatSession.objects.with_stats()` (a GROUP BY over the join, which
    aggregates every session before the page is cut), these run only for the
    rows on the page: about 30 ms instead of 700 ms on 100,000 sessions with
    600,000 messages in PostgreSQL.
    """
    of_session = ChatMessage.objects.filter(session=OuterRef("pk")).order_by().values("session")
    count = of_session.exclude(role=Role.SYSTEM).annotate(n=Count("*")).values("n")
    tokens = of_session.annotate(
        n=Sum(Coalesce("prompt_tokens", 0) + Coalesce("completion_tokens", 0), output_field=IntegerField())
    ).values("n")
    return queryset.annotate(
        message_count=Coalesce(Subquery(count, output_field=IntegerField()), 0),
        total_tokens=Coalesce(Subquery(tokens, output_field=IntegerField()), 0),
    )


def _short_time(value) -> str:
    """Compact, sortable and in the site's time zone: the list has many columns to fit."""
    return localtime(value).strftime("%Y-%m-%d %H:%M:%S") if value else "-"


class LiveFilter(admin.SimpleListFilter):
    title = "state"
    parameter_name = "state"

    def lookups(self, request, model_admin):
        return [("live", "Live"), ("ended", "Ended")]

    def queryset(self, request, queryset):
        if self.value() == "live":
            return queryset.live()
        if self.value() == "ended":
            return queryset.ended()
        return queryset


@admin.register(ChatSession)
class ChatSessionAdmin(admin.ModelAdmin):
    list_display = [
        "short_id",
        "model",
        "started",
        "ended",
        "end_reason",
        "messages_column",
        "tokens_column",
        "client_address",
        "live",
    ]
    list_filter = ["model", "end_reason", LiveFilter, ("created_at", admin.DateFieldListFilter)]
    search_fields = ["id"]
    search_help_text = "A session id (or part of one), or words from any message in the session."
    ordering = ["-created_at"]
    list_per_page = 50
    show_full_result_count = False  # one COUNT(*) less on a large table
    fields = [
        "id",
        "model",
        "created_at",
        "ended_at",
        "end_reason",
        "client_address",
        "owner_process",
        "user",
        "api_key",
        "continued_from",
        "system_message",
        "watchers",
    ]
    readonly_fields = fields
    actions = ["end_selected_sessions"]
    change_form_template = "admin/chat/chatsession/change_form.html"

    # Permissions: sessions are a record, not a form. Viewing needs the view
    # permission; ending a live session needs the change permission.

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj=None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj=None) -> bool:
        return False

    def has_end_permission(self, request: HttpRequest, obj=None) -> bool:
        """Ending a live session is the one write an operator makes."""
        return request.user.has_perm("chat.change_chatsession")

    # The list --------------------------------------------------------------

    def get_queryset(self, request: HttpRequest) -> QuerySet[ChatSession]:
        return _session_stats(super().get_queryset(request))

    def get_search_results(self, request: HttpRequest, queryset, search_term: str):
        """Match the session id (whole or part) or any message's text, without duplicate rows."""
        term = search_term.strip()
        if not term:
            return queryset, False
        matches = Q(Exists(ChatMessage.objects.filter(session=OuterRef("pk"), content__icontains=term)))
        if _HEX_OR_DASH.fullmatch(term):
            matches |= Q(id__icontains=term)  # Django drops the dashes where ids are stored as text
        return queryset.filter(matches), False

    @admin.display(description="watchers")
    def watchers(self, obj: ChatSession) -> int:
        """Sockets following the live session from other tabs or devices (chatbot_session_watch; its holder's not
        counted), asked of its holder wherever it runs (a second at most)."""
        return async_to_sync(watch.watchers)(obj)

    @admin.display(description="session", ordering="id")
    def short_id(self, obj: ChatSession) -> str:
        """The id's first block: enough to tell sessions apart and to search by; the page shows it whole."""
        return str(obj.id).split("-", 1)[0]

    @admin.display(description="started", ordering="created_at")
    def started(self, obj: ChatSession) -> str:
        return _short_time(obj.created_at)

    @admin.display(description="ended", ordering="ended_at")
    def ended(self, obj: ChatSession) -> str:
        return _short_time(obj.ended_at)

    @admin.display(description="messages", ordering="message_count")
    def messages_column(self, obj: ChatSession) -> int:
        return obj.message_count

    @admin.display(description="tokens", ordering="total_tokens")
    def tokens_column(self, obj: ChatSession) -> int:
        return obj.total_tokens

    @admin.display(description="live", boolean=True, ordering="ended_at")
    def live(self, obj: ChatSession) -> bool:
        return obj.is_live

    @admin.action(description="End selected live sessions now", permissions=["end"])
    def end_selected_sessions(self, request: HttpRequest, queryset: QuerySet[ChatSession]) -> None:
        ids = list(queryset.live().values_list("id", flat=True))
        for session_id in ids:
            lifecycle.request_end_now(session_id)
        self.message_user(request, f"Asked the server to end {len(ids)} live session(s).", messages.SUCCESS)

    # A session's page -------------------------------------------------------

    def get_urls(self):
        view = self.admin_site.admin_view
        return [
            path("<uuid:session_id>/end/", view(self.end_view), name="chat_chatsession_end"),
            path("<uuid:session_id>/export.json", view(self.export_json_view), name="chat_chatsession_export_json"),
            path("<uuid:session_id>/export.md", view(self.export_markdown_view), name="chat_chatsession_export_md"),
            *super().get_urls(),
        ]

    def change_view(self, request: HttpRequest, object_id: str, form_url: str = "", extra_context=None):
        session = self.get_object(request, object_id)
        extra = dict(extra_context or {})
        if session is not None:
            transcript = list(session.messages.all())
            for m in transcript:
                # Replies render as Markdown, as on the web page; what people typed stays plain text.
                m.content_html = markdown.render(m.content) if m.role == Role.ASSISTANT else None
            extra["transcript"] = transcript
            extra["can_end"] = session.is_live and self.has_end_permission(request, session)
        return super().change_view(request, object_id, form_url, extra_context=extra)

    def _viewable(self, request: HttpRequest, session_id: uuid.UUID) -> ChatSession:
        if not self.has_view_permission(request):
            raise PermissionDenied
        return get_object_or_404(ChatSession, id=session_id)

    def end_view(self, request: HttpRequest, session_id: uuid.UUID) -> HttpResponse:
        """POST: ask the consumer holding this live session to end it (reason `operator`)."""
        if request.method != "POST":
            return HttpResponseNotAllowed(["POST"])
        session = self._viewable(request, session_id)
        if not self.has_end_permission(request, session):
            raise PermissionDenied
        outcome = lifecycle.request_end_now(session.id)
        if outcome == lifecycle.Ended.REQUESTED:
            self.message_user(request, "Asked the server holding the session to end it; its client is told so.")
        elif outcome.in_database:
            self.message_user(request, f"Ended in the database: {outcome.value}.", messages.WARNING)
        else:
            self.message_user(request, "That session had already ended.", messages.WARNING)
        return HttpResponseRedirect(reverse("admin:chat_chatsession_change", args=[session.id]))

    def export_json_view(self, request: HttpRequest, session_id: uuid.UUID) -> HttpResponse:
        session = self._viewable(request, session_id)
        data = transcripts.as_dict(session, session.messages.all())
        response = JsonResponse(data, json_dumps_params={"indent": 2, "ensure_ascii": False})
        response["Content-Disposition"] = f'attachment; filename="r2d2-session-{session.id}.json"'
        return response

    def export_markdown_view(self, request: HttpRequest, session_id: uuid.UUID) -> HttpResponse:
        session = self._viewable(request, session_id)
        response = HttpResponse(
            transcripts.as_markdown(session, session.messages.all()), content_type="text/markdown; charset=utf-8"
        )
        response["Content-Disposition"] = f'attachment; filename="r2d2-session-{session.id}.md"'
        return response


@admin.register(ServerProcess)
class ServerProcessAdmin(admin.ModelAdmin):
    """Which server processes are beating: where live sessions are held, and which are gone."""

    list_display = ["process_id", "host", "pid", "started_at", "last_seen_at"]
    ordering = ["-last_seen_at"]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: ServerProcess | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: ServerProcess | None = None) -> bool:
        return False


# Principals: API keys and what each principal spent ------------------------------------


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    """Create (the key is shown once, on the page that follows), list, revoke; and the usage page."""

    list_display = ["name", "prefix", "user", "created_at", "last_used_at", "active", "tokens_today", "spent_today"]
    list_filter = [("revoked_at", admin.EmptyFieldListFilter)]
    search_fields = ["name", "prefix", "user__username"]
    fields = [
        "name",
        "user",
        "prefix",
        "created_at",
        "last_used_at",
        "revoked_at",
        "messages_per_minute",
        "tokens_per_day",
        "max_sessions",
        "allowed_models",
        "usd_per_day",
        "usd_per_month",
        "max_output_tokens",
    ]
    readonly_fields = ["prefix", "created_at", "last_used_at", "revoked_at"]
    actions = ["revoke_selected"]
    change_list_template = "admin/chat/apikey/change_list.html"

    def has_delete_permission(self, request: HttpRequest, obj=None) -> bool:
        return False  # revoke instead: its sessions keep saying whose they were

    @admin.display(boolean=True, description="active", ordering="revoked_at")
    def active(self, obj: ApiKey) -> bool:
        return obj.is_active

    @admin.display(description="tokens today")
    def tokens_today(self, obj: ApiKey) -> int:
        return self._today(obj)[1]["tokens_today"]

    @admin.display(description="spent today / this month")
    def spent_today(self, obj: ApiKey) -> str:
        principal, used = self._today(obj)
        return spend_mark(principal, used)

    def _today(self, obj: ApiKey) -> tuple[principals.Principal, dict]:
        """The key's principal and its counters, read once for the row's two columns."""
        found = getattr(obj, "_today", None)
        if found is None:
            principal = auth.principal_for_key(obj)
            found = obj._today = (principal, async_to_sync(quotas.usage)(principal))
        return found

    def save_model(self, request: HttpRequest, obj: ApiKey, form, change: bool) -> None:
        if change:
            return super().save_model(request, obj, form, change)
        row, key = auth.create_api_key(
            obj.name,
            user=obj.user,
            messages_per_minute=obj.messages_per_minute,
            tokens_per_day=obj.tokens_per_day,
            max_sessions=obj.max_sessions,
            models=obj.model_list,
            usd_per_day=obj.usd_per_day,
            usd_per_month=obj.usd_per_month,
            max_output_tokens=obj.max_output_tokens,
        )
        obj.pk, obj.prefix, obj.key_hash = row.pk, row.prefix, row.key_hash
        obj._new_key = key  # shown by response_add, then gone

    def response_add(self, request: HttpRequest, obj: ApiKey, post_url_continue=None) -> HttpResponse:
        # Rendered straight away, not redirected with a message: Django keeps messages in a cookie or
        # the session table, and the key must be stored nowhere.
        context = {**self.admin_site.each_context(request), "opts": self.opts, "api_key": obj, "key": obj._new_key}
        return TemplateResponse(request, "admin/chat/apikey/created.html", context)  # never cached (admin_view)

    @admin.action(description="Revoke selected keys (their open sockets close)", permissions=["change"])
    def revoke_selected(self, request: HttpRequest, queryset: QuerySet[ApiKey]) -> None:
        revoked = sum(auth.revoke(key) for key in queryset)
        self.message_user(request, f"Revoked {revoked} key(s); their open sockets are being closed.")

    def get_urls(self):
        view = self.admin_site.admin_view
        return [path("usage/", view(self.usage_view), name="chat_usage"), *super().get_urls()]

    def usage_view(self, request: HttpRequest) -> HttpResponse:
        """Per principal and model: messages and tokens per day for 30 days, today against each quota, cost."""
        if not (request.user.is_staff and self.has_view_permission(request)):
            raise PermissionDenied
        days = usage.last_days()
        spent = usage.by_principal()
        keys = {k.id: k for k in ApiKey.objects.filter(id__in=[i for kind, i in spent if kind == "key"])}
        for key in ApiKey.objects.filter(revoked_at__isnull=True):
            keys.setdefault(key.id, key)
            spent.setdefault(("key", key.id), usage.PrincipalUsage("key", key.id))
        users = {
            u.id: u
            for u in get_user_model()
            .objects.filter(id__in=[i for kind, i in spent if kind == "user"])
            .select_related("chat_limits")
        }
        rows = []
        for (kind, ident), used in sorted(
            spent.items(), key=lambda item: -(sum(m.tokens for m in item[1].models.values()))
        ):
            if kind == "key":
                principal, label = auth.principal_for_key(keys[ident]), f"API key {keys[ident]}"
            elif kind == "user" and ident in users:
                own = getattr(users[ident], "chat_limits", None)
                principal = principals.Principal(user_id=ident, limits=principals.limits_for_user(own))
                label = f"user {users[ident].get_username()}"
            else:
                principal, label = None, "anonymous (no quota)"
            today = async_to_sync(quotas.usage)(principal) if principal else {}
            live = ChatSession.objects.live().filter(principal.own_sessions()).count() if principal else None
            rows.append(
                {
                    "label": label,
                    "limits": principal.limits if principal else None,
                    "today": today,
                    "near": quotas.near_limit(principal, today) if principal else [],
                    "live": live,
                    "models": sorted(used.models.values(), key=lambda m: -m.tokens),
                    "cost": used.cost,
                    "tokens_chart": usage.chart(used, days),
                    "messages_chart": usage.chart(used, days, messages=True),
                    "legend": usage.legend(used),
                }
            )
        context = {
            **self.admin_site.each_context(request),
            "opts": self.opts,
            "title": "Usage by principal, last 30 days",
            "rows": rows,
            "first_day": days[0],
            "priced": bool(usage.prices()),
        }
        return TemplateResponse(request, "admin/chat/usage.html", context)


def spend_mark(principal: principals.Principal, used: dict) -> str:
    """Dollars spent today and this month against the money limits, marked past 80% of one."""
    limits = principal.limits
    near = quotas.near_limit(principal, used)
    parts = []
    for name, spent, limit in (
        ("usd_per_day", used["usd_today"], limits.usd_per_day),
        ("usd_per_month", used["usd_this_month"], limits.usd_per_month),
    ):
        text = f"${spent:.4f}" + (f" of ${limit:.2f}" if limit else "")
        if name in near:
            text = format_html('<strong class="spend-warning" title="past 80% of its limit">⚠ {}</strong>', text)
        parts.append(text)
    return format_html("{} / {}", *parts)


# People's own spending limits (issue 20) ---------------------------------------------------


class UserLimitsInline(admin.StackedInline):
    """A person's money limits (used when they chat signed in on the page); empty: R2D2_QUOTA_USD_*."""

    model = UserLimits
    can_delete = True
    extra = 0
    max_num = 1
    verbose_name_plural = "spending limits (signed in on the page; empty: the R2D2_QUOTA_USD_* settings)"


class UserWithLimitsAdmin(UserAdmin):
    inlines = [*UserAdmin.inlines, UserLimitsInline]
    list_display = [*UserAdmin.list_display, "spent_today"]

    @admin.display(description="spent today / this month")
    def spent_today(self, obj) -> str:
        own = getattr(obj, "chat_limits", None)  # none set: the settings' limits
        principal = principals.Principal(user_id=obj.pk, limits=principals.limits_for_user(own))
        return spend_mark(principal, async_to_sync(quotas.usage)(principal))

    def get_queryset(self, request: HttpRequest):
        return super().get_queryset(request).select_related("chat_limits")


if admin.site.is_registered(get_user_model()):
    admin.site.unregister(get_user_model())
admin.site.register(get_user_model(), UserWithLimitsAdmin)
