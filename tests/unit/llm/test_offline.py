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
