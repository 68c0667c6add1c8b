"""`manage.py chat`: a terminal client for any R2D2 server, over the same WebSocket protocol as every client.

Interactive: a prompt, the reply printed as it streams in, Ctrl-C stops the reply
being generated, Ctrl-D ends the session and exits. The session is resumable: if the
connection drops (a network change, a server restart or deploy) the client reconnects
with backoff and resumes it, printing nothing twice and missing nothing (a message sent as it
dropped is sent again, with the same client_message_id, so it is answered once). Piped: one message per line,
each reply waited for, the session ended at end of input; replies go to stdout,
everything else (banner, errors, notices) to stderr, so scripts read only answers.
`--list-models` prints the models the server offers (id, tab, provider) and exits;
`--usage` prints the server's `usage` frame (what this key or connection used, against
its limits) and exits. `--follow <session_id>` watches a running session of the same
principal (another device's): its replies are printed as they are written, until the
session ends or Ctrl-C. In the conversation, `/regenerate` asks for another
version of the last reply, `/edit <text>` sends a new version of the last message, and `/history` prints the
current branch (each message with its id, and `[2/3]` where it has other versions).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import threading
import uuid
from typing import Any

import websockets
from django.core.management.base import BaseCommand, CommandError

_EOF = None
#: Refused for good: reconnecting would be refused again (4401 unauthorized, 4429 too many connections).
UNRESUMABLE_CLOSE_CODES = {4401, 4429}
#: About a minute of attempts (0.25 s doubling to 8 s), enough for a server restart or a deploy.
RESUME_ATTEMPTS = 10


class Command(BaseCommand):
    help = "Chat with an R2D2 server from the terminal (Ctrl-C stops a reply, Ctrl-D ends the session)."
    requires_system_checks: list[str] = []

    def add_arguments(self, parser) -> None:
        parser.add_argument("--url", default="ws://127.0.0.1:8000/", help="the server's WebSocket URL")
        parser.add_argument("--model", default=None, help="model name (default: the server's default)")
        parser.add_argument("--system", default=None, help="system message for the session")
        parser.add_argument("--no-stream", action="store_true", help="wait for each whole reply instead of streaming")
        parser.add_argument(
            "--list-models", action="store_true", help="print the models the server offers (id, provider) and exit"
        )
        parser.add_argument(
            "--usage", action="store_true", help="print the server's usage frame (use against limits) and exit"
        )
        parser.add_argument(
            "--follow", metavar="SESSION_ID", default=None, help="print a running session's replies as they are written"
        )
        parser.add_argument(
            "--api-key",
            default=os.environ.get("R2D2_API_KEY") or None,
            help="API key sent as 'Authorization: Bearer <key>' (default: $R2D2_API_KEY)",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        if options["follow"]:
            try:
                code = asyncio.run(follow(options["url"], options["api_key"], options["follow"]))
            except (OSError, websockets.InvalidURI, websockets.InvalidHandshake) as exc:
                raise CommandError(f"Could not talk to {options['url']}: {exc}") from None
            except KeyboardInterrupt:
                code = 0
            if code:
                sys.exit(code)
            return
        if options["usage"]:
            try:
                print(asyncio.run(usage_frame(options["url"], options["api_key"])))
            except (OSError, websockets.InvalidURI, websockets.InvalidHandshake, TimeoutError) as exc:
                raise CommandError(f"Could not talk to {options['url']}: {exc}") from None
            return
        if options["list_models"]:
            try:
                models = asyncio.run(list_models(options["url"], options["api_key"]))
            except (OSError, websockets.InvalidURI, websockets.InvalidHandshake, TimeoutError) as exc:
                raise CommandError(f"Could not talk to {options['url']}: {exc}") from None
            for model in models:
                print(f"{model['id']}\t{model['provider']}")
            return
        client = TerminalChat(
            url=options["url"],
            model=options["model"],
            system=options["system"],
            stream=not options["no_stream"],
            api_key=options["api_key"],
        )
        try:
            code = asyncio.run(client.run())
        except (OSError, websockets.InvalidURI, websockets.InvalidHandshake) as exc:
            raise CommandError(f"Could not talk to {options['url']}: {exc}") from None
        if code:
            sys.exit(code)


class TerminalChat:
    """One session, one line at a time; a reader task prints frames as they arrive."""

    def __init__(
        self, *, url: str, model: str | None, system: str | None, stream: bool, api_key: str | None = None
    ) -> None:
        self.url, self.model, self.system, self.stream = url, model, system, stream
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
        self.interactive = sys.stdin.isatty()
        self.session_id: str | None = None
        self.started = asyncio.Event()
        self.ended = asyncio.Event()  # the session is over (by us or by the server) or the socket closed
        self.turn_done = asyncio.Event()
        self.in_turn = False  # between processing_start and processing_end
        self.awaiting = False  # a message was sent and its turn has not finished
        self.streamed = False
        self.stopping = False
        self.lost = False
        self.resume_token: str | None = None
        self.last_seq = 0  # the last frame of the session shown: a resume asks for what follows
        # Messages sent whose processing_start has not arrived: perhaps never received if the connection
        # dropped, so each is sent again, with the same client_message_id, after a resume (answered once).
        self.unstarted: list[dict[str, Any]] = []
        self.connected = asyncio.Event()
        self.last_user_id: int | None = None  # the message the last turn answered (its frames carry ids)

    async def run(self) -> int:
        self.ws = await self.open()
        try:
            return await self.converse()
        finally:
            await self.ws.close()

    async def open(self) -> websockets.ClientConnection:
        ws = await websockets.connect(self.url, max_size=None, additional_headers=self.headers)
        self.connected.set()
        return ws

    async def converse(self) -> int:
        reader = asyncio.create_task(self.read_frames())
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGINT, self.interrupt)
        start: dict[str, Any] = {"action": "chatbot_session_start", "resumable": True}
        if self.model:
            start["gpt_model"] = self.model
        await self.send(start)
        await _first(self.started.wait(), self.ended.wait())
        if self.session_id is None:
            reader.cancel()
            return 1
        self.note(
            f"Session {self.session_id} on {self.url}. "
            + ("Ctrl-C stops a reply, Ctrl-D ends the session." if self.interactive else "")
        )
        lines = _stdin_lines(loop)
        system = self.system
        while not self.ended.is_set():
            self.prompt()
            line = await _first(lines.get(), self.ended.wait())
            if self.ended.is_set():
                break
            if line is _EOF:
                if self.interactive:
                    print(file=sys.stderr)
                await self.end_session()
                break
            text = line.rstrip("\n")
            if not text.strip():
                continue
            post = self.command(text)
            if post is None:
                continue
            if system and post["action"] == "chatbot_post_message":
                post["system_message"], system = system, None
            self.turn_done.clear()
            self.awaiting, self.streamed, self.stopping = True, False, False
            if post["action"] == "chatbot_history":
                await self.send(post)
            else:
                await self.post(post)
            await _first(self.turn_done.wait(), self.ended.wait())
        loop.remove_signal_handler(signal.SIGINT)
        reader.cancel()
        return 1 if self.lost else 0

    def command(self, text: str) -> dict[str, Any] | None:
        """The frame a line asks for: a post, or a `/regenerate`, `/edit <text>` or `/history` (None: nothing)."""
        turn = {"session_id": self.session_id, "stream": self.stream, "client_message_id": str(uuid.uuid4())}
        turn["with_ids"] = True  # so that `/edit` knows the last message's id
        word, _, rest = text.partition(" ")
        if word == "/history":
            return {"action": "chatbot_history", "session_id": self.session_id}
        if word == "/regenerate":
            return {"action": "chatbot_regenerate", **turn}
        if word == "/edit":
            if self.last_user_id is None or not rest.strip():
                self.note("/edit <text> sends a new version of your last message (send one first).")
                return None
            return {"action": "chatbot_edit_message", "message_id": self.last_user_id, "user_message": rest, **turn}
        return {"action": "chatbot_post_message", "user_message": text, **turn}

    def show_history(self, data: dict[str, Any]) -> None:
        """`/history`: the current branch, root first; `[2/3]` marks a message with other versions."""
        messages = {m["id"]: m for m in data["messages"]}
        branch, current = [], data["leaf_id"]
        while current is not None and current in messages:
            branch.append(messages[current])
            current = messages[current]["parent_id"]
        for m in reversed(branch):
            versions = [o["id"] for o in data["messages"] if (o["parent_id"], o["role"]) == (m["parent_id"], m["role"])]
            mark = f" [{versions.index(m['id']) + 1}/{len(versions)}]" if len(versions) > 1 else ""
            who = "you" if m["role"] == "user" else "r2d2"
            self.out(f"#{m['id']}{mark} {who}> {m['content']}\n")
        self.finish_turn()

    # Frames ------------------------------------------------------------------

    async def read_frames(self) -> None:
        while True:
            try:
                async for text in self.ws:
                    self.handle(json.loads(text))
            except websockets.ConnectionClosed:
                pass
            self.connected.clear()
            if self.ended.is_set() or not await self.resume():
                break
        if not self.ended.is_set():
            self.lost = True
            self.note("The server closed the connection.")
            self.ended.set()

    async def resume(self) -> bool:
        """Reconnect and resume the session after a drop, with backoff; False when it cannot be resumed."""
        if self.resume_token is None or self.ws.close_code in UNRESUMABLE_CLOSE_CODES:
            return False
        delay = 0.25
        for _ in range(RESUME_ATTEMPTS):
            self.note(f"[connection lost; resuming in {delay:g} s]")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 8.0)
            try:
                self.ws = await websockets.connect(self.url, max_size=None, additional_headers=self.headers)
            except (OSError, websockets.InvalidHandshake, TimeoutError):
                continue
            await self.ws.send(
                json.dumps(
                    {
                        "action": "chatbot_session_resume",
                        "session_id": self.session_id,
                        "resume_token": self.resume_token,
                        "last_seq": self.last_seq,
                    }
                )
            )
            try:
                answer = json.loads(await asyncio.wait_for(self.ws.recv(), 30))
            except (websockets.ConnectionClosed, TimeoutError):
                continue
            if answer.get("type") == "session_resumed":
                # A resend the server already has is refused (duplicate_message); its frames come by replay or live.
                with contextlib.suppress(websockets.ConnectionClosed):
                    for post in self.unstarted:
                        await self.ws.send(json.dumps(post))
                self.connected.set()
                self.note("[resumed]")
                return True
            if answer.get("type") == "error" and answer["data"]["code"] != "server_draining":
                self.note(f"error [{answer['data']['code']}]: {answer['data']['message']}")
                return False
        return False

    def handle(self, frame: dict[str, Any]) -> None:
        kind, data = frame.get("type"), frame.get("data")
        seq = frame.get("seq")
        if seq is not None:
            if seq <= self.last_seq:
                return  # already shown before the connection dropped
            self.last_seq = seq
        if kind == "session_start":
            self.session_id = data["session_id"]
            self.resume_token = data.get("resume_token")
            self.started.set()
        elif kind == "processing_start":
            self.last_user_id = frame.get("message_id", self.last_user_id)
            if self.unstarted:
                self.unstarted.pop(0)  # answered in order: the oldest message sent is being answered
            self.in_turn = True
            if self.interactive:
                self.out("r2d2> ")
        elif kind == "message_delta":
            self.streamed = True
            self.out(data)
        elif kind == "message":
            self.out("\n" if self.streamed else data + "\n")
            self.streamed = False
        elif kind == "processing_end":
            if self.streamed or self.stopping:
                self.out("\n")
            if self.stopping:
                self.note("[stopped]")
            self.finish_turn()
        elif kind == "error":
            if data["code"] == "duplicate_message":
                # The answer to a resend after a resume (every message gets a fresh id, so only a resend
                # repeats one): the original is on the server and its frames arrive as usual, maybe already have.
                return
            if seq is None and self.unstarted and not self.in_turn:
                if data["code"] == "server_draining":
                    self.note("[the server is restarting; the message will be sent again once resumed]")
                    return
                if data["code"] != "nothing_to_cancel":
                    self.unstarted.pop()  # refused: not sent again
            if self.in_turn and self.streamed:
                self.out("\n")
            self.note(f"error [{data['code']}]: {data['message']}")
            if not self.in_turn:
                self.finish_turn()  # refused before the turn began: nothing more will come for it
            if self.session_id is None:
                self.ended.set()  # the session could not start
        elif kind == "history":
            self.show_history(data)
        elif kind == "session_end":
            self.unstarted.clear()
            if isinstance(data, dict) and data.get("reason"):
                self.note(f"The server ended the session ({data['reason']}).")
            else:
                self.note("Session ended.")
            self.finish_turn()
            self.ended.set()

    def finish_turn(self) -> None:
        self.in_turn = self.awaiting = self.streamed = False
        self.turn_done.set()

    # Actions -----------------------------------------------------------------

    async def send(self, frame: dict[str, Any]) -> None:
        # While the connection is being resumed, wait for it: a message typed meanwhile is sent after.
        await _first(self.connected.wait(), self.ended.wait())
        try:
            await self.ws.send(json.dumps(frame))
        except websockets.ConnectionClosed:
            pass  # the reader says so (e.g. refused as unauthorized: the server sent why, then closed)

    async def post(self, frame: dict[str, Any]) -> None:
        """Send a message, kept until its processing_start arrives (to send again after a resume)."""
        await _first(self.connected.wait(), self.ended.wait())
        self.unstarted.append(frame)
        await self.send(frame)

    async def end_session(self) -> None:
        await self.send({"action": "chatbot_session_end", "session_id": self.session_id})
        try:
            await asyncio.wait_for(self.ended.wait(), 10)
        except TimeoutError:
            self.note("The server did not confirm the end of the session.")

    def interrupt(self) -> None:
        """Ctrl-C: stop the reply being generated; with none, end the session and exit."""
        if self.awaiting and self.session_id:
            if not self.stopping:
                self.stopping = True
                asyncio.ensure_future(self.send({"action": "chatbot_cancel", "session_id": self.session_id}))
        elif not self.ended.is_set():
            if self.interactive:
                print(file=sys.stderr)
            asyncio.ensure_future(self.end_session())

    # Output ------------------------------------------------------------------

    def prompt(self) -> None:
        if self.interactive:
            self.out("you> ")

    @staticmethod
    def out(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    @staticmethod
    def note(text: str) -> None:
        print(text, file=sys.stderr, flush=True)


async def list_models(url: str, api_key: str | None = None) -> list[dict[str, str]]:
    """The server's answer to `chatbot_models`."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    async with websockets.connect(url, additional_headers=headers) as ws:
        await ws.send(json.dumps({"action": "chatbot_models"}))
        frame = json.loads(await asyncio.wait_for(ws.recv(), 10))
    if frame.get("type") != "models":
        raise CommandError(f"The server did not list its models: {frame.get('data')}")
    return frame["data"]


