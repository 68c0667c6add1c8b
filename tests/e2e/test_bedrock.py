"""Amazon Bedrock models over real sockets: a live Daphne whose real boto3 client talks to
testkit/fake_bedrock.py (Bedrock Runtime's wire format, dummy credentials, no AWS)."""

import asyncio
import time

import pytest

from chat.models import ChatMessage, MessageStatus
from testkit.client import ProtocolClient
from testkit.fake_bedrock import BedrockScript
from testkit.fake_llm import SECRET_DETAIL
from testkit.server import bedrock_env, free_port
from tests.e2e.test_upstream_faults import assert_clean_failure, turn_with_fault

pytestmark = pytest.mark.django_db(transaction=True)

NOVA = "amazon.nova-lite-v1:0"
CLAUDE = "anthropic.claude-3-5-haiku-20241022-v1:0"


def text_of(frames: list[dict]) -> str:
    [message] = [f["data"] for f in frames if f["type"] == "message"]
    return message


async def test_a_conversation_streamed_and_not(daphne_factory, fake_bedrock, fake_llm):
    """History and the system message reach Converse in its shape, consecutive user turns (left by a
    failed turn) merged; whole and streamed replies arrive as with any model; usage is recorded."""
    server = daphne_factory(R2D2_UPSTREAM_RETRIES="0", **bedrock_env(fake_bedrock, NOVA))
    client = await ProtocolClient.connect(server.url)
    session_id = await client.start_session(gpt_model=NOVA)

    first = await client.post(session_id, "hello", system_message="Be brief.")
    assert [f["type"] for f in first] == ["processing_start", "message", "processing_end"]
    assert text_of(first) == "Echo: hello"

    fake_bedrock.enqueue(BedrockScript(status=500))
    failed = await client.post(session_id, "this one fails")
    assert failed[-2]["data"]["code"] == "upstream_server_error"

    fake_bedrock.enqueue(BedrockScript(text="Streamed reply in pieces."))
    streamed = await client.post(session_id, "and now?", stream=True)
    deltas = [f["data"] for f in streamed if f["type"] == "message_delta"]
    assert len(deltas) == 4 and "".join(deltas) == text_of(streamed) == "Streamed reply in pieces."
    await client.close()

    assert [(r.model_id, r.stream) for r in fake_bedrock.requests] == [(NOVA, False), (NOVA, False), (NOVA, True)]
    assert fake_bedrock.requests[-1].body == {  # the model id travels in the path
        "system": [{"text": "Be brief."}],
        "messages": [
            {"role": "user", "content": [{"text": "hello"}]},
            {"role": "assistant", "content": [{"text": "Echo: hello"}]},
            {"role": "user", "content": [{"text": "this one fails"}, {"text": "and now?"}]},
        ],
    }
    assert fake_llm.requests == []
    replies = [m async for m in ChatMessage.objects.filter(session_id=session_id, role="assistant").order_by("id")]
    assert [(m.content, m.status) for m in replies] == [
        ("Echo: hello", MessageStatus.COMPLETE),
        ("Streamed reply in pieces.", MessageStatus.COMPLETE),
    ]
    assert all(m.prompt_tokens and m.completion_tokens for m in replies)


async def test_cancel_closes_the_bedrock_connection(daphne_factory, fake_bedrock):
    """chatbot_cancel mid-stream: the Bedrock server sees the connection close; the partial reply is kept."""
    server = daphne_factory(**bedrock_env(fake_bedrock, NOVA))
    fake_bedrock.enqueue(BedrockScript(text="w " * 100, token_delay=0.05))
    client = await ProtocolClient.connect(server.url)
    session_id = await client.start_session(gpt_model=NOVA)
    await client.send(
        {"action": "chatbot_post_message", "session_id": session_id, "user_message": "go on", "stream": True}
    )
    assert (await client.recv())["type"] == "processing_start"
    assert (await client.recv())["type"] == "message_delta"
    await client.send({"action": "chatbot_cancel", "session_id": session_id})
    rest = await client.until("processing_end")
    assert "error" not in [f["type"] for f in rest]
    assert fake_bedrock.wait_for(lambda s: s.disconnects == 1, timeout=2)
    assert fake_bedrock.completed == 0
    after = await client.post(session_id, "still there?")
    await client.close()
    assert text_of(after) == "Echo: still there?"
    reply = await ChatMessage.objects.filter(session_id=session_id, role="assistant").order_by("id").afirst()
    assert reply.status == MessageStatus.CANCELLED
    assert 0 < len(reply.content) < len("w " * 100)


