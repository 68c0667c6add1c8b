"""What the model is sent: pure functions, no I/O."""

from __future__ import annotations

from collections.abc import Sequence

from chat.models import Role


def assemble_messages(
    *,
    system_message: str,
    history: Sequence[tuple[str, str]],
    user_message: str,
    budget_chars: int,
) -> list[dict[str, str]]:
    """The request's messages: system, then as many recent turns as fit, then the new message.

    History is dropped a whole turn at a time (a user message with its reply), oldest
    first, so the total content stays within `budget_chars` and the history never
    starts with a reply whose question was left out. The system message and the
    new message are always sent.
    """
    remaining = budget_chars - len(system_message) - len(user_message)
    kept: list[list[tuple[str, str]]] = []
    for turn in reversed(_turns(history)):
        remaining -= sum(len(content) for _, content in turn)
        if remaining < 0:
            break
        kept.append(turn)
    messages = [{"role": Role.SYSTEM.value, "content": system_message}] if system_message else []
    for turn in reversed(kept):
        messages.extend({"role": role, "content": content} for role, content in turn)
    messages.append({"role": Role.USER.value, "content": user_message})
    return messages


def _turns(history: Sequence[tuple[str, str]]) -> list[list[tuple[str, str]]]:
    """History split into turns, each starting at a user message (a failed turn has no reply)."""
    turns: list[list[tuple[str, str]]] = []
    for role, content in history:
        if role == Role.USER or not turns:
            turns.append([])
        turns[-1].append((role, content))
    return turns
