"""`manage.py chat`, run as a subprocess against a live Daphne and the local model server."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from chat.models import ChatMessage, ChatSession, EndReason, MessageStatus, Role
from testkit.drops import PostDroppingProxy, error_codes, restarting
from testkit.fake_llm import SECRET_DETAIL, Script
from testkit.server import ROOT, bedrock_env, server_env
from testkit.wait import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]


def chat_command(url: str, *args: str) -> list[str]:
    return [sys.executable, "manage.py", "chat", "--url", url, *args]


def run_chat(url: str, stdin: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        chat_command(url, *args),
        input=stdin,
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=server_env(None),
        timeout=60,
    )


def test_piped_input_gets_one_reply_per_line(daphne, fake_llm):
    """Each line is a message; replies come out on stdout in order; the session ends at end of input."""
    result = run_chat(daphne.url, "hello\n\nsecond line\n", "--model", "gpt-4o-mini", "--system", "Be terse.")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "Echo: hello\nEcho: second line\n"
    assert "Session ended." in result.stderr

    assert [r.body["stream"] for r in fake_llm.requests] == [True, True]
    assert fake_llm.requests[0].body["model"] == "gpt-4o-mini"
    assert fake_llm.requests[0].messages[0] == {"role": "system", "content": "Be terse."}
    assert fake_llm.requests[1].messages[-1] == {"role": "user", "content": "second line"}
    session = ChatSession.objects.get()
    assert session.model == "gpt-4o-mini" and session.end_reason == EndReason.CLIENT


def test_regenerate_edit_and_history_from_the_terminal(daphne, fake_llm):
    """/regenerate asks for another version of the last reply, /edit sends a new version of the last message (its
    path is only what came before it), /history prints the current branch with [n/m] where versions exist."""
    fake_llm.enqueue(Script(text="A1"), Script(text="B1"), Script(text="B2"), Script(text="C1"))
    result = run_chat(daphne.url, "first\nsecond\n/regenerate\n/edit second, edited\n/history\n")
    assert result.returncode == 0, result.stderr
    assert [[m["content"] for m in r.messages] for r in fake_llm.requests] == [
        ["first"],
        ["first", "A1", "second"],
        ["first", "A1", "second"],
        ["first", "A1", "second, edited"],
    ]
    replies, history = result.stdout.split("\n")[:4], result.stdout.split("\n")[4:-1]
    assert replies == ["A1", "B1", "B2", "C1"]
    assert [line.split(" ", 1)[1] for line in history] == [
        "you> first",
        "r2d2> A1",
        "[2/2] you> second, edited",
        "r2d2> C1",
    ]


def test_no_stream_and_errors_reported_without_stopping(daphne, fake_llm):
    """With --no-stream the server answers whole; an upstream error goes to stderr and the next line still runs."""
    fake_llm.enqueue(Script(status=401), Script(text="Still here."))
    result = run_chat(daphne.url, "first\nsecond\n", "--no-stream")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "Still here.\n"
    assert "error [upstream_auth_failed]: The server's model credentials were refused." in result.stderr
    assert SECRET_DETAIL not in result.stderr + result.stdout
    assert [r.body.get("stream", False) for r in fake_llm.requests] == [False, False]


def test_ctrl_c_stops_the_reply_being_generated(daphne, fake_llm):
    """SIGINT mid-reply sends chatbot_cancel: the model call is dropped and the partial reply kept as cancelled."""
    story = " ".join(f"word{n}" for n in range(200))
    fake_llm.enqueue(Script(text=story, token_delay=0.05))
    process = subprocess.Popen(
        chat_command(daphne.url),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
        env=server_env(None),
    )
    output = bytearray()

    def read_stdout() -> None:
        while chunk := os.read(process.stdout.fileno(), 4096):
            output.extend(chunk)

    reader = threading.Thread(target=read_stdout, daemon=True)
    reader.start()
    process.stdin.write(b"tell me a long story\n")
    process.stdin.flush()
    assert wait_until(lambda: b"word3 " in output, timeout=20, interval=0.02), output
    process.send_signal(signal.SIGINT)
    assert fake_llm.wait_for(lambda f: f.disconnects == 1, timeout=10)

    process.stdin.write(b"and now?\n")
    process.stdin.close()
    assert process.wait(30) == 0
    reader.join(5)
    stderr = process.stderr.read().decode()
    assert "[stopped]" in stderr
    printed = output.decode().split("\n")
    assert story.startswith(printed[0]) and len(printed[0]) < len(story)
    assert printed[1:] == ["Echo: and now?", ""]

    partial = ChatMessage.objects.filter(role=Role.ASSISTANT).first()
    assert partial.status == MessageStatus.CANCELLED and story.startswith(partial.content)
    assert ChatSession.objects.get().end_reason == EndReason.CLIENT


def test_unreachable_server_is_a_clear_error(tmp_path):
    """No server at the URL: a one-line error and a non-zero exit, not a traceback."""
    result = run_chat("ws://127.0.0.1:9/", "hello\n")
    assert result.returncode != 0
    assert "Could not talk to ws://127.0.0.1:9/" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_refused_session_start_exits_with_the_reason(daphne_factory):
    """A model the server does not allow: the server's sentence on stderr and a non-zero exit."""
    server = daphne_factory(R2D2_ALLOWED_MODELS="gpt-4o-mini")
    result = run_chat(server.url, "hello\n", "--model", "gpt-banned")
    assert result.returncode == 1
    assert "error [model_not_allowed]: Model not allowed here; choose one of: gpt-4o-mini." in result.stderr
    assert result.stdout == ""
    assert not ChatSession.objects.exists()


