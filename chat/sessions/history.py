"""A principal's past conversations: listed on the web page, read as transcripts, continued.

A continued session (`continue_session_id`) points at the one it continued, so a
conversation continued several times reads as one: its messages are those of the
whole chain, oldest first.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from asgiref.sync import sync_to_async

from chat.models import ChatMessage, ChatSession, Role
from chat.ops import storage
from chat.protocol import branches
from chat.protocol.errors import ClientError, ErrorCode
from chat.turns import tree

#: Continuations followed back at most (a loop is impossible, but a chain is bounded anyway).
MAX_CHAIN = 50


@dataclass
class Memory:
    """What a continued session starts with: the earlier session, its latest system message and its turns
    (the live turn machine is chat/turns/conversation.py's `Conversation`)."""

    session: ChatSession
    system_message: str
    history: list[tuple[str, str]]


def chain(session: ChatSession) -> list[ChatSession]:
    """The session and those it continued, oldest first."""
    sessions = [session]
    while sessions[-1].continued_from_id is not None and len(sessions) < MAX_CHAIN:
        earlier = ChatSession.objects.filter(id=sessions[-1].continued_from_id).first()
        if earlier is None:
            break
        sessions.append(earlier)
    return sessions[::-1]


def messages_of(session: ChatSession) -> list[ChatMessage]:
    """The conversation the session ends (its chain), oldest first: each session's current branch."""
    return [m for earlier in chain(session) for m in messages_of_session(earlier)]


def messages_of_session(session: ChatSession) -> list[ChatMessage]:
    """The session's current branch, its system messages included, in order; a message with other versions
    (regenerated, edited) has `other_versions` set, so that a transcript marks where other branches are."""
    rows = list(ChatMessage.objects.filter(session=session).order_by("created_at", "id"))
    on_branch, branched = branch_of(session, rows)
    shown = set(on_branch)
    for m in rows:
        m.other_versions = m.id in branched
    return [m for m in rows if m.role == Role.SYSTEM or m.id in shown]


def _load(session_id: uuid.UUID) -> Memory | None:
    session = ChatSession.objects.filter(id=session_id).first()
    if session is None:
        return None
    system_message = ""
    history: list[tuple[str, str]] = []
    for earlier in chain(session):
        # As the model remembered it: each session's current branch (chat/turns/tree.py), every question on it
        # and every reply it gave (stopped ones as far as they got).
        rows = list(ChatMessage.objects.filter(session=earlier).order_by("id"))
        for m in rows:
            if m.role == Role.SYSTEM:
                system_message = m.content
        nodes = tree.index(_node(m) for m in rows)
        history += tree.remembered(tree.path(nodes, tree.leaf(nodes, earlier.branch_anchor)))
    return Memory(session=session, system_message=system_message, history=history)


def _node(m: ChatMessage) -> tree.Node:
    return tree.Node(m.id, m.parent_id, m.role, m.content, m.status)


def current_branch(session: ChatSession) -> tuple[list[ChatMessage], set[int]]:
    """The session's current branch, root first, and which of its messages have other versions (a transcript
    marks them): one query for all the session's messages."""
    rows = {m.id: m for m in ChatMessage.objects.filter(session=session).exclude(role=Role.SYSTEM)}
    on_branch, branched = branch_of(session, rows.values())
    return [rows[i] for i in on_branch], branched


def branch_of(session: ChatSession, rows: Iterable[ChatMessage]) -> tuple[list[int], set[int]]:
    """Of the session's messages `rows`: the ids on its current branch, root first, and those with other versions."""
    nodes = tree.index(_node(m) for m in rows)
    return [node.id for node in tree.path(nodes, tree.leaf(nodes, session.branch_anchor))], tree.branched(nodes)


def _tree_frame(session_id: uuid.UUID, may_read: Callable[[ChatSession], bool]) -> str:
    session = ChatSession.objects.filter(id=session_id).first()
    if session is None:
        raise ClientError(ErrorCode.SESSION_NOT_FOUND, "No session has that session_id.")
    if not may_read(session):
        raise ClientError(ErrorCode.SESSION_NOT_OWNED, "That session belongs to someone else.")
    rows = list(ChatMessage.objects.filter(session=session).exclude(role=Role.SYSTEM).order_by("id"))
    leaf = tree.leaf(tree.index(_node(m) for m in rows), session.branch_anchor)
    fields = ("id", "parent_id", "role", "content", "status", "model", "created_at")
    entries = [branches.HistoryEntry(*(getattr(m, f) for f in fields)) for m in rows]
    return branches.history(session.id, leaf, entries)


async def tree_frame(session_id: uuid.UUID, may_read: Callable[[ChatSession], bool]) -> str:
    """The answer to `chatbot_history` (`may_read`: whether the asking socket may read that session), or
    ClientError. A read: retried through a database blip like the turn's own calls."""
    return await storage.retry(lambda: sync_to_async(_tree_frame)(session_id, may_read))


async def load(session_id: uuid.UUID) -> Memory | None:
    """`_load`, retried through a database blip (a continued session's start waits for it like a post)."""
    return await storage.retry(lambda: sync_to_async(_load)(session_id))


def past_conversations(*, user_id: int, limit: int = 50) -> list[ChatSession]:
    """A person's sessions that have messages, newest first, each with its first message as a title.

    Sessions continued later are left out: their conversation is listed under its latest continuation.
    """
    sessions = list(
        ChatSession.objects.filter(user_id=user_id, messages__role=Role.USER)
        .exclude(continuations__isnull=False)
        .distinct()
        .order_by("-created_at")[:limit]
    )
    firsts = {}
    for m in ChatMessage.objects.filter(session__in=sessions, role=Role.USER).order_by("-created_at", "-id"):
        firsts[m.session_id] = m.content  # the earliest wins (iterating newest first)
    for s in sessions:
        text = " ".join(firsts.get(s.id, "").split())
        s.title = text if len(text) <= 80 else text[:77] + "…"
    return sessions
