"""A session's messages as a tree (issue 29): pure functions, no I/O.

Every message has a parent: a user message's is the reply (or unanswered message) before it, a reply's is
its user message; the first message of a session has none. Regenerating a reply adds a sibling reply,
editing a message adds a sibling user message: the earlier versions stay as branches.

The session's current leaf is not written at every turn (that would be a second statement on the hot path,
bench/throughput.py): the session keeps an *anchor* (`ChatSession.branch_anchor`, moved only by a regenerate,
an edit or a switch), and its leaf is the newest placed message descending from the anchor (itself included;
with no anchor, the newest placed message). A post continues from the leaf, so its messages descend from the
anchor and become the leaf without writing it.

A message is *placed* once its turn started: a message still waiting (`accepted`) has no parent yet (a post's
parent is the leaf when its turn starts, not when it was sent) and is on no branch.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from chat.models import MessageStatus, Role
from chat.protocol.errors import ClientError, ErrorCode


@dataclass(slots=True)
class Node:
    """One message of the tree, as a turn needs it."""

    id: int
    parent_id: int | None
    role: str
    content: str
    status: str

    @property
    def placed(self) -> bool:
        return self.status != MessageStatus.ACCEPTED and self.role != Role.SYSTEM


Nodes = Mapping[int, Node]


def index(nodes: Iterable[Node]) -> dict[int, Node]:
    """Nodes by id (system messages are not part of the tree). Messages saved with no parent at all (written by
    hand, or by code that predates the tree) read as one straight branch, in the order they were saved."""
    indexed = {node.id: node for node in nodes if node.role != Role.SYSTEM}
    placed = sorted(node.id for node in indexed.values() if node.placed)
    if len(placed) > 1 and all(node.parent_id is None for node in indexed.values()):
        for parent, child in zip(placed, placed[1:], strict=False):
            indexed[child].parent_id = parent
    return indexed


def leaf(nodes: Nodes, anchor: int | None) -> int | None:
    """The newest placed message descending from `anchor` (itself included); None when there is none.

    An anchor no longer among the nodes (never: rows are not deleted while a session lives) counts as none."""
    if anchor is None or anchor not in nodes:
        placed = [node.id for node in nodes.values() if node.placed]
        return max(placed) if placed else None
    children: dict[int, list[int]] = {}
    for node in nodes.values():
        if node.placed and node.parent_id is not None:
            children.setdefault(node.parent_id, []).append(node.id)
    newest, below = anchor, [anchor]
    while below:  # one walk down from the anchor: O(messages)
        for child in children.get(below.pop(), ()):
            newest = max(newest, child)
            below.append(child)
    return newest


def descends(nodes: Nodes, message_id: int, ancestor: int) -> bool:
    """Whether `message_id` is `ancestor` or below it."""
    seen = 0
    current: int | None = message_id
    while current is not None and seen <= len(nodes):
        if current == ancestor:
            return True
        node = nodes.get(current)
        current = node.parent_id if node is not None else None
        seen += 1  # a cycle cannot be written, but a loop must still end
    return False


def path(nodes: Nodes, message_id: int | None) -> list[Node]:
    """The messages from the root down to `message_id` (included); empty for None."""
    chain: list[Node] = []
    current = message_id
    while current is not None and len(chain) <= len(nodes):
        node = nodes.get(current)
        if node is None:
            break
        chain.append(node)
        current = node.parent_id
    return chain[::-1]


def remembered(chain: Iterable[Node]) -> list[tuple[str, str]]:
    """A path as the model is sent it (chat/turns/prompt.py's history): every user message, and every reply
    that said something and is not still streaming (a stopped one as far as it got)."""
    return [
        (node.role, node.content)
        for node in chain
        if node.role == Role.USER or (node.content and node.status not in {MessageStatus.INCOMPLETE})
    ]


def versions(nodes: Nodes, message_id: int) -> list[int]:
    """The message and its siblings of the same role (its versions), oldest first: what ‹ 2/3 › moves between."""
    node = nodes[message_id]
    return sorted(
        other.id
        for other in nodes.values()
        if other.parent_id == node.parent_id and other.role == node.role and other.placed
    )


def branched(nodes: Nodes) -> set[int]:
    """The placed messages that have other versions (a transcript marks them)."""
    groups: dict[tuple[int | None, str], list[int]] = {}
    for node in nodes.values():
        if node.placed:
            groups.setdefault((node.parent_id, node.role), []).append(node.id)
    return {message_id for ids in groups.values() if len(ids) > 1 for message_id in ids}


# What a client's message_id may name ------------------------------------------------


def placed(nodes: Nodes, message_id: int) -> Node:
    """The placed message `message_id`, or ClientError(message_not_found)."""
    node = nodes.get(message_id)
    if node is None or not node.placed:
        raise ClientError(ErrorCode.MESSAGE_NOT_FOUND, f"This session has no message {message_id} to act on.")
    return node


def answering(nodes: Nodes, leaf_id: int | None, message_id: int | None) -> Node:
    """The user message a regeneration answers again: the one the reply `message_id` answers; without it, the
    leaf's, or the leaf itself when it is a user message left unanswered (a failed or interrupted turn)."""
    if message_id is None:
        leaf_node = nodes.get(leaf_id) if leaf_id is not None else None
        if leaf_node is None:
            raise ClientError(ErrorCode.MESSAGE_NOT_FOUND, "This session has no reply to regenerate yet.")
        if leaf_node.role == Role.USER:
            return leaf_node
        message_id = leaf_node.id
    reply = placed(nodes, message_id)
    if reply.role != Role.ASSISTANT or reply.parent_id not in nodes:
        raise ClientError(ErrorCode.WRONG_MESSAGE_ROLE, "Only a reply can be regenerated; that is a user message.")
    return nodes[reply.parent_id]


def edited(nodes: Nodes, message_id: int) -> Node:
    """The user message an edit makes a new version of."""
    node = placed(nodes, message_id)
    if node.role != Role.USER:
        raise ClientError(ErrorCode.WRONG_MESSAGE_ROLE, "Only a user message can be edited; that is a reply.")
    return node
