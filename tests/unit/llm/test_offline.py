"""chat/llm/offline.py: with no model configured, the responder shows that memory works."""

from chat.llm.offline import NOTICE, answer


def test_first_message():
    text = answer([{"role": "user", "content": "Hello"}])
    assert text.startswith(NOTICE)
    assert "You said: Hello" in text and "first message" in text


def test_it_counts_and_quotes_what_it_was_given():
    text = answer(
        [
            {"role": "system", "content": "Be nice."},
            {"role": "user", "content": "My name is Ada."},
            {"role": "assistant", "content": "Hi Ada."},
            {"role": "user", "content": "What is my name?"},
        ]
    )
    assert "You said: What is my name?" in text
    assert 'I was given 2 earlier messages; before this you said: "My name is Ada."' in text


def test_a_message_without_a_full_stop_does_not_run_into_the_next_sentence():
    """A newcomer's first "Hello" read "You said: Hello This is the first message ..."."""
    assert "You said: Hello. This is the first message" in answer([{"role": "user", "content": "Hello"}])
    assert "You said: Hello there! This is" in answer([{"role": "user", "content": "Hello there!"}])
    assert 'You said: He wrote "hi." This is' in answer([{"role": "user", "content": 'He wrote "hi."'}])
    trailing_space = answer([{"role": "user", "content": "Two lines\nand a space \n"}])
    assert "You said: Two lines\nand a space. This is" in trailing_space