async def test_closing_the_socket_closes_a_silent_bedrock_connection(daphne_factory, fake_bedrock):
    """The client leaves while the model is between two pieces: the connection closes at once,
    not when the next piece arrives (a closed socket would not wake the thread reading it)."""
    server = daphne_factory(**bedrock_env(fake_bedrock, NOVA))
    fake_bedrock.enqueue(BedrockScript(text="one two three", token_delay=10))
    client = await ProtocolClient.connect(server.url)
    session_id = await client.start_session(gpt_model=NOVA)
    await client.send(
        {"action": "chatbot_post_message", "session_id": session_id, "user_message": "go on", "stream": True}
    )
    await client.until("message_delta")
    await client.close()
    assert fake_bedrock.wait_for(lambda s: s.disconnects == 1, timeout=2)


FAULTS = [
    # (script, stream, code): HTTP errors in AWS's REST-JSON shape, then faults inside the event stream.
    (BedrockScript(status=429), False, "upstream_rate_limited"),
    (BedrockScript(status=429), True, "upstream_rate_limited"),
    (BedrockScript(status=403), False, "upstream_auth_failed"),
    (BedrockScript(status=403, error_type="UnrecognizedClientException"), True, "upstream_auth_failed"),
    (BedrockScript(status=400), True, "upstream_bad_request"),
    (BedrockScript(status=404), False, "upstream_bad_request"),
    (BedrockScript(status=500), True, "upstream_server_error"),
    (BedrockScript(status=503), False, "upstream_server_error"),
    (BedrockScript(status=429, error_type="ModelNotReadyException"), True, "upstream_server_error"),
    (BedrockScript(exception="throttlingException"), True, "upstream_rate_limited"),
    (BedrockScript(exception="modelStreamErrorException", exception_after=2), True, "upstream_stream_interrupted"),
    (BedrockScript(exception="internalServerException", exception_after=2), True, "upstream_stream_interrupted"),
    (BedrockScript(cut_after=2), True, "upstream_stream_interrupted"),
    (BedrockScript(cut_after=0), True, "upstream_stream_interrupted"),
    (BedrockScript(no_stop=True), True, "upstream_stream_interrupted"),
]


@pytest.mark.parametrize(
    ("script", "stream", "code"),
    FAULTS,
    ids=[
        "429",
        "429-stream",
        "403-access-denied",
        "unrecognized-client",
        "400-validation",
        "404-unknown-model",
        "500",
        "503",
        "model-not-ready",
        "throttling-event-first",
        "model-stream-error-midway",
        "internal-error-midway",
        "cut-midway",
        "cut-before-text",
        "no-message-stop",
    ],
)
async def test_bedrock_fault(daphne_factory, fake_bedrock, script, stream, code):
    """Each Bedrock failure is its own error code then processing_end; the next turn works;
    AWS's error text never reaches the client or the log."""
    server = daphne_factory(R2D2_UPSTREAM_RETRIES="0", **bedrock_env(fake_bedrock, NOVA))
    fake_bedrock.enqueue(script)
    client = await ProtocolClient.connect(server.url)
    session_id = await client.start_session(gpt_model=NOVA)
    frames = await client.post(session_id, "faulty turn", stream=stream)
    follow_up = await client.post(session_id, "next turn")
    await client.close()
    if script.exception_after or script.cut_after:
        assert "message_delta" in [f["type"] for f in frames]  # cut off after text was shown
    assert_clean_failure(frames, follow_up, code)
    assert text_of(follow_up) == "Echo: next turn"
    assert SECRET_DETAIL not in "".join(client.received) + server.log()


async def test_server_errors_are_retried(daphne_factory, fake_bedrock):
    """A 503 before any text is retried (boto3's own retries are off: R2D2's loop does it once)."""
    server = daphne_factory(R2D2_UPSTREAM_RETRIES="1", **bedrock_env(fake_bedrock, NOVA))
    fake_bedrock.enqueue(BedrockScript(status=503))
    client = await ProtocolClient.connect(server.url)
    frames = await client.post(await client.start_session(gpt_model=NOVA), "retry me", stream=True)
    await client.close()
    assert text_of(frames) == "Echo: retry me"
    assert len(fake_bedrock.requests) == 2


async def test_timeout(daphne_factory, fake_bedrock):
    """A Bedrock model that never answers is cut off at R2D2_UPSTREAM_TIMEOUT."""
    # 2 s, not 1: the follow-up turn must answer within it on a loaded 2-core machine running the suite in parallel.
    server = daphne_factory(R2D2_UPSTREAM_TIMEOUT="2", **bedrock_env(fake_bedrock, NOVA))
    fake_bedrock.enqueue(BedrockScript(stall=30))
    client = await ProtocolClient.connect(server.url)
    session_id = await client.start_session(gpt_model=NOVA)
    started = time.monotonic()
    frames = await client.post(session_id, "faulty turn", stream=True)
    assert time.monotonic() - started < 6
    follow_up = await client.post(session_id, "next turn")
    await client.close()
    assert_clean_failure(frames, follow_up, "upstream_timeout")


