"""chat/turns/tree.py: the leaf, the path to a message, what the model is sent of it, and what a message_id may name."""

from __future__ import annotations

import pytest

from chat.protocol.errors import ClientError, ErrorCode
from chat.turns import tree
from chat.turns.tree import Node


def user(id: int, parent: int | None, text: str = "", status: str = "started") -> Node:
    return Node(id, parent, "user", text or f"u{id}", status)


def reply(id: int, parent: int, text: str = "", status: str = "complete") -> Node:
    return Node(id, parent, "assistant", text or f"r{id}", status)


#: one → R2 → two → {R4, R5 (regenerated)}; one-edited (6) → R7; 8 still waiting (no parent yet).
NODES = tree.index(
    [
        Node(0, None, "system", "be brief", "complete"),
        user(1, None),
        reply(2, 1),
        user(3, 2),
        reply(4, 3),
        reply(5, 3),
        user(6, None),
        reply(7, 6),
        user(8, None, status="accepted"),
    ]
)


def test_system_messages_are_not_in_the_tree():
    assert 0 not in NODES


def test_the_leaf_is_the_newest_placed_message_below_the_anchor():
    assert tree.leaf(NODES, None) == 7  # no anchor: the newest placed message (8 waits)
    assert tree.leaf(NODES, 1) == 5
    assert tree.leaf(NODES, 4) == 4
    assert tree.leaf(NODES, 6) == 7
    assert tree.leaf({}, None) is None
    assert tree.leaf(NODES, 999) == 7  # an anchor that is not there counts as none


def test_the_path_runs_from_the_root_to_the_message_and_never_into_a_sibling():
    assert [n.id for n in tree.path(NODES, 5)] == [1, 2, 3, 5]
    assert [n.id for n in tree.path(NODES, 7)] == [6, 7]
    assert tree.path(NODES, None) == []


def test_what_the_model_remembers_of_a_path():
    chain = [
        user(1, None, "q"),
        Node(2, 1, "assistant", "", "failed"),
        user(3, 2, "again"),
        reply(4, 3, "half", "cancelled"),
    ]
    chain.append(reply(5, 3, "streaming", "incomplete"))
    assert tree.remembered(chain) == [("user", "q"), ("user", "again"), ("assistant", "half")]


def test_versions_and_branched_messages():
    assert tree.versions(NODES, 4) == [4, 5]
    assert tree.versions(NODES, 1) == [1, 6]  # two first messages: the original and its edit
    assert tree.branched(NODES) == {1, 6, 4, 5}


def test_what_a_regeneration_answers_again():
    assert tree.answering(NODES, 5, 4).id == 3  # a named reply: its user message
    assert tree.answering(NODES, 5, None).id == 3  # none: the leaf's reply
    failed = {**NODES, 9: user(9, 7, status="failed")}
    assert tree.answering(failed, 9, None).id == 9  # the leaf is a message left unanswered: that one
    for nodes, leaf, message_id, code in [
        (NODES, 5, 3, ErrorCode.WRONG_MESSAGE_ROLE),
        (NODES, 5, 999, ErrorCode.MESSAGE_NOT_FOUND),
        (NODES, 5, 8, ErrorCode.MESSAGE_NOT_FOUND),  # still waiting: on no branch yet
        ({}, None, None, ErrorCode.MESSAGE_NOT_FOUND),
    ]:
        with pytest.raises(ClientError) as refused:
            tree.answering(nodes, leaf, message_id)
        assert refused.value.code == code


def test_what_an_edit_may_name():
    assert tree.edited(NODES, 3).parent_id == 2
    with pytest.raises(ClientError) as refused:
        tree.edited(NODES, 4)
    assert refused.value.code == ErrorCode.WRONG_MESSAGE_ROLE
