"""The operator's view of sessions: read-only transcripts."""

from __future__ import annotations

from django.contrib import admin

from chat.models import ChatMessage, ChatSession


class ChatMessageInline(admin.TabularInline):
    model = ChatMessage
    fields = ["created_at", "role", "content", "status", "prompt_tokens", "completion_tokens", "latency_ms"]
    readonly_fields = fields
    extra = 0
    can_delete = False

    def has_add_permission(self, request, obj=None) -> bool:
        return False

    def has_change_permission(self, request, obj=None) -> bool:
        return False


@admin.register(ChatSession)
class ChatSessionAdmin(admin.ModelAdmin):
    list_display = ["id", "model", "created_at", "ended_at", "end_reason", "client_address"]
    list_filter = ["model", "end_reason", "created_at"]
    search_fields = ["id"]
    readonly_fields = [f.name for f in ChatSession._meta.fields]
    inlines = [ChatMessageInline]

    def has_add_permission(self, request) -> bool:
        return False