def test_the_bedrock_setup_check_from_the_readme(daphne_factory, fake_bedrock):
    """What docs/bedrock.md has an operator run after `eb deploy`: list the models, then one piped
    message to a Bedrock model (here answered by the local Bedrock fake through the real boto3)."""
    server = daphne_factory(**bedrock_env(fake_bedrock, "amazon.nova-lite-v1:0"))
    listed = run_chat(server.url, "", "--list-models")
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout == "gpt-3.5-turbo\topenai\namazon.nova-lite-v1:0\tbedrock\n"
    result = run_chat(server.url, "ping\n", "--model", "bedrock/amazon.nova-lite-v1:0")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "Echo: ping\n"
    assert [r.model_id for r in fake_bedrock.requests] == ["amazon.nova-lite-v1:0"]


class CuttableProxy:
    """A TCP proxy in front of the server whose live connections the test can cut (a network drop),
    while it keeps accepting new ones."""

    def __init__(self, target_port: int) -> None:
        import socket as socket_module

        self.target_port = target_port
        self.listener = socket_module.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen()
        self.port = self.listener.getsockname()[1]
        self.pairs: list[tuple] = []
        self.accepted = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket as socket_module

        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket_module.create_connection(("127.0.0.1", self.target_port))
            self.pairs.append((client, upstream))
            self.accepted += 1
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source, sink) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        for sock in (source, sink):
            try:
                sock.close()
            except OSError:
                pass

    def cut(self) -> None:
        import socket as socket_module

        for pair in self.pairs:
            for sock in pair:
                try:
                    sock.shutdown(socket_module.SHUT_RDWR)
                except OSError:
                    pass
        self.pairs.clear()


def test_a_dropped_connection_is_resumed_with_nothing_lost_or_repeated(daphne, fake_llm):
    """The network drops mid-reply: the client reconnects, resumes the session, and prints the reply exactly
    once, whole; the next line is answered in the same session."""
    words = [f"w{i} " for i in range(30)]
    fake_llm.enqueue(Script(chunks=words, token_delay=0.1))
    proxy = CuttableProxy(daphne.port)
    process = subprocess.Popen(
        chat_command(f"ws://127.0.0.1:{proxy.port}/"),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=server_env(None),
    )
    process.stdin.write("tell me\n")
    process.stdin.flush()
    # The client takes seconds to start on a busy machine: count from the model's request.
    assert fake_llm.wait_for(lambda f: len(f.requests) == 1, timeout=30)
    # The behaviour under test is a cut mid-reply, then a line typed while the resumed reply goes on:
    # 30 words at 0.1 s, cut after about a third, the next line typed once it has resumed.
    time.sleep(1.0)  # a third of the reply has streamed
    proxy.cut()
    time.sleep(2.5)  # resumed meanwhile; the reply goes on
    stdout, stderr = process.communicate("and then?\n", timeout=60)
    assert process.returncode == 0, stderr
    assert stdout == "".join(words) + "\nEcho: and then?\n"
    assert "[resumed]" in stderr and proxy.accepted == 2
    session = ChatSession.objects.get()
    assert session.end_reason == EndReason.CLIENT
    assert list(ChatMessage.objects.filter(role=Role.ASSISTANT).values_list("content", flat=True)) == [
        "".join(words),
        "Echo: and then?",
    ]