async def usage_frame(url: str, api_key: str | None = None) -> str:
    """The server's answer to `chatbot_usage`, as it sent it."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    async with websockets.connect(url, additional_headers=headers) as ws:
        await ws.send(json.dumps({"action": "chatbot_usage"}))
        text = await asyncio.wait_for(ws.recv(), 10)
    frame = json.loads(text)
    if frame.get("type") != "usage":
        raise CommandError(f"The server did not give its usage: {frame.get('data')}")
    return text


async def follow(url: str, api_key: str | None, session_id: str, *, out: Any = None, err: Any = None) -> int:
    """Watch `session_id` (chatbot_session_watch): the reply being written, then each reply, as they come.
    Replies go to `out` (stdout), notices and errors to `err` (stderr); 0 when the session ended, 1 if refused
    or the watch could not go on."""
    out, err = out or sys.stdout, err or sys.stderr
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    async with websockets.connect(url, additional_headers=headers, max_size=None) as ws:
        await ws.send(json.dumps({"action": "chatbot_session_watch", "session_id": session_id}))
        said = False  # this turn's text has been printed (deltas), so its `message` is not printed again
        async for text in ws:
            frame = json.loads(text)
            kind, data = frame.get("type"), frame.get("data")
            if kind == "session_watching":  # a second one: the watch started over (frames were lost)
                if said:
                    out.write("\n")
                    out.flush()
                said = False
                turns = sum(1 for m in data["messages"] if m["role"] == "assistant")
                print(f"[following {session_id}: {turns} replies so far]", file=err, flush=True)
                if data["partial"] is not None:
                    out.write(data["partial"])
                    out.flush()
                    said = True
            elif kind == "message_delta":
                out.write(data)
                out.flush()
                said = True
            elif kind == "message":
                if not said:
                    out.write(data)
                said = True
            elif kind == "processing_end":
                if said:
                    out.write("\n")
                    out.flush()
                said = False
            elif kind == "error":
                print(f"[{data['code']}] {data['message']}", file=err, flush=True)
                if frame.get("session_id") is None:  # the watch itself was refused
                    return 1
            elif kind == "session_end":
                print("[session ended]", file=err, flush=True)
                return 0
            elif kind == "session_unwatched":  # the watch could not go on (its error came just before)
                print("[no longer following]", file=err, flush=True)
                return 1
    return 0


async def _first(*aws) -> Any:
    """Wait for whichever finishes first; cancel the rest. Returns the first's result."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
    return next(iter(done)).result()


def _stdin_lines(loop: asyncio.AbstractEventLoop) -> asyncio.Queue:
    """Lines of stdin, read on a daemon thread (a blocked read must not keep the process alive)."""
    queue: asyncio.Queue = asyncio.Queue()

    def read() -> None:
        for line in iter(sys.stdin.readline, ""):
            loop.call_soon_threadsafe(queue.put_nowait, line)
        loop.call_soon_threadsafe(queue.put_nowait, _EOF)

    threading.Thread(target=read, name="stdin", daemon=True).start()
    return queue
