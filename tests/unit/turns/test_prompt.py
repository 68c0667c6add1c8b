"""chat/turns/prompt.py: what the model is sent, trimmed a whole turn at a time."""

from chat.turns.prompt import assemble_messages


def test_everything_fits():
    history = [("user", "hi"), ("assistant", "hello"), ("user", "how?"), ("assistant", "so")]
    messages = assemble_messages(system_message="Be brief.", history=history, user_message="next", budget_chars=1000)
    assert messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "how?"},
        {"role": "assistant", "content": "so"},
        {"role": "user", "content": "next"},
    ]


def test_oldest_whole_turns_are_dropped_never_half_a_turn():
    """A budget that would fit the old reply but not its question drops both: the history never
    starts with an answer to a question the model cannot see."""
    history = [("user", "q" * 50), ("assistant", "a" * 10), ("user", "q2"), ("assistant", "a2")]
    messages = assemble_messages(system_message="", history=history, user_message="new", budget_chars=30)
    assert [m["content"] for m in messages] == ["q2", "a2", "new"]
    assert messages[0]["role"] == "user"


def test_a_failed_turn_without_reply_is_a_turn_of_its_own():
    history = [("user", "lost"), ("user", "q"), ("assistant", "a")]
    messages = assemble_messages(system_message="", history=history, user_message="n", budget_chars=3)
    assert [m["content"] for m in messages] == ["q", "a", "n"]
    messages = assemble_messages(system_message="", history=history, user_message="n", budget_chars=100)
    assert [m["content"] for m in messages] == ["lost", "q", "a", "n"]


def test_system_and_new_message_are_always_sent():
    messages = assemble_messages(
        system_message="s" * 10, history=[("user", "old"), ("assistant", "x")], user_message="n" * 10, budget_chars=5
    )
    assert [m["role"] for m in messages] == ["system", "user"]