async def test_a_stream_that_outlasts_the_first_chunk_timeout_completes(daphne_factory, fake_bedrock):
    """As with OpenAI-compatible servers, R2D2_UPSTREAM_TIMEOUT bounds the wait for the first chunk
    only: a Bedrock stream of 3 s against a 1 s timeout is answered whole (boto3's read timeout
    does not cut it either)."""
    server = daphne_factory(R2D2_UPSTREAM_TIMEOUT="1", **bedrock_env(fake_bedrock, NOVA))
    text = "slow " * 30
    fake_bedrock.enqueue(BedrockScript(text=text, token_delay=0.1))
    client = await ProtocolClient.connect(server.url)
    session_id = await client.start_session(gpt_model=NOVA)
    started = time.monotonic()
    frames = await client.post(session_id, "take your time", stream=True)
    took = time.monotonic() - started
    await client.close()
    assert text_of(frames) == text
    assert took > 2.5


async def test_a_stalled_stream_ends_within_the_idle_timeout(daphne_factory, fake_bedrock):
    """A Bedrock stream that goes silent after a few deltas ends one R2D2_UPSTREAM_IDLE_TIMEOUT later
    with upstream_timeout; what it said is saved, marked interrupted; its connection is closed."""
    server = daphne_factory(R2D2_UPSTREAM_IDLE_TIMEOUT="1", **bedrock_env(fake_bedrock, NOVA))
    script = BedrockScript(text="one two three four", stall_after=2, stall_for=30)
    frames, follow_up, session_id, _, took = await turn_with_fault(server.url, fake_bedrock, script, gpt_model=NOVA)
    assert_clean_failure(frames, follow_up, "upstream_timeout")
    assert "".join(f["data"] for f in frames if f["type"] == "message_delta") == "one two "
    assert took < 4, took
    reply = await ChatMessage.objects.filter(session_id=session_id, role="assistant").order_by("id").afirst()
    assert (reply.content, reply.status) == ("one two ", MessageStatus.INTERRUPTED)
    assert fake_bedrock.wait_for(lambda s: s.disconnects == 1, timeout=2)


async def test_unreachable_and_uncredentialed(daphne_factory, fake_bedrock):
    """No Bedrock endpoint listening: upstream_unavailable. No credentials at all: upstream_auth_failed,
    and the log says what to fix."""
    down = daphne_factory(
        R2D2_UPSTREAM_RETRIES="0",
        **{**bedrock_env(fake_bedrock, NOVA), "R2D2_BEDROCK_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"},
    )
    env = bedrock_env(fake_bedrock, NOVA)
    del env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]
    env.update(AWS_SHARED_CREDENTIALS_FILE="/nonexistent", AWS_CONFIG_FILE="/nonexistent")
    unsigned = daphne_factory(R2D2_UPSTREAM_RETRIES="0", **env)
    for server, code in ((down, "upstream_unavailable"), (unsigned, "upstream_auth_failed")):
        client = await ProtocolClient.connect(server.url)
        frames = await client.post(await client.start_session(gpt_model=NOVA), "anyone?")
        await client.close()
        assert [f["type"] for f in frames] == ["processing_start", "error", "processing_end"]
        assert frames[1]["data"]["code"] == code
    assert fake_bedrock.requests == []
    assert "no AWS credentials" in unsigned.log()


async def test_bedrock_and_openai_sessions_at_once(daphne_factory, fake_bedrock, fake_llm):
    """One server, two providers: a Bedrock session and an OpenAI-compatible one generate at the
    same time, each reaching its own model server."""
    server = daphne_factory(**bedrock_env(fake_bedrock, CLAUDE))
    clients = [await ProtocolClient.connect(server.url) for _ in range(2)]
    sessions = [
        await clients[0].start_session(gpt_model=f"bedrock/{NOVA}"),
        await clients[1].start_session(gpt_model="gpt-4o-mini"),
    ]
    turns = await asyncio.gather(
        *(
            c.post(s, "[[ttft=1.0 token_delay=0.05]] slow and steady", stream=True)
            for c, s in zip(clients, sessions, strict=True)
        )
    )
    for c in clients:
        await c.close()
    assert [text_of(t) for t in turns] == ["Echo: slow and steady"] * 2
    # Each call was made while the other waited its 1 s for a first token (the models' clocks, not wall time).
    gap = abs(fake_bedrock.requests[0].time - fake_llm.requests[0].time)
    assert gap < 1.0, f"the two turns ran one after the other (their model calls {gap:.2f}s apart)"
    assert [r.model_id for r in fake_bedrock.requests] == [NOVA]
    assert [r.body["model"] for r in fake_llm.requests] == ["gpt-4o-mini"]