class RunningChat:
    """`manage.py chat` running with piped input, its stdout collected as it comes."""

    def __init__(self, url: str, *args: str) -> None:
        self.process = subprocess.Popen(
            chat_command(url, *args),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=ROOT,
            env=server_env(None),
        )
        self.output = bytearray()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        while chunk := os.read(self.process.stdout.fileno(), 4096):
            self.output.extend(chunk)

    def say(self, line: str) -> None:
        self.process.stdin.write(line.encode() + b"\n")
        self.process.stdin.flush()

    def wait_for_output(self, text: str, timeout: float = 20) -> None:
        assert wait_until(lambda: text.encode() in self.output, timeout), self.output

    def finish(self) -> tuple[str, str]:
        """End of input: the exit status must be 0; stdout and stderr."""
        self.process.stdin.close()
        assert self.process.wait(30) == 0
        self.reader.join(5)
        return self.output.decode(), self.process.stderr.read().decode()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()


@pytest.mark.parametrize("delivered", [True, False], ids=["reached-the-server", "lost-on-the-way"])
def test_a_message_sent_as_the_connection_drops_is_answered_once(daphne, fake_llm, delivered):
    """Every message carries a fresh client_message_id. The connection drops right as one is sent, before
    its processing_start arrives (the server got it, or it was lost on the way): the client reconnects,
    resumes, sends it again with the same id, and prints exactly one answer and no error; the server saved
    it once and asked the model once."""
    proxy = PostDroppingProxy(daphne.port)
    chat = RunningChat(f"ws://127.0.0.1:{proxy.port}/", "--system", "Be terse.")
    try:
        chat.say("first")
        chat.wait_for_output("Echo: first\n")
        proxy.drop_at_next_post(deliver=delivered)
        chat.say("are you still there?")
        assert proxy.dropped.wait(10)
        if delivered:  # the server has the message before the client can resume and send it again
            assert wait_until(lambda: ChatMessage.objects.filter(content="are you still there?").exists(), timeout=10)
        proxy.let_reconnect()
        chat.wait_for_output("Echo: are you still there?\n")
        chat.say("and now?")
        stdout, stderr = chat.finish()
    finally:
        chat.kill()
        proxy.close()
    assert stdout == "Echo: first\nEcho: are you still there?\nEcho: and now?\n"
    assert "[resumed]" in stderr and "error" not in stderr, stderr

    # What the client sent on the new connection: the resume, then the message again (the same frame).
    resumed = proxy.websockets[-1]
    assert [m["action"] for m in resumed.sent][:1] == ["chatbot_session_resume"]
    posts = [m for m in resumed.sent if m["action"] == "chatbot_post_message"]
    assert posts[0] == proxy.dropped_post and [p["user_message"] for p in posts] == ["are you still there?", "and now?"]
    assert error_codes(resumed.received) == (["duplicate_message"] if delivered else [])

    rows = list(ChatMessage.objects.filter(role=Role.USER).order_by("id").values_list("content", "client_message_id"))
    assert [content for content, _ in rows] == ["first", "are you still there?", "and now?"]
    ids = [cid for _, cid in rows]
    assert all(ids) and len(set(ids)) == 3, ids
    assert ids[1] == proxy.dropped_post["client_message_id"]
    assert [r.messages[-1]["content"] for r in fake_llm.requests] == ["first", "are you still there?", "and now?"]


@pytest.mark.redis
def test_a_message_refused_by_a_restarting_server_is_answered_after_the_resume(daphne, fake_llm):
    """A deploy: the server is draining when a message arrives, and refuses it with server_draining.
    The client keeps it, resumes on the restarted server (the frames are kept in Redis), sends it
    again, and prints its one answer."""
    proxy = PostDroppingProxy(daphne.port)  # not armed: it only shows what passes
    chat = RunningChat(f"ws://127.0.0.1:{proxy.port}/")
    try:
        chat.say("first")
        chat.wait_for_output("Echo: first\n")
        with restarting(daphne):
            chat.say("are you there?")
            frames = proxy.websockets[0].received
            assert wait_until(lambda: "server_draining" in error_codes(frames), timeout=5), frames
        chat.wait_for_output("Echo: are you there?\n", timeout=60)
        stdout, stderr = chat.finish()
    finally:
        chat.kill()
        proxy.close()
    assert stdout == "Echo: first\nEcho: are you there?\n"
    assert "[the server is restarting; the message will be sent again once resumed]" in stderr, stderr
    assert "[resumed]" in stderr and "error [" not in stderr, stderr
    session = ChatSession.objects.get(messages__content="first")
    rows = list(session.messages.filter(role=Role.USER).order_by("id").values_list("content", "client_message_id"))
    assert [content for content, _ in rows] == ["first", "are you there?"] and all(cid for _, cid in rows)
    assert [r.messages[-1]["content"] for r in fake_llm.requests].count("are you there?") == 1
