"""Chaos soak: two server processes, a PostgreSQL and a Redis of its own, clients that resume, faults meanwhile.

Two servers run the Procfile's way (`python -m r2d2site.serve daphne ...`, one Daphne each, on two loopback
ports) in production mode (DJANGO_DEBUG=0, an API key with no quotas) on a private PostgreSQL cluster
(initdb + pg_ctl in a temporary directory) and a private redis-server, with testkit/fake_llm.py streaming
echoed replies of a few hundred milliseconds to a few seconds. `--clients` clients, resumable or not,
streamed or not, post messages and follow every frame; resumable ones reconnect when their socket closes
and resume (token + last_seq) on either server at random (again a moment later after `session_end`
`resume_failed`), the others start a new session. `--watchers` sockets of the same API key follow other
clients' sessions (`chatbot_session_watch`, issue 28) from the server the holder is not on, for 5-30 s each,
mostly joining mid-reply. Meanwhile a fault loop (`--faults`, one every `--fault-every` s on average) SIGKILLs
a server and restarts it (kill), SIGTERMs one (term: a rolling deploy, drain then restart), restarts Redis
(redis), restarts PostgreSQL (pg: `pg_ctl restart -m fast`), cuts client sockets (cut: the TCP transport
aborted), SIGKILLs a server and restarts Redis (kill+redis), drops every Redis connection without a restart
(redis-reset: `CLIENT KILL TYPE normal` and `TYPE pubsub`), and, at set times (a third of the way in, then
every `--pg-outage-every` s), stops PostgreSQL for `--pg-outage-seconds` (pg-outage, 30 s: a Multi-AZ
failover; meanwhile only cuts and Redis faults). Each storage fault's window (start, end) is recorded. Then
the clients stop posting, wait for their turns to settle and end their sessions, and after a sweep period
the soak checks against the database:

- lost: a message the client saw accepted (processing_start, or a post the server never refused
  on a socket that stayed open) is not saved;
- silent: a message saved by the server that the client, still holding its session, never saw answered;
- wedged: a turn the client saw start never ended for it (no processing_end, even after a resume);
- mismatched: a reply the client assembled (deltas, or the `message` frame) differs from the saved one
  (a reply saved `interrupted`/`cancelled` may be the partial the client saw; a `complete` one must be whole);
- seq violations: per resumable session, a seq never received below the highest received (gap), a seq
  received twice with different frames (reused) or the same (doubled: a resume says last_seq, so nothing at or
  below it comes again, replayed or forwarded during a take-over), or one arriving after a higher one (out of order);
- 1011 closes: a socket the server closed with 1011;
- sessions open: a session with no ended_at once the clients ended theirs and the sweep period passed;
- incomplete: a reply row still `incomplete` at the end;
- duplicated: a message saved twice, or answered by two reply rows;
- resume answers: a resume answered `session_resumed` and then refused;
- gauges: r2d2_live_sessions or r2d2_open_sockets seen negative, or not 0 at the end;
- ended under client: the server ended a session, or gave it to another socket, while its client held it
  (a post refused `session_ended`/`session_not_owned`, a `session_end` nobody asked for, a resume refused
  `session_ended`): nothing in the soak ends sessions but their clients;
- no progress: a client never got a whole reply (a run that tested nothing);
- internal_error: any `error` frame with code `internal_error` on any socket (a turn's, a post's, a resume's,
  a watch's): it says R2D2 itself failed;
- storage_unavailable: one the client got outside every storage fault's window (from its start to its end
  plus `--absorb-seconds`, the retry window, plus 3 s), or where the only storage faults were shorter than
  that window (a restart the retries should have made invisible);
- watchers: per watch, a seq gap, a seq received twice or out of order; a watched reply (the snapshot's
  `partial` and the deltas after it, or the `message`) that is not the saved reply; a snapshot message that
  is not saved.

Exit status 1 on any violation. `--self-check` runs a short soak whose only faults are client cuts (it
should pass), then injects one fault of each kind into copies of what was observed and checks that each
is caught (exit 1 if one is not).

    .venv/bin/python bench/chaos.py [--minutes 3] [--clients 20] [--watchers 4] [--seed 1] [--fault-every 5]
        [--faults kill,term,redis,pg,cut,kill+redis,redis-reset,pg-outage] [--pg-outage-seconds 30]
        [--storage-retry SECONDS (the servers' R2D2_STORAGE_RETRY_SECONDS; 0: off)]
    .venv/bin/python bench/chaos.py --self-check
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import copy
import glob
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import LOGS, PYTHON, ROOT, write_result
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, WebSocketException

from testkit.redis import PrivateRedis
from testkit.server import free_port, wait_for_port

SECRET_KEY = "bench-secret-key-not-for-production-0123456789abcdefghijklmnop"
FAULT_KINDS = ("kill", "term", "redis", "pg", "cut", "kill+redis", "redis-reset", "pg-outage")
#: Faults of the storage (PostgreSQL, Redis): a `storage_unavailable` is only allowed in or just after one of these.
STORAGE_FAULTS = {"redis", "pg", "kill+redis", "redis-reset", "pg-outage"}
#: What may go on while PostgreSQL is out (a server started or killed then would test the launcher, not R2D2).
DURING_OUTAGE = {"cut", "redis-reset", "redis"}
#: Error codes every frame is watched for, wherever they come (a turn, a refusal, a resume, a watch).
WATCHED_CODES = {"internal_error", "storage_unavailable"}
WORDS = ("droid", "astromech", "hyperdrive", "moisture", "vaporator", "binary", "sunset", "dune", "sandcrawler")
WORDS += ("hologram", "princess", "rebel", "base", "bantha", "scrap", "circuit", "beep", "whistle", "tractor", "beam")
WORDS += ("cantina", "starship", "thermal", "exhaust", "port")
TAG = re.compile(r"Echo: (c\d+m\d+x[0-9a-f]{4})\b")
#: A resume refused with one of these is over for good: the client starts a new session.
TERMINAL_RESUME = {"resume_unavailable", "session_ended", "session_not_found", "resume_token_invalid"}
TURN_FRAMES = ("message_delta", "message", "error", "processing_end")
#: A post refused with one of these means the session is gone.
SESSION_GONE = {"session_ended", "session_not_found"}


def now() -> float:
    return time.monotonic()


def error_code(frame: dict[str, Any] | None) -> str:
    """The code of an `error` frame; what else came, for anything else."""
    if frame is None:
        return "no answer"
    data = frame.get("data")
    if frame.get("type") == "error" and isinstance(data, dict):
        return str(data.get("code", "?"))
    return f"frame {frame.get('type')}"


# Services --------------------------------------------------------------------------------------------


class Postgres:
    """A private PostgreSQL cluster in a temporary directory, as `postgres` when run as root (initdb refuses root)."""

    def __init__(self, workdir: Path, logdir: Path) -> None:
        self.dir = workdir / "pg"
        self.data = self.dir / "data"
        self.log = logdir / "postgres.log"
        self.port = free_port()
        candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]))
        bindir = os.environ.get("R2D2_CHAOS_PG_BIN") or (candidates[-1] if candidates else "")
        if not bindir or not Path(bindir, "initdb").exists():
            raise SystemExit("chaos: no PostgreSQL server binaries (initdb); set R2D2_CHAOS_PG_BIN")
        self.bin = Path(bindir)
        self.as_postgres = os.geteuid() == 0

    @property
    def url(self) -> str:
        return f"postgres://postgres@127.0.0.1:{self.port}/r2d2_chaos"

    def _run(self, *command: str, timeout: float = 60) -> None:
        argv = [str(self.bin / command[0]), *command[1:]]
        if self.as_postgres:
            argv = ["runuser", "-u", "postgres", "--", *argv]
        subprocess.run(argv, check=True, timeout=timeout, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def _options(self) -> str:
        # fsync off: a throwaway cluster; max_connections: two servers' pools, restarts' leftovers, the checker.
        return (
            f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off"
            " -c full_page_writes=off -c max_connections=300"
        )

    def start(self) -> None:
        self.dir.mkdir(parents=True)
        self.log.touch()
        if self.as_postgres:
            shutil.chown(self.dir, "postgres")
            shutil.chown(self.log, "postgres")
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync", "--no-instructions")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", self._options(), "-w", "start")
        import psycopg

        with psycopg.connect(f"postgres://postgres@127.0.0.1:{self.port}/postgres", autocommit=True) as conn:
            conn.execute("CREATE DATABASE r2d2_chaos")

    def restart(self) -> None:
        self._run(
            "pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", self._options(), "-m", "fast", "-w", "restart"
        )

    def down(self) -> None:
        """The outage's start: a fast shutdown (clients' connections are terminated, as in a failover)."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def up(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", self._options(), "-w", "start")

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop", timeout=30)


class Server:
    """One server process, started as the Procfile starts it (one Daphne: R2D2_WEB_PROCESSES=1)."""

    def __init__(self, index: int, env: dict[str, str], logdir: Path, root: Path) -> None:
        self.index = index
        self.root = root
        self.port = free_port()
        self.env = env
        self.log = logdir / f"server-{index}.log"
        self.process: subprocess.Popen | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, t: float) -> None:
        self.starts += 1
        command = [PYTHON, "-m", "r2d2site.serve", "daphne", "-b", "127.0.0.1", "-p", str(self.port)]
        command += ["--access-log", "/dev/null", "r2d2site.asgi:application"]
        with open(self.log, "ab") as log:
            log.write(f"=== chaos: start #{self.starts} at t={t:.1f}s\n".encode())
            log.flush()
            self.process = subprocess.Popen(
                command, cwd=self.root, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def ready(self, timeout: float = 60) -> None:
        """Listening, and one request made (it starts the process's heartbeat, as a load balancer's check would)."""
        wait_for_port(self.port, self.process, timeout=timeout)
        with contextlib.suppress(OSError, urllib.error.URLError):
            urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=10).read()

    def signal(self, signum: int) -> None:
        if self.running:
            self.process.send_signal(signum)

    def wait(self, timeout: float) -> bool:
        try:
            self.process.wait(timeout)
            return True
        except subprocess.TimeoutExpired:
            return False

    def stop(self) -> None:
        if self.running:
            self.process.terminate()
            if not self.wait(20):
                self.process.kill()
                self.process.wait(10)

    def gauges(self) -> dict[str, float] | None:
        """r2d2_live_sessions and r2d2_open_sockets as this process counts them (None if it does not answer)."""
        try:
            body = urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5).read().decode()
        except (OSError, urllib.error.URLError, ValueError):
            return None
        values = {}
        for line in body.splitlines():
            name, _, value = line.partition(" ")
            if name in ("r2d2_live_sessions", "r2d2_open_sockets"):
                values[name] = float(value)
        return values


# What a client sees ------------------------------------------------------------------------------------


@dataclass
class Post:
    tag: str
    text: str
    sent: float
    server: int | None = None  # the server it was sent to
    fate: str = "unknown"  # unknown | accepted | refused:<code> | dropped (never answered nor refused)
    in_doubt: bool = False  # the socket it was sent on was lost before the server answered it
    turn: Turn | None = None
    regenerates: Post | None = None  # a `chatbot_regenerate` of that post's reply (issue 29), not a new message

    @property
    def expected(self) -> str:
        """What the model server (testkit/fake_llm.py, echo) answers to it."""
        return "Echo: " + self.text


@dataclass
class Turn:
    post: Post | None
    started: float
    seq: int | None = None
    server: int | None = None  # the server whose socket carried its processing_start
    deltas: list[str] = field(default_factory=list)
    message: str | None = None
    errors: list[str] = field(default_factory=list)
    ended: bool = False  # processing_end seen
    end: str | None = None  # why it is over for the client when no processing_end came
    last_frame: float = field(default_factory=now)  # a resume is not progress: its frames are
    queue_next: bool = False  # post the next message while this turn runs (resumable clients)
    queued: bool = False
    tag_checked: bool = False
    answer_to: Post | None = None  # a second turn for a message already answered: that message

    @property
    def types(self) -> str:
        parts = ["start", *([f"delta*{len(self.deltas)}"] if self.deltas else [])]
        parts += ["message"] if self.message is not None else []
        parts += [f"error:{code}" for code in self.errors]
        parts += ["end"] if self.ended else [f"(no end: {self.end})"]
        return " ".join(parts)


@dataclass
class Session:
    id: str
    client: int
    resumable: bool
    stream: bool
    token: str | None
    posts: list[Post] = field(default_factory=list)
    turns: list[Turn] = field(default_factory=list)
    frames: dict[int, str] = field(default_factory=dict)  # seq -> frame text (resumable)
    max_seq: int = 0
    conflicts: list[tuple[int, str, str]] = field(default_factory=list)  # seq, first frame, second frame
    out_of_order: list[tuple[int, int]] = field(default_factory=list)  # seq, highest before it
    doubled: list[int] = field(default_factory=list)  # a seq received again, same bytes (a replay past last_seq)
    current: Turn | None = None
    awaiting: collections.deque = field(default_factory=collections.deque)  # posts not started yet, oldest first
    by_tag: dict[str, Post] = field(default_factory=dict)
    outcome: str | None = None  # why the client stopped following it
    stalled: bool = False
    just_resumed: bool = False
    resumes: int = 0
    resume_failures: int = 0
    double_answers: list[str] = field(default_factory=list)
    again: list[Turn] = field(default_factory=list)  # turns answering a message a second time
    taken: list[str] = field(default_factory=list)  # the server ended it, or gave it away, under its client
    ending: bool = False  # the client asked to end it
    anomalies: list[str] = field(default_factory=list)
    history: list[str] = field(default_factory=list)
    next_post: float = 0.0
    last_progress: float = 0.0
    pause: float = 0.0  # seconds to wait before resuming it again (after session_end resume_failed)

    def note(self, t0: float, event: str) -> None:
        self.history.append(f"{now() - t0:6.1f}s {event}")

    def note_seq(self, seq: int, text: str) -> bool:
        """Record a sequenced frame; False when it is a seq already received (not to be applied again)."""
        if seq in self.frames:
            if self.frames[seq] == text:
                self.doubled.append(seq)
            else:
                self.conflicts.append((seq, self.frames[seq][:160], text[:160]))
            return False
        if seq < self.max_seq:
            self.out_of_order.append((seq, self.max_seq))
        self.frames[seq] = text
        self.max_seq = max(self.max_seq, seq)
        return True


#: A watched turn still open for its watcher this long after it began, when the watcher unwatched, never ended for
#: it (replies take 0.3-3 s, a take-over a few more): counted (`watched_turns_left_open`), not judged.
LEFT_OPEN_SECONDS = 15.0


@dataclass
class WatchedTurn:
    """A turn as a watcher assembled it: the snapshot's `partial` (if it joined mid-reply), then the deltas."""

    text: str = ""
    from_partial: bool = False
    message: str | None = None
    errors: list[str] = field(default_factory=list)
    ended: bool = False
    opened: float = field(default_factory=lambda: now())  # when the watcher saw it start (or joined it)


@dataclass
class Watch:
    """One `chatbot_session_watch` of another client's session, from a socket on the other server."""

    watcher: int
    session: str
    holder: int  # the client holding it
    server: int  # the watching socket's server
    started: float
    snapshot: dict[str, Any] | None = None
    frames: dict[int, str] = field(default_factory=dict)  # seq -> frame text
    doubles: list[int] = field(default_factory=list)  # a seq received twice (any bytes: a watch never replays)
    out_of_order: list[tuple[int, int]] = field(default_factory=list)
    turns: list[WatchedTurn] = field(default_factory=list)
    current: WatchedTurn | None = None
    end: str | None = None  # session_end:<reason> | unwatched | socket closed <code> | refused:<code> | lost:<code>
    anomalies: list[str] = field(default_factory=list)
    snapshots: list[dict[str, Any]] = field(default_factory=list)  # the first, then one per start-over
    excused: set[int] = field(default_factory=set)  # seqs a start-over told the watcher it would not get
    restarting: bool = False  # a start-over's snapshot came: the next frame's seq says what it skipped
    unwatching: float | None = None  # when the watcher sent chatbot_session_unwatch (its own end of the watch)

    def left_open(self, after: float = LEFT_OPEN_SECONDS) -> int:
        """Turns the watcher saw start that had not ended for it `after` seconds later, when it unwatched."""
        if self.unwatching is None:
            return 0
        return sum(not t.ended and self.unwatching - t.opened > after for t in self.turns)

    def joined(self, snapshot: dict[str, Any]) -> None:
        self.snapshot = snapshot
        self.snapshots.append(snapshot)
        if snapshot.get("partial") is not None:  # a reply being written: the snapshot holds its beginning
            self.current = WatchedTurn(text=snapshot["partial"], from_partial=True)
            self.turns.append(self.current)

    def started_over(self, snapshot: dict[str, Any]) -> None:
        """A second `session_watching`: frames it missed could not be had, so it shows the conversation afresh.
        The turn it was putting together is not judged (it is told it lacks some of it)."""
        if self.current is not None:
            self.turns.remove(self.current)
            self.current = None
        self.restarting = True
        self.joined(snapshot)

    def frame(self, seq: int, text: str, frame: dict[str, Any]) -> None:
        if seq in self.frames:
            self.doubles.append(seq)
            return
        if self.frames and seq < max(self.frames):
            self.out_of_order.append((seq, max(self.frames)))
        if self.restarting:
            self.restarting = False
            self.excused.update(range(max(self.frames, default=seq) + 1, seq))
        self.frames[seq] = text
        kind, data, current = frame.get("type"), frame.get("data"), self.current
        if kind == "processing_start":
            if current is not None:
                self.anomalies.append(f"processing_start (seq {seq}) while a watched turn was open")
            self.current = WatchedTurn()
            self.turns.append(self.current)
        elif kind == "session_end":
            self.end = f"session_end:{data.get('reason') if isinstance(data, dict) else 'client'}"
        elif kind in TURN_FRAMES and current is None:
            self.anomalies.append(f"{kind} (seq {seq}) outside a watched turn")
        elif kind == "message_delta":
            current.text += data
        elif kind == "message":
            current.message = data
        elif kind == "error":
            current.errors.append(error_code(frame))
        elif kind == "processing_end":
            current.ended, self.current = True, None
        else:
            self.anomalies.append(f"unexpected watched frame {kind}")


class Watcher:
    """A socket of the same principal (the soak's one API key) that follows other clients' sessions in turn."""

    def __init__(self, soak: Soak, index: int) -> None:
        self.soak = soak
        self.index = index
        self.rng = random.Random(f"{soak.args.seed}-watcher-{index}")
        self.watches: list[Watch] = []

    def error_seen(self, link: Link, text: str, frame: dict[str, Any]) -> None:
        code = error_code(frame)
        if code in WATCHED_CODES:
            self.soak.coded.append(
                {
                    "t": round(now() - self.soak.t0, 2),
                    "code": code,
                    "watcher": self.index,
                    "server": link.server,
                    "session": frame.get("session_id"),
                    "frame": text[:200],
                }
            )

    def pick(self) -> tuple[Client, Session] | None:
        """A live session another client holds; one answering now, mostly (a watcher joins mid-reply)."""
        held = [
            (c, c.session)
            for c in self.soak.clients
            if c.link is not None and c.session is not None and c.session.outcome is None
        ]
        answering = [(c, s) for c, s in held if s.current is not None]
        pool = answering if answering and self.rng.random() < 0.8 else held
        return self.rng.choice(pool) if pool else None

    async def run(self) -> None:
        while not self.soak.stopping and not self.soak.hard_stop and not self.soak.watch_unsupported:
            target = self.pick()
            if target is None:
                await asyncio.sleep(0.5)
                continue
            client, session = target
            server = 1 - client.link.server  # the other process than the holder's (as far as the client knows)
            try:
                ws = await connect(
                    self.soak.servers[server].url,
                    additional_headers=self.soak.auth_headers,
                    open_timeout=10,
                    ping_interval=None,
                    close_timeout=2,
                    max_queue=None,
                    max_size=None,
                    compression=None,
                )
            except (OSError, TimeoutError, WebSocketException):
                self.soak.connect_failures += 1
                await asyncio.sleep(self.rng.uniform(0.2, 1.0))
                continue
            link = Link(ws, server, self)
            watch = Watch(self.index, session.id, client.index, server, now() - self.soak.t0)
            self.watches.append(watch)
            try:
                await self.follow(link, watch)
            except ConnectionClosed:
                pass
            finally:
                code = await link.close()
                self.soak.closes[code] += 1
                if watch.end is None:
                    watch.end = f"socket closed {code}"
                if code == 1011:
                    self.soak.closes_1011.append({"watcher": self.index, "server": server, "session": session.id})
            self.soak.watch_ends[re.sub(r"refused:.*", "refused", watch.end)] += 1
            await asyncio.sleep(self.rng.uniform(0, 1.0))

    async def follow(self, link: Link, watch: Watch) -> None:
        await link.send({"action": "chatbot_session_watch", "session_id": watch.session})
        got = await link.recv(15)
        frame = got[1] if got else None
        if frame is None or frame.get("type") != "session_watching":
            code = error_code(frame)
            watch.end = f"refused:{code}"
            self.soak.refusals[f"watch:{code}"] += 1
            if code == "unknown_action":
                self.soak.watch_unsupported = True
            return
        watch.joined(frame["data"])
        deadline = now() + self.rng.uniform(5, 30)
        while watch.end is None and not self.soak.stopping and now() < deadline:
            self.receive(watch, await link.recv(0.5))
        if watch.end is not None:
            return
        watch.unwatching = now()
        await link.send({"action": "chatbot_session_unwatch", "session_id": watch.session})
        deadline = now() + 10
        while watch.end is None and now() < deadline:
            self.receive(watch, await link.recv(deadline - now()))

    def receive(self, watch: Watch, got: tuple[str, dict[str, Any]] | None) -> None:
        if got is None:
            return
        text, frame = got
        if "seq" in frame and frame.get("session_id") == watch.session:
            watch.frame(frame["seq"], text, frame)
        elif frame.get("type") == "session_unwatched":
            watch.end = "unwatched"
        elif frame.get("type") == "session_watching" and frame["data"].get("session_id") == watch.session:
            watch.started_over(frame["data"])
            self.soak.watch_restarts += 1
        elif frame.get("type") == "error" and frame.get("session_id") == watch.session:
            watch.end = f"lost:{error_code(frame)}"  # the watch could not go on; session_unwatched follows
        else:
            watch.anomalies.append(f"unexpected frame on a watching socket: {text[:120]}")


class Reconnect(Exception):
    """The socket no longer holds the session although it is live: resume it on a new socket."""


class Link:
    """One client socket, and the close code the server sent on it."""

    def __init__(self, ws: ClientConnection, server: int, client: Client | Watcher) -> None:
        self.ws = ws
        self.server = server
        self.client = client
        self.cut = False

    async def send(self, payload: dict[str, Any]) -> None:
        await self.ws.send(json.dumps(payload))

    async def recv(self, timeout: float) -> tuple[str, dict[str, Any]] | None:
        try:
            text = await asyncio.wait_for(self.ws.recv(), timeout)  # cancelling recv() loses nothing
        except TimeoutError:
            return None
        frame = json.loads(text)
        if frame.get("type") == "error":
            self.client.error_seen(self, text, frame)
        return text, frame

    def abort(self) -> None:
        """The fault: drop the TCP connection, no close frame (as a network loss does)."""
        self.cut = True
        transport = self.ws.transport
        if transport is not None:
            transport.abort()

    async def close(self) -> int:
        """Close (if still open) and return the code the server closed with (1006: none received)."""
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.ws.close(), 3)
        received = self.ws.protocol.close_rcvd
        return received.code if received is not None else 1006


# The clients ----------------------------------------------------------------------------------------


class Client:
    def __init__(self, soak: Soak, index: int, resumable: bool, stream: bool) -> None:
        self.soak = soak
        self.index = index
        self.resumable = resumable
        self.stream = stream
        self.rng = random.Random(f"{soak.args.seed}-client-{index}")
        self.sessions: list[Session] = []
        self.link: Link | None = None
        self.session: Session | None = None  # the session it holds or is resuming
        self.count = 0

    def error_seen(self, link: Link, text: str, frame: dict[str, Any]) -> None:
        """Every `error` frame on any of its sockets: those with a watched code are kept, with when and where."""
        code = error_code(frame)
        if code in WATCHED_CODES:
            session = frame.get("session_id") or (self.session.id if self.session else None)
            self.soak.coded.append(
                {
                    "t": round(now() - self.soak.t0, 2),
                    "code": code,
                    "client": self.index,
                    "server": link.server,
                    "session": session,
                    "frame": text[:200],
                }
            )

    async def run(self) -> None:
        session: Session | None = None
        while not self.soak.hard_stop:
            if session is not None and session.outcome is not None:
                session = None
            self.session = session
            if session is not None and session.pause:
                await asyncio.sleep(session.pause)
                session.pause = 0.0
            if session is None and self.soak.stopping:
                return
            link = await self.open()
            if link is None:
                return
            self.link = link
            try:
                if session is None:
                    session = self.session = await self.start(link)
                    if session is None:
                        continue
                elif not await self.resume(link, session):
                    continue
                await self.talk(link, session)
            except ConnectionClosed:
                pass
            except Reconnect:
                session.note(self.soak.t0, "reconnect to resume")
            finally:
                self.link = None
                code = await link.close()
                self.soak.closes[code] += 1
                if code == 1011:
                    self.soak.closes_1011.append(
                        {"client": self.index, "server": link.server, "session": session.id if session else None}
                    )
                if session is not None:
                    self.lost(session, link, code)

    def lost(self, session: Session, link: Link, code: int) -> None:
        """The socket is gone: what that means for the session it held."""
        if session.outcome is not None:
            return
        session.note(self.soak.t0, f"socket closed {code}" + (" (cut)" if link.cut else ""))
        for post in session.awaiting:
            if post.fate == "unknown":
                post.in_doubt = True
        if session.stalled:
            session.outcome = "abandoned:stalled"
        elif not session.resumable:
            session.outcome = f"socket lost ({code})"
            if session.current is not None:
                session.current.end = "cut"
                session.current = None

    async def open(self) -> Link | None:
        attempt = 0
        server = self.rng.randrange(2)
        while not self.soak.hard_stop:
            try:
                ws = await connect(
                    self.soak.servers[server].url,
                    additional_headers=self.soak.auth_headers,
                    open_timeout=10,
                    ping_interval=None,  # its timeout would close with 1011 from this side
                    close_timeout=2,
                    max_queue=None,
                    max_size=None,
                    compression=None,
                )
                return Link(ws, server, self)
            except (OSError, TimeoutError, WebSocketException):
                self.soak.connect_failures += 1
                attempt += 1
                server = 1 - server  # the other one may be up
                await asyncio.sleep(min(1.0, 0.1 * attempt) * self.rng.uniform(0.5, 1.5))
        return None

    async def answer(self, link: Link, session: Session | None, timeout: float = 30) -> dict[str, Any] | None:
        """The first unsequenced frame (the answer to a request); sequenced frames go to the session."""
        deadline = now() + timeout
        while now() < deadline:
            got = await link.recv(deadline - now())
            if got is None:
                break
            text, frame = got
            if "seq" in frame and session is not None:
                self.sequenced(session, text, frame)
                continue
            return frame
        return None

    async def start(self, link: Link) -> Session | None:
        await link.send({"action": "chatbot_session_start", "resumable": self.resumable})
        frame = await self.answer(link, None)
        if frame is None or frame.get("type") != "session_start":
            self.soak.refusals[f"start:{error_code(frame)}"] += 1
            await asyncio.sleep(self.rng.uniform(0.2, 1.0))
            return None
        data = frame["data"]
        session = Session(data["session_id"], self.index, self.resumable, self.stream, data.get("resume_token"))
        session.note(self.soak.t0, f"started on server {link.server}")
        self.sessions.append(session)
        return session

    async def resume(self, link: Link, session: Session) -> bool:
        await link.send(
            {
                "action": "chatbot_session_resume",
                "session_id": session.id,
                "resume_token": session.token,
                "last_seq": session.max_seq,
            }
        )
        frame = await self.answer(link, session)
        if frame is not None and frame.get("type") == "session_resumed":
            session.resumes += 1
            session.just_resumed = True
            session.resume_failures = 0
            said = frame["data"].get("last_seq")
            session.note(self.soak.t0, f"resumed on server {link.server}: last_seq {session.max_seq} -> {said}")
            if isinstance(said, int) and said < session.max_seq:
                session.anomalies.append(f"session_resumed last_seq {said} below the client's {session.max_seq}")
            self.soak.resumes += 1
            return True
        code = error_code(frame)
        self.soak.refusals[f"resume:{code}"] += 1
        session.note(self.soak.t0, f"resume refused on server {link.server}: {code}")
        if code in TERMINAL_RESUME or code == "session_not_owned":
            if code in SESSION_GONE or code == "session_not_owned":
                session.taken.append(f"t={now() - self.soak.t0:.1f}s resume refused: {code}")
            self.give_up(session, f"resume refused: {code}")
        else:
            session.resume_failures += 1
            if session.resume_failures >= 20:
                self.give_up(session, "resume failed 20 times")
            await asyncio.sleep(self.rng.uniform(0.3, 1.0))
        return False

    def give_up(self, session: Session, why: str) -> None:
        session.outcome = why
        if session.current is not None:
            session.current.end = why
            session.current = None

    async def talk(self, link: Link, session: Session) -> None:
        args = self.soak.args
        session.last_progress = now()
        while session.outcome is None:
            t = now()
            if self.soak.stopping:
                if session.current is None and not session.awaiting:
                    await self.end(link, session)
                    return
                if t >= self.soak.settle_deadline:
                    if session.current is not None:
                        session.current.end = "settle timeout"
                        session.current = None
                    session.note(self.soak.t0, "settle timeout")
                    session.stalled = True
                    await self.end(link, session)
                    return
            else:
                await self.maybe_post(link, session, t)
            if session.current is not None and t - session.current.last_frame > args.stall_seconds:
                session.current.end = f"stalled: nothing for {args.stall_seconds:.0f}s"
                session.current = None
                session.note(self.soak.t0, f"stalled: nothing for {args.stall_seconds:.0f}s in a turn")
                session.stalled = True
                await self.end(link, session)
                return
            if session.current is None and session.awaiting and t - session.last_progress > args.doubt_seconds:
                for post in session.awaiting:
                    if post.fate == "unknown":
                        post.fate = "dropped"
                        session.note(self.soak.t0, f"{post.tag} never answered nor refused: dropped")
                session.awaiting.clear()
                session.last_progress = t
            got = await link.recv(0.2)
            if got is None:
                continue
            session.last_progress = now()
            self.frame(session, *got)

    async def maybe_post(self, link: Link, session: Session, t: float) -> None:
        current = session.current
        if current is None and not session.awaiting and t >= session.next_post:
            last = session.posts[-1] if session.posts else None
            answered = last is not None and last.turn is not None and last.turn.message is not None
            if answered and not self.soak.regenerate_unsupported and self.rng.random() < self.soak.args.regenerate:
                await self.regenerate(link, session, last.regenerates or last)
            else:
                await self.post(link, session)
        elif current is not None and current.queue_next and not current.queued and not session.awaiting:
            current.queued = True  # a second message, to wait behind the turn in progress
            await self.post(link, session)

    async def post(self, link: Link, session: Session) -> None:
        self.count += 1
        tag = f"c{self.index:02d}m{self.count:03d}x{self.rng.getrandbits(16):04x}"
        text = tag + " " + " ".join(self.rng.choice(WORDS) for _ in range(self.rng.randint(3, 50)))
        post = Post(tag, text, now() - self.soak.t0, server=link.server)
        session.posts.append(post)
        session.by_tag[tag] = post
        session.awaiting.append(post)
        session.just_resumed = False
        self.soak.posts += 1
        payload = {"action": "chatbot_post_message", "session_id": session.id, "user_message": text}
        payload["client_message_id"] = tag  # ignored by servers that do not know it
        if self.stream:
            payload["stream"] = True
        await link.send(payload)

    async def regenerate(self, link: Link, session: Session, original: Post) -> None:
        """Ask for the leaf's reply again: the model answers the same message, a new reply beside the first."""
        post = Post(original.tag, original.text, now() - self.soak.t0, server=link.server, regenerates=original)
        session.posts.append(post)
        session.awaiting.append(post)
        session.just_resumed = False
        self.soak.regenerations += 1
        session.note(self.soak.t0, f"regenerate the reply to {original.tag}")
        payload = {"action": "chatbot_regenerate", "session_id": session.id}
        if self.stream:
            payload["stream"] = True
        await link.send(payload)

    async def end(self, link: Link, session: Session) -> None:
        """End the session (the run is over, or it stalled) and wait for the answer."""
        session.ending = True
        await link.send({"action": "chatbot_session_end", "session_id": session.id})
        deadline = now() + 15
        while session.outcome is None and now() < deadline:
            got = await link.recv(deadline - now())
            if got is None:
                break
            self.frame(session, *got, ending=True)
        if session.outcome is None:
            session.outcome = "end not answered"

    # Frames ---------------------------------------------------------------------------------

    def frame(self, session: Session, text: str, frame: dict[str, Any], ending: bool = False) -> None:
        if "seq" in frame:
            self.sequenced(session, text, frame)
            return
        kind = frame.get("type")
        if kind == "error" and not (not session.resumable and session.current is not None):
            self.refused(session, frame["data"].get("code", "?"), ending)
            return
        self.apply(session, kind, frame.get("data"))

    def sequenced(self, session: Session, text: str, frame: dict[str, Any]) -> None:
        if frame.get("session_id") != session.id:
            session.anomalies.append(f"frame of another session: {text[:120]}")
            return
        if session.note_seq(frame["seq"], text):
            self.apply(session, frame.get("type"), frame.get("data"), seq=frame["seq"])

    def refused(self, session: Session, code: str, ending: bool) -> None:
        """An unsequenced error: the refusal of the one post whose fate is unknown, or of the end request."""
        unknown = [p for p in session.awaiting if p.fate == "unknown" and not p.in_doubt]
        if ending and not unknown:
            session.outcome = f"end refused: {code}"
            self.soak.refusals[f"end:{code}"] += 1
            return
        if unknown:
            post = unknown[-1]
            post.fate = f"refused:{code}"
            session.awaiting.remove(post)
            if post.regenerates is not None and code == "unknown_action":
                self.soak.regenerate_unsupported = True  # servers before issue 29
            session.next_post = now() + self.rng.uniform(0.3, 1.0)  # not a hot loop when everything is refused
            self.soak.refusals[f"post:{code}"] += 1
            session.note(self.soak.t0, f"{post.tag} refused: {code}")
            if code in SESSION_GONE or code == "session_not_owned":
                # Nobody ended it and no other socket resumed it: the socket holding it was told otherwise.
                session.taken.append(f"t={now() - self.soak.t0:.1f}s a post refused: {code}")
                if code == "session_not_owned" and session.resumable:
                    raise Reconnect
                self.give_up(session, f"post refused: {code}")
            return
        late = [p for p in session.posts if p.fate == "dropped" and p.turn is None and not p.in_doubt]
        if late:  # refused after the client stopped waiting: a refusal all the same
            late[-1].fate = f"refused:{code}"
            session.note(self.soak.t0, f"{late[-1].tag} refused late: {code}")
            self.soak.refusals[f"post (late):{code}"] += 1
            return
        if session.just_resumed:
            session.double_answers.append(code)
            session.note(self.soak.t0, f"second answer to the resume: error {code}")
            if code in TERMINAL_RESUME:
                self.give_up(session, f"resume refused after session_resumed: {code}")
            return
        session.anomalies.append(f"error {code} that answers nothing")
        self.soak.refusals[f"unsolicited:{code}"] += 1

    def apply(self, session: Session, kind: str | None, data: Any, seq: int | None = None) -> None:
        if kind == "processing_start":
            self.turn_started(session, seq)
        elif kind in TURN_FRAMES:
            current = session.current
            if current is None:
                session.anomalies.append(f"{kind} (seq {seq}) outside a turn")
                return
            current.last_frame = now()
            if kind == "message_delta":
                current.deltas.append(data)
                self.check_tag(session, current)
            elif kind == "message":
                current.message = data
                self.check_tag(session, current)
            elif kind == "error":
                current.errors.append(data.get("code", "?"))
            else:  # processing_end
                current.ended = True
                session.current = None
                session.next_post = now() + self.rng.uniform(0, self.soak.args.think)
        elif kind == "session_end":
            reason = data.get("reason", "client") if isinstance(data, dict) else "client"
            if reason == "resumed_elsewhere":
                session.taken.append(f"t={now() - self.soak.t0:.1f}s session_end resumed_elsewhere")
                raise Reconnect
            if reason == "resume_failed":
                # The take-over could not complete after session_resumed (storage down, or the log lacks a frame
                # the client needs: never forwarded with a hole). The session is live: resume it again later.
                self.soak.resume_failed += 1
                session.resume_failures += 1
                session.note(self.soak.t0, f"session_end (resume_failed), seq {seq}: resume again later")
                if session.resume_failures >= 20:
                    self.give_up(session, "resume failed 20 times")
                    return
                session.pause = self.rng.uniform(0.5, 2.0)
                raise Reconnect
            if reason != "client" or not session.ending:
                session.taken.append(f"t={now() - self.soak.t0:.1f}s session_end ({reason}) nobody asked for")
            session.note(self.soak.t0, f"session_end ({reason})")
            if session.current is not None:
                session.current.end = f"session ended ({reason}) while the turn was open"
                session.current = None
            session.outcome = f"session_end:{reason}"
        else:
            session.anomalies.append(f"unexpected frame {kind}")

    def turn_started(self, session: Session, seq: int | None) -> None:
        if session.current is not None:
            session.current.end = "superseded by the next turn's processing_start"
            session.anomalies.append(f"processing_start (seq {seq}) while a turn was open")
        post = session.awaiting.popleft() if session.awaiting else None
        if post is not None:
            post.fate = "accepted"
        else:
            session.anomalies.append(f"processing_start (seq {seq}) with no message waiting")
        turn = Turn(post, now() - self.soak.t0, seq=seq, server=self.link.server if self.link else None)
        turn.queue_next = session.resumable and self.rng.random() < 0.3
        if post is not None:
            post.turn = turn
        session.turns.append(turn)
        session.current = turn
        self.soak.turns_started += 1

    def check_tag(self, session: Session, turn: Turn) -> None:
        """Once the reply names its message (the model echoes it), make sure the turn is that message's."""
        if turn.tag_checked:
            return
        text = turn.message if turn.message is not None else "".join(turn.deltas)
        match = TAG.match(text)
        if match is None:
            turn.tag_checked = len(text) > 40  # long enough to have said it: it will show as mismatched
            return
        turn.tag_checked = True
        tag = match.group(1)
        if turn.post is not None and turn.post.tag == tag:
            return
        post = session.by_tag.get(tag)
        if post is None:
            session.anomalies.append(f"a reply to {tag}, a message this session never sent")
            return
        previous = turn.post
        if previous is not None:  # the order guessed wrong: put it back
            previous.turn, previous.fate = None, "unknown"
            session.awaiting.appendleft(previous)
            turn.post = None
        if post.turn is not None and post.turn is not turn:
            turn.answer_to = post  # the server answered this message a second time
            session.again.append(turn)
            session.note(self.soak.t0, f"{tag} answered again (seq {turn.seq}, server {turn.server})")
            return
        with contextlib.suppress(ValueError):
            session.awaiting.remove(post)
        post.fate, post.turn, turn.post = "accepted", turn, post
        session.anomalies.append(f"turn reattributed to {tag} by its reply")


# The database, as the checker reads it --------------------------------------------------------------------


@dataclass
class Snapshot:
    sessions: dict[str, dict[str, Any]]
    messages: list[dict[str, Any]]


def snapshot(database_url: str) -> Snapshot:
    import psycopg
    from psycopg.rows import dict_row

    with psycopg.connect(database_url, row_factory=dict_row) as conn:
        columns = {
            r["column_name"]
            for r in conn.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_name = 'chat_chatmessage'"
            )
        }
        optional = [c for c in ("reply_to_id", "client_message_id", "parent_id") if c in columns]
        sessions = {
            r["id"]: r
            for r in conn.execute(
                "SELECT id::text AS id, ended_at IS NOT NULL AS ended, end_reason, owner_process,"
                " resume_token_hash <> '' AS resumable, released_at::text AS released_at,"
                " created_at::text AS created_at FROM chat_chatsession"
            )
        }
        select = ", ".join(["id", "session_id::text AS session_id", "role", "content", "status", *optional])
        messages = list(conn.execute(f"SELECT {select} FROM chat_chatmessage ORDER BY created_at, id"))
    return Snapshot(sessions, messages)


# The checker ----------------------------------------------------------------------------------------------

VIOLATIONS = {
    "lost": "accepted messages not saved",
    "silent": "messages saved but never answered to the client holding the session",
    "wedged": "turns started that never ended for the client",
    "mismatched": "replies the client assembled that differ from the saved ones",
    "seq": "seq violations (gaps, reused, doubled, out of order)",
    "closed_1011": "sockets the server closed with 1011",
    "open_sessions": "sessions still open after the clients ended and the sweep",
    "incomplete": "replies left `incomplete`",
    "duplicated": "messages saved twice or answered twice",
    "resume_answers": "resumes answered twice (session_resumed, then an error)",
    "gauges": "r2d2_live_sessions / r2d2_open_sockets negative, or not 0 at the end",
    "ended_under_client": "sessions the server ended, or gave away, while their client held them",
    "no_progress": "clients that never got a whole reply (a run that tested nothing)",
    "internal_error": "error frames with code internal_error (a turn's, a refusal's, any)",
    "storage_unavailable": "storage_unavailable outside a storage fault and its retry window, or after a short one",
    "watchers": "watched replies (partial + deltas) that differ from the saved ones; watched seq gaps or doubles",
    "tree": "saved replies whose parent is not a user message of the same session (issue 29's tree)",
}


@dataclass
class Observed:
    """Everything the checker judges: the clients' sessions, what the servers said, the database."""

    sessions: list[Session]
    closes_1011: list[dict[str, Any]]
    gauges: list[dict[str, Any]]  # samples: server, t, name, value, final
    db: Snapshot
    coded: list[dict[str, Any]] = field(default_factory=list)  # error frames with a WATCHED_CODES code
    windows: list[dict[str, Any]] = field(default_factory=list)  # storage faults: kind, start, end
    absorb: float = 10.0  # storage faults shorter than this must be invisible; after longer ones, this long to answer
    watches: list[Watch] = field(default_factory=list)


def check(observed: Observed) -> dict[str, list[dict[str, Any]]]:
    """Every violation found, by kind (the keys of VIOLATIONS), each with what the lead needs to look into it."""
    found: dict[str, list[dict[str, Any]]] = {kind: [] for kind in VIOLATIONS}
    users: dict[tuple[str, str], list[dict]] = collections.defaultdict(list)
    replies_by_user: dict[int, list[dict]] = collections.defaultdict(list)
    replies_by_tag: dict[tuple[str, str], list[dict]] = collections.defaultdict(list)
    followed = {session.id: session for session in observed.sessions}
    for row in observed.db.messages:
        if row["role"] == "user":
            users[(row["session_id"], row["content"])].append(row)
        elif row["role"] == "assistant":
            if row.get("reply_to_id") is not None:
                replies_by_user[row["reply_to_id"]].append(row)
            else:
                match = TAG.match(row["content"])
                if match:
                    replies_by_tag[(row["session_id"], match.group(1))].append(row)
            if row["status"] == "incomplete":
                session = observed.db.sessions.get(row["session_id"], {})
                client = followed.get(row["session_id"])
                found["incomplete"].append(
                    {
                        "session": row["session_id"],
                        "row": row["id"],
                        "chars": len(row["content"]),
                        "session ended": session.get("end_reason") or "no",
                        "client": client.client if client else None,
                        "resumable": session.get("resumable"),
                    }
                )

    def where(session: Session) -> dict[str, Any]:
        return {
            "session": session.id,
            "client": session.client,
            "resumable": session.resumable,
            "stream": session.stream,
        }

    def rows_of(session: Session, post: Post) -> tuple[list[dict], list[dict]]:
        saved = users.get((session.id, post.text), [])
        replies = [r for user_row in saved for r in replies_by_user.get(user_row["id"], [])]
        return saved, replies + replies_by_tag.get((session.id, post.tag), [])

    def brief(rows: list[dict]) -> list[str]:
        return [f"row {r['id']} {r['role']} {r['status']} {len(r['content'])} chars" for r in rows]

    for session in observed.sessions:
        for post in session.posts:
            saved, replies = rows_of(session, post)
            sent = f"t={post.sent:.1f}s to server {post.server}"
            # A regeneration adds a reply to the same message: as many replies as were asked for, no more.
            regenerated = [p for p in session.posts if p.regenerates is not None and p.text == post.text]
            asked = 1 + sum(not p.fate.startswith("refused") for p in regenerated)
            if post.regenerates is None and (len(saved) > 1 or len(replies) > asked):
                same = [p for p in session.posts if p.tag == post.tag]
                fates = [f"{'regenerate' if p.regenerates else 'post'} {p.fate}" for p in same]
                found["duplicated"].append(
                    {
                        **where(session),
                        "message": post.tag,
                        "rows": brief(saved + replies),
                        "sent": fates,
                        "t": round(post.sent, 1),
                        "history": session.history,
                    }
                )
            never_refused = post.fate == "dropped" and not post.in_doubt
            if not saved and (post.fate == "accepted" or never_refused):
                found["lost"].append(
                    {
                        **where(session),
                        "message": post.tag,
                        "sent": sent,
                        "fate": post.fate,
                        "t": round(post.sent, 1),
                        "history": session.history,
                    }
                )
            if saved and post.fate == "dropped":
                found["silent"].append(
                    {
                        **where(session),
                        "message": post.tag,
                        "sent": sent + (" (its socket closed before an answer)" if post.in_doubt else ""),
                        "t": round(post.sent, 1),
                        "rows": brief(saved + replies),
                        "history": session.history,
                    }
                )
            if post.turn is None:
                continue
            problem = reply_problem(post, post.turn, closest(post.turn, replies), session.stream)
            if problem:
                seen = post.turn.message if post.turn.message is not None else "".join(post.turn.deltas)
                found["mismatched"].append(
                    {
                        **where(session),
                        "message": post.tag,
                        "problem": problem,
                        "t": round(post.turn.started, 1),
                        "frames": post.turn.types,
                        "seen": seen[:100],
                        "saved": [(r["status"], r["content"][:100]) for r in replies],
                        "history": session.history,
                    }
                )
        for turn in session.turns:
            if turn.ended:
                continue
            if turn.end == "cut" or (turn.end or "").startswith(("resume refused", "resume failed", "post refused")):
                continue  # the socket of a plain session was lost, or the server refused the resume: over, not wedged
            rows = rows_of(session, turn.post) if turn.post else ([], [])
            found["wedged"].append(
                {
                    **where(session),
                    "message": turn.post.tag if turn.post else None,
                    "started": f"t={turn.started:.1f}s seq {turn.seq} on server {turn.server}",
                    "t": round(turn.started, 1),
                    "frames": turn.types,
                    "rows": brief(rows[0] + rows[1]),
                    "history": session.history,
                }
            )
        for turn in session.again:
            first, saved = turn.answer_to.turn, rows_of(session, turn.answer_to)
            found["duplicated"].append(
                {
                    **where(session),
                    "message": turn.answer_to.tag,
                    "answered again": f"t={turn.started:.1f}s seq {turn.seq} on server {turn.server}: {turn.types}",
                    "first answer": f"t={first.started:.1f}s seq {first.seq} on server {first.server}: {first.types}",
                    "rows": brief(saved[0] + saved[1]),
                    "t": round(turn.started, 1),
                    "history": session.history,
                }
            )
        if session.resumable:
            gaps = [seq for seq in range(1, session.max_seq) if seq not in session.frames]
            seqs = (("gaps", gaps), ("reused", session.conflicts), ("doubled", session.doubled))
            for kind, items in (*seqs, ("out of order", session.out_of_order)):
                if items:
                    found["seq"].append(
                        {**where(session), kind: items[:10], "count": len(items), "history": session.history}
                    )
        for code in session.double_answers:
            found["resume_answers"].append({**where(session), "then": code, "history": session.history})
        if session.taken:
            first = float(session.taken[0][2:].split("s", 1)[0])
            found["ended_under_client"].append(
                {**where(session), "what": session.taken, "t": first, "history": session.history}
            )
    found["closed_1011"] = list(observed.closes_1011)
    for sid, row in observed.db.sessions.items():
        if not row["ended"]:
            client = followed.get(sid)
            found["open_sessions"].append(
                {
                    "session": sid,
                    **{k: v for k, v in row.items() if k != "id"},
                    "client": client.client if client else None,
                    "client saw": client.outcome if client else "never its session_start",
                }
            )
    by_client: dict[int, list[Session]] = collections.defaultdict(list)
    for session in observed.sessions:
        by_client[session.client].append(session)
    for client, sessions in sorted(by_client.items()):
        if not any(t.message is not None for s in sessions for t in s.turns):
            fates = collections.Counter(p.fate for s in sessions for p in s.posts)
            found["no_progress"].append({"client": client, "sessions": len(sessions), "posts": dict(fates)})
    for sample in observed.gauges:
        if sample["value"] < 0 or (sample["final"] and sample["value"] != 0):
            found["gauges"].append(sample)
    by_id = {row["id"]: row for row in observed.db.messages}
    for row in observed.db.messages:
        if row["role"] != "assistant" or "parent_id" not in row:
            continue  # servers before issue 29 keep no tree
        parent = by_id.get(row["parent_id"])
        if parent is None or parent["role"] != "user" or parent["session_id"] != row["session_id"]:
            found["tree"].append(
                {
                    "session": row["session_id"],
                    "row": row["id"],
                    "parent": row["parent_id"],
                    "parent is": f"{parent['role']} of session {parent['session_id']}" if parent else "missing",
                }
            )
    for watch in observed.watches:
        found["watchers"] += watch_problems(watch, followed.get(watch.session), rows_of, observed.db)
    for error in observed.coded:
        if error["code"] == "internal_error":
            found["internal_error"].append(error)
        elif error["code"] == "storage_unavailable":
            problem = storage_problem(error["t"], observed.windows, observed.absorb)
            if problem:
                found["storage_unavailable"].append({**error, "problem": problem})
    return found


def watch_problems(watch: Watch, session: Session | None, rows_of: Any, db: Snapshot) -> list[dict[str, Any]]:
    """What a watcher got wrong: seq gaps, doubles and disorder; replies it assembled that differ from the saved ones;
    snapshot messages that are not saved."""
    where = {"watcher": watch.watcher, "session": watch.session, "holder": watch.holder, "server": watch.server}
    where["t"], where["end"] = round(watch.started, 1), watch.end
    problems = []
    seqs = sorted(watch.frames)
    gaps = [s for s in range(seqs[0], seqs[-1]) if s not in watch.frames and s not in watch.excused] if seqs else []
    for kind, items in (("gaps", gaps), ("doubles", watch.doubles), ("out of order", watch.out_of_order)):
        if items:
            problems.append({**where, kind: items[:10], "count": len(items)})
    saved = [m for m in db.messages if m["session_id"] == watch.session]
    for message in (m for snapshot in watch.snapshots for m in snapshot.get("messages", [])):
        role, content, status = message.get("role"), message.get("content"), message.get("status")
        if not any(m["role"] == role and m["content"] == content for m in saved) and status != "failed":
            problems.append({**where, "problem": f"a snapshot {role} message ({status}) is not saved", "seen": content})
    for turn in watch.turns:
        if not turn.ended:
            continue  # the watch ended first: nothing to judge
        seen = turn.message if turn.message is not None else turn.text
        match = TAG.match(seen)
        problem = None
        post = session.by_tag.get(match.group(1)) if match and session else None
        if match is None:
            if turn.message is not None or (len(seen) > 25 and not turn.errors):
                problem = "the reply the watcher assembled does not begin as the model's replies do"
        elif post is None:
            problem = "a reply to a message its session never sent"
        else:
            replies = rows_of(session, post)[1]
            row = replies[0] if replies else None
            if turn.message is not None and turn.text and turn.text != turn.message:
                problem = "the snapshot's partial and the deltas do not add up to the message"
            elif turn.message is not None and (row is None or row["content"] != turn.message):
                problem = "the message the watcher got is not the saved reply"
            elif turn.message is None and not turn.errors and row is not None and row["status"] != "cancelled":
                # A cancelled turn (chatbot_cancel, or a plain session's holder socket gone) ends so; nothing else does.
                problem = f"processing_end with neither a message nor an error, the reply saved {row['status']}"
            elif turn.message is None and not post.expected.startswith(turn.text):
                problem = "the partial reply the watcher assembled is not a beginning of the model's reply"
            elif (
                turn.message is None
                and row is not None
                and not (row["content"].startswith(turn.text) or turn.text.startswith(row["content"]))
            ):
                problem = "the saved partial reply and the one the watcher assembled disagree"
        if problem:
            rows = rows_of(session, post)[1] if post else []
            problems.append(
                {
                    **where,
                    "problem": problem,
                    "joined mid-reply": turn.from_partial,
                    "seen": seen[:100],
                    "errors": turn.errors,
                    "saved": [(r["status"], r["content"][:100]) for r in rows],
                }
            )
    return problems


def storage_problem(t: float, windows: list[dict[str, Any]], absorb: float) -> str | None:
    """Why a `storage_unavailable` the client got at `t` should not have come; None if a storage fault explains it.

    A storage fault explains it from its start to `absorb` (the retry window) plus 3 s after its end, and only if
    it lasted longer than `absorb` - 1 s: a shorter one is to be waited out, unseen (issue 26).
    """
    covering = [w for w in windows if w["start"] - 1 <= t <= (w["end"] if w["end"] is not None else t) + absorb + 3]
    if not covering:
        return "no storage fault in progress nor just over"
    if max((w["end"] if w["end"] is not None else t) - w["start"] for w in covering) >= absorb - 1:
        return None
    latest = max(covering, key=lambda w: w["start"])  # the one that most likely caused it, to name
    lasted = (latest["end"] if latest["end"] is not None else t) - latest["start"]
    kind, start = latest["kind"], latest["start"]
    return f"after a storage fault of {lasted:.1f} s ({kind} at t={start}s), shorter than the retry window"


def closest(turn: Turn, replies: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The saved reply that is this turn's (a regenerated message has several, of the same text)."""
    if len(replies) < 2:
        return replies[0] if replies else None
    seen = turn.message if turn.message is not None else "".join(turn.deltas)
    for row in replies:
        if row["content"] == seen and (turn.message is None or row["status"] == "complete"):
            return row
    return next((r for r in replies if r["content"].startswith(seen) or seen.startswith(r["content"])), replies[0])


def reply_problem(post: Post, turn: Turn, row: dict[str, Any] | None, stream: bool) -> str | None:
    """What is wrong between the reply the client assembled, the saved one and what the model said; None if nothing."""
    seen = "".join(turn.deltas)
    if turn.message is not None:
        if stream and not turn.deltas:
            return "a streamed message answered without a message_delta"
        if stream and seen != turn.message:
            return "the deltas do not add up to the message"
        if turn.message != post.expected:
            return "the message is not the model's reply to this message"
        if row is None:
            return "the reply the client received is not saved"
        if row["content"] != turn.message:
            return "the saved reply differs from the message the client received"
        if row["status"] != "complete":
            return f"the reply the client received whole is saved as {row['status']}"
        return None
    if not post.expected.startswith(seen):
        return "the deltas are not a beginning of the model's reply"
    if turn.ended and not turn.errors:
        return "processing_end with neither a message nor an error"
    if row is None:
        return None  # nothing was saved of a reply cut short (no checkpoint yet): allowed
    saved = row["content"]
    if row["status"] == "complete" and saved != post.expected:
        return "a reply saved as complete is not the whole reply"
    if row["status"] in ("interrupted", "cancelled", "incomplete") and not post.expected.startswith(saved):
        return "the saved partial reply is not a beginning of the model's reply"
    if not (seen.startswith(saved) or saved.startswith(seen)):
        return "the saved partial reply and the deltas the client saw disagree"
    return None


# The soak ------------------------------------------------------------------------------------------------


class Soak:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = random.Random(f"{args.seed}-faults")
        self.t0 = now()
        self.logdir = Path(args.logs)
        self.stopping = False
        self.stopped = asyncio.Event()
        self.hard_stop = False
        self.settle_deadline = float("inf")
        self.servers: list[Server] = []
        self.clients: list[Client] = []
        self.auth_headers: dict[str, str] = {}
        self.closes: collections.Counter[int] = collections.Counter()
        self.closes_1011: list[dict[str, Any]] = []
        self.refusals: collections.Counter[str] = collections.Counter()
        self.faults: collections.Counter[str] = collections.Counter()
        self.timeline: list[str] = []
        self.gauge_samples: list[dict[str, Any]] = []
        self.coded: list[dict[str, Any]] = []  # error frames with a WATCHED_CODES code, as the clients got them
        self.windows: list[dict[str, Any]] = []  # the storage faults: kind, start, end (seconds into the run)
        self.connect_failures = self.resumes = self.posts = self.turns_started = self.resume_failed = 0
        self.watchers: list[Watcher] = []
        self.watch_ends: collections.Counter[str] = collections.Counter()
        self.watch_unsupported = False  # the servers answer chatbot_session_watch unknown_action (before issue 28)
        self.watch_restarts = 0  # watches that started over (a second session_watching: frames lost, and told)
        self.regenerate_unsupported = False  # chatbot_regenerate, likewise (before issue 29)
        self.regenerations = 0

    def log(self, event: str) -> None:
        line = f"{now() - self.t0:7.1f}s {event}"
        self.timeline.append(line)
        if self.args.verbose:
            print(line, flush=True)

    # Set-up ------------------------------------------------------------------------------------

    def server_env(self, database_url: str, redis_url: str, model_port: int) -> dict[str, str]:
        a = self.args
        dropped = ("OPENAI_", "R2D2_", "DATABASE_URL", "REDIS_URL", "PROMETHEUS_MULTIPROC_DIR")
        env = {k: v for k, v in os.environ.items() if not k.startswith(dropped)}
        env.update(
            {
                "PYTHONUNBUFFERED": "1",
                "DJANGO_SETTINGS_MODULE": "r2d2site.settings",
                "DJANGO_DEBUG": "0",
                "DJANGO_SECRET_KEY": SECRET_KEY,
                "DJANGO_SECURE_SSL_REDIRECT": "0",
                "DATABASE_URL": database_url,
                "REDIS_URL": redis_url,
                "OPENAI_BASE_URL": f"http://127.0.0.1:{model_port}/v1",
                "OPENAI_API_KEY": "sk-chaos-0123456789",
                "R2D2_WEB_PROCESSES": "1",
                "R2D2_REQUIRE_AUTH": "1" if a.auth else "0",
                "R2D2_QUOTA_MESSAGES_PER_MINUTE": "0",
                "R2D2_QUOTA_TOKENS_PER_DAY": "0",
                "R2D2_QUOTA_MAX_SESSIONS": "0",
                "R2D2_RATE_LIMIT_PER_MINUTE": "0",
                "R2D2_MAX_CONNECTIONS_PER_ADDRESS": "0",  # every client is 127.0.0.1
                "R2D2_MAX_CONNECTIONS_PER_PRINCIPAL": "0",  # one key for all, and a killed process's sockets linger
                "R2D2_LOG_LEVEL": "INFO",
                # Liveness on the scale of the run (production: 10/45/60/300/30/60 s).
                "R2D2_HEARTBEAT_SECONDS": "1",
                "R2D2_PROCESS_STALE_SECONDS": str(a.stale_seconds),
                "R2D2_ORPHAN_SWEEP_SECONDS": "2",
                "R2D2_RESUME_WINDOW_SECONDS": str(a.resume_window),
                "R2D2_DRAIN_SECONDS": "10",
                "R2D2_UPSTREAM_TIMEOUT": "20",
            }
        )
        if a.storage_retry is not None:  # unset: the servers' default (10 s)
            env["R2D2_STORAGE_RETRY_SECONDS"] = f"{a.storage_retry:g}"
        return env

    def start_model(self, port: int) -> subprocess.Popen:
        """testkit/fake_llm.py in its own process: it echoes each message, one word every 50 ms."""
        with open(self.logdir / "model.log", "ab") as log:
            model = subprocess.Popen(
                [PYTHON, "-m", "testkit.fake_llm", "--port", str(port), "--ttft", "0.1", "--token-delay", "0.05"],
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_for_port(port, model)
        return model

    def manage(self, env: dict[str, str], *command: str) -> str:
        done = subprocess.run(
            [PYTHON, "manage.py", *command],
            cwd=self.args.server_root,
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )
        if done.returncode:
            raise SystemExit(f"chaos: manage.py {command[0]} failed:\n{done.stderr[-2000:]}")
        return done.stdout

    # Faults ------------------------------------------------------------------------------------

    def outage_times(self) -> list[float]:
        """When the PostgreSQL outages start (seconds into the run): a third of the way in, then every so often."""
        a = self.args
        if "pg-outage" not in a.faults:
            return []
        run, first = a.minutes * 60, min(a.pg_outage_first, a.minutes * 60 / 3)
        times = [first]
        while times[-1] + a.pg_outage_every + a.pg_outage_seconds + 10 < run:
            times.append(times[-1] + a.pg_outage_every)
        return times

    async def fault_loop(self) -> None:
        kinds = [k for k in self.args.faults if k != "pg-outage"]  # outages come at set times, not at random
        outages = self.outage_times()
        outage: asyncio.Task | None = None
        while (kinds or outages) and not self.stopping:
            wait = self.args.fault_every * self.rng.uniform(0.5, 1.5)
            if outages:
                wait = max(0.0, min(wait, outages[0] - (now() - self.t0)))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopped.wait(), wait)
            if self.stopping:
                break
            if outages and now() - self.t0 >= outages[0]:
                outages.pop(0)
                outage = asyncio.create_task(self.fault("pg-outage"), name="pg-outage")
                continue
            # While PostgreSQL is out, only what the network and Redis do (no server starts nor restarts of it).
            out = outage is not None and not outage.done()
            choices = [k for k in kinds if k in DURING_OUTAGE] if out else kinds
            if not choices:
                continue
            kind = self.rng.choice(choices)
            try:
                await self.fault(kind)
            except Exception as exc:  # a fault that failed to apply is reported, the soak goes on
                self.log(f"fault {kind} failed: {exc!r}")
                self.faults[f"{kind} (failed)"] += 1
        if outage is not None:
            await outage  # PostgreSQL is up for the settling

    @contextlib.asynccontextmanager
    async def window(self, kind: str, **what: Any):
        """Record a storage fault's window: from just before it starts to when the service answers again."""
        record = {"kind": kind, "start": round(now() - self.t0, 2), "end": None, **what}
        self.windows.append(record)
        try:
            yield record
        finally:
            record["end"] = round(now() - self.t0, 2)

    async def fault(self, kind: str) -> None:
        self.faults[kind] += 1
        if kind == "pg-outage":
            try:
                async with self.window(kind):
                    self.log(f"PostgreSQL outage: stop it (pg_ctl stop -m fast) for {self.args.pg_outage_seconds:g} s")
                    await asyncio.to_thread(self.pg.down)
                    await asyncio.sleep(self.args.pg_outage_seconds)
                    await asyncio.to_thread(self.pg.up)
                self.log("PostgreSQL up after the outage")
            except Exception as exc:
                self.log(f"fault pg-outage failed: {exc!r}")
                self.faults["pg-outage (failed)"] += 1
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(self.pg.up)
        elif kind == "redis-reset":
            async with self.window(kind) as record:
                record["killed"] = await asyncio.to_thread(self.reset_redis)
            self.log(f"Redis: CLIENT KILL of every client connection, no restart ({record['killed']} connections)")
        elif kind == "cut":
            linked = [c for c in self.clients if c.link is not None]
            victims = self.rng.sample(linked, min(len(linked), self.rng.randint(1, 3)))
            for client in victims:
                client.link.abort()
            self.log(f"cut the sockets of clients {[c.index for c in victims]}")
        elif kind == "redis":
            self.log("restart Redis")
            async with self.window(kind):
                await asyncio.to_thread(self.redis.stop)
                await asyncio.sleep(self.rng.uniform(0.2, 1.5))
                await asyncio.to_thread(self.redis.start)
            self.log("Redis up")
        elif kind == "pg":
            self.log("restart PostgreSQL (pg_ctl restart -m fast)")
            async with self.window(kind):
                await asyncio.to_thread(self.pg.restart)
            self.log("PostgreSQL up")
        elif kind in ("kill", "kill+redis"):
            server = self.rng.choice(self.servers)
            self.log(f"SIGKILL server {server.index} (pid {server.process.pid})")
            server.signal(signal.SIGKILL)
            await asyncio.to_thread(server.wait, 10)
            if kind == "kill+redis":
                self.log("restart Redis (its holder just died)")
                async with self.window(kind):
                    await asyncio.to_thread(self.redis.stop)
                    await asyncio.to_thread(self.redis.start)
            await asyncio.sleep(self.rng.uniform(0.5, 2.0))
            await self.restart(server)
        elif kind == "term":
            server = self.rng.choice(self.servers)
            self.log(f"SIGTERM server {server.index} (pid {server.process.pid}): drain")
            server.signal(signal.SIGTERM)
            if not await asyncio.to_thread(server.wait, 25):
                self.log(f"server {server.index} still running 25 s after SIGTERM: SIGKILL")
                self.faults["term (drain overran)"] += 1
                server.signal(signal.SIGKILL)
                await asyncio.to_thread(server.wait, 10)
            self.log(f"server {server.index} exited {server.process.returncode}")
            await self.restart(server)

    def reset_redis(self) -> int:
        """`CLIENT KILL TYPE normal`, then `TYPE pubsub`: every server connection dropped, Redis running on."""
        import redis

        client = redis.Redis(host="127.0.0.1", port=self.redis.port, socket_timeout=5)
        try:
            return sum(client.client_kill_filter(_type=kind, skipme=True) for kind in ("normal", "pubsub"))
        finally:
            client.close()

    async def restart(self, server: Server) -> None:
        for attempt in range(3):
            server.start(now() - self.t0)
            try:
                await asyncio.to_thread(server.ready)
            except RuntimeError as exc:  # exited at once, or never listened: try again
                self.log(f"server {server.index} did not start ({exc}); attempt {attempt + 1}")
                server.signal(signal.SIGKILL)
                await asyncio.sleep(1)
                continue
            self.log(f"server {server.index} up again (pid {server.process.pid})")
            return
        raise RuntimeError(f"server {server.index} would not start: see {server.log}")

    async def sample_gauges(self, final: bool = False) -> None:
        for server in self.servers:
            values = await asyncio.to_thread(server.gauges)
            for name, value in (values or {}).items():
                if value < 0 or final:
                    self.gauge_samples.append(
                        {
                            "server": server.index,
                            "pid": server.process.pid,
                            "t": round(now() - self.t0, 1),
                            "name": name,
                            "value": value,
                            "final": final,
                        }
                    )

    async def gauge_loop(self) -> None:
        while not self.stopping:
            await self.sample_gauges()
            await asyncio.sleep(2)

    # The run -----------------------------------------------------------------------------------

    async def run(self) -> Observed:
        a = self.args
        for name in ("server-0.log", "server-1.log", "redis.log", "model.log", "postgres.log"):
            (self.logdir / name).unlink(missing_ok=True)  # this run's logs only, to read beside its timeline
        self.log(f"logs in {self.logdir}")
        self.workdir = Path(tempfile.mkdtemp(prefix="r2d2-chaos-"))
        os.chmod(self.workdir, 0o755)
        self.pg = Postgres(self.workdir, self.logdir)
        self.redis = PrivateRedis(log_path=self.logdir / "redis.log")
        self.model: subprocess.Popen | None = None
        try:
            await asyncio.to_thread(self.pg.start)
            await asyncio.to_thread(self.redis.start)
            model_port = free_port()
            self.model = await asyncio.to_thread(self.start_model, model_port)
            env = self.server_env(self.pg.url, self.redis.url, model_port)
            await asyncio.to_thread(self.manage, env, "migrate", "-v", "0")
            if a.auth:
                out = await asyncio.to_thread(
                    self.manage,
                    env,
                    "create_api_key",
                    "chaos",
                    "--messages-per-minute",
                    "0",
                    "--tokens-per-day",
                    "0",
                    "--max-sessions",
                    "0",
                )
                self.auth_headers = {"Authorization": f"Bearer {out.strip().splitlines()[-1].strip()}"}
            self.servers = [Server(i, env, self.logdir, Path(a.server_root)) for i in range(2)]
            for server in self.servers:
                server.start(0.0)
            for server in self.servers:
                await asyncio.to_thread(server.ready)
            self.t0 = now()
            self.log(
                f"servers on {[s.port for s in self.servers]}, PostgreSQL {self.pg.port}, Redis {self.redis.port},"
                f" model {model_port}"
            )
            kinds = [(r, s) for r in (True, False) for s in (True, False)]
            self.clients = [Client(self, i, *kinds[i % 4]) for i in range(a.clients)]
            tasks = [asyncio.create_task(c.run(), name=f"client-{c.index}") for c in self.clients]
            self.watchers = [Watcher(self, i) for i in range(a.watchers)]
            watching = [asyncio.create_task(w.run(), name=f"watcher-{w.index}") for w in self.watchers]
            faults = asyncio.create_task(self.fault_loop(), name="faults")
            gauges = asyncio.create_task(self.gauge_loop(), name="gauges")
            done, _ = await asyncio.wait(tasks, timeout=a.minutes * 60, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:  # a client that fails is a bug of the soak: stop at once, loudly
                if task.exception() is not None:
                    raise task.exception()

            self.stopping = True
            self.stopped.set()
            self.log("clients stop posting; faults stop")
            await faults
            await gauges
            for task in watching:  # they unwatch when the clients stop posting
                await task
            for server in self.servers:  # every service up for the settling
                if not server.running:
                    await self.restart(server)
            self.settle_deadline = now() + a.settle_seconds
            done, pending = await asyncio.wait(tasks, timeout=a.settle_seconds + 60)
            self.hard_stop = True
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            for task in done:
                if task.exception() is not None:
                    raise task.exception()
            self.log(f"clients done ({len(pending)} cancelled); waiting for the sweep")

            sweep_deadline = now() + a.resume_window + a.stale_seconds + 15
            while now() < sweep_deadline:
                db = await asyncio.to_thread(snapshot, self.pg.url)
                if all(row["ended"] for row in db.sessions.values()):
                    break
                await asyncio.sleep(1)
            await asyncio.sleep(1)
            await self.sample_gauges(final=True)
            db = await asyncio.to_thread(snapshot, self.pg.url)
            self.log("checked the database")
            sessions = [s for c in self.clients for s in c.sessions]
            watches = [w for watcher in self.watchers for w in watcher.watches]
            return Observed(
                sessions, self.closes_1011, self.gauge_samples, db, self.coded, self.windows, a.absorb_seconds, watches
            )
        finally:
            self.hard_stop = True
            for server in self.servers:
                await asyncio.to_thread(server.stop)
            if self.model is not None:
                self.model.terminate()
                self.model.wait(10)
            self.redis.stop()
            self.pg.stop()
            if a.keep:
                print(f"kept the PostgreSQL cluster: {self.pg.data} (start it with pg_ctl -D ... start as postgres)")
            else:
                shutil.rmtree(self.workdir, ignore_errors=True)


# Reporting ---------------------------------------------------------------------------------------------


def figures(soak: Soak, observed: Observed) -> dict[str, Any]:
    turns = [t for s in observed.sessions for t in s.turns]
    answered = sum(t.message is not None for t in turns)
    interrupted = sum("turn_interrupted" in t.errors for t in turns)
    errors = collections.Counter(code for t in turns for code in t.errors)
    cut = sum(t.end == "cut" for t in turns)
    outcomes = collections.Counter(re.sub(r"\(\d+\)", "", s.outcome or "unfinished").strip() for s in observed.sessions)
    return {
        "sessions": len(observed.sessions),
        "resumable_sessions": sum(s.resumable for s in observed.sessions),
        "posts": soak.posts,
        "turns": len(turns),
        "answered": answered,
        "turn_interrupted": interrupted,
        "turn_errors": dict(errors),
        "cut_with_their_socket": cut,
        "resumes": soak.resumes,
        "refusals": dict(soak.refusals),
        "closes_by_code": {str(k): v for k, v in sorted(soak.closes.items())},
        "connect_failures": soak.connect_failures,
        "session_outcomes": dict(outcomes),
        "anomalies": sum(len(s.anomalies) for s in observed.sessions),
        "faults": dict(soak.faults),
        "resume_failed": soak.resume_failed,
        "error_codes_watched": dict(collections.Counter(e["code"] for e in observed.coded)),
        "storage_faults": storage_figures(observed),
        "regenerations": soak.regenerations,
        "regenerations_answered": sum(
            p.regenerates is not None and p.turn is not None and p.turn.message is not None
            for s in observed.sessions
            for p in s.posts
        ),
        "watches": len(observed.watches),
        "watched_turns_judged": sum(t.ended for w in observed.watches for t in w.turns),
        "watched_turns_joined_mid_reply": sum(t.ended and t.from_partial for w in observed.watches for t in w.turns),
        "watched_frames": sum(len(w.frames) for w in observed.watches),
        "watch_ends": dict(soak.watch_ends),
        "watch_restarts": soak.watch_restarts,
        "watched_turns_left_open": sum(w.left_open() for w in observed.watches),
    }


def storage_figures(observed: Observed) -> dict[str, Any]:
    """Per kind of storage fault: how many, how long (s), and the storage_unavailable answers in their windows."""
    out: dict[str, Any] = {}
    for w in observed.windows:
        entry = out.setdefault(w["kind"], {"count": 0, "seconds_max": 0.0, "seconds_total": 0.0})
        lasted = (w["end"] or w["start"]) - w["start"]
        entry["count"] += 1
        entry["seconds_max"] = round(max(entry["seconds_max"], lasted), 2)
        entry["seconds_total"] = round(entry["seconds_total"] + lasted, 2)
    for error in observed.coded:
        if error["code"] != "storage_unavailable":
            continue
        t = error["t"]
        near = [w for w in observed.windows if w["start"] - 1 <= t <= (w["end"] or t) + observed.absorb + 3]
        if near:  # counted for the latest fault before it
            kind = max(near, key=lambda w: w["start"])["kind"]
            out[kind]["storage_unavailable"] = out[kind].get("storage_unavailable", 0) + 1
    return out


def print_report(args: argparse.Namespace, figs: dict[str, Any], found: dict[str, list], details: int) -> int:
    faults = sum(v for k, v in figs["faults"].items() if "(" not in k)
    print()
    print(
        f"chaos soak: {args.minutes:g} min, {args.clients} clients, seed {args.seed}, 2 servers, a fault every"
        f" ~{args.fault_every:g} s ({', '.join(args.faults) or 'none'})"
    )
    print(f"  faults      {faults}: " + ", ".join(f"{k} {v}" for k, v in sorted(figs["faults"].items())))
    print(
        f"  turns       {figs['turns']} started, {figs['answered']} answered whole, {figs['turn_interrupted']}"
        f" turn_interrupted, errors {figs['turn_errors'] or 0}, {figs['cut_with_their_socket']} cut with their"
        " (non-resumable) socket"
    )
    print(
        f"  sessions    {figs['sessions']} ({figs['resumable_sessions']} resumable), {figs['resumes']} resumes;"
        f" outcomes {figs['session_outcomes']}"
    )
    print(f"  refusals    {figs['refusals'] or 0}; {figs['resume_failed']} session_end resume_failed")
    print(f"  regenerate  {figs['regenerations']} asked, {figs['regenerations_answered']} answered whole")
    print(f"  storage     {figs['storage_faults'] or 'no storage faults'}; codes seen {figs['error_codes_watched']}")
    print(
        f"  watches     {figs['watches']} ({figs['watch_ends']}), {figs['watched_frames']} frames,"
        f" {figs['watched_turns_judged']} turns judged ({figs['watched_turns_joined_mid_reply']} joined mid-reply),"
        f" {figs['watch_restarts']} started over, {figs['watched_turns_left_open']} turns left open"
    )
    print(f"  closes      {figs['closes_by_code']}; {figs['connect_failures']} failed connection attempts")
    total = 0
    print("violations:")
    for kind, label in VIOLATIONS.items():
        count = len(found[kind])
        total += count
        print(f"  {count:5d}  {kind:19s} {label}")
    for kind in VIOLATIONS:
        for item in found[kind][:details]:
            if "history" in item:  # the whole history is in the JSON
                item = {**item, "history": around(item["history"], item.get("t"))}
            print(f"-- {kind}: {json.dumps(item, default=str)}")
        if len(found[kind]) > details:
            print(f"-- {kind}: ... {len(found[kind]) - details} more in the JSON")
    print(f"{'FAIL' if total else 'PASS'}: {total} violations")
    return total


def around(history: list[str], t: float | None, lines: int = 10) -> list[str]:
    """The lines of a session's history from just before `t` (the incident), or its last ones."""
    if t is None:
        return history[-lines:]
    later = [line for line in history if float(line.split("s", 1)[0]) >= t - 3]
    return later[:lines] or history[-lines:]


def inject(observed: Observed, kind: str) -> Observed | None:
    """A copy of `observed` with one fault of `kind` the checker must catch (None: nothing to inject it into)."""
    o = copy.deepcopy(observed)
    complete = [(s, p) for s in o.sessions for p in s.posts if p.turn is not None and p.turn.message is not None]
    resumable = [s for s in o.sessions if s.resumable and s.max_seq >= 3]
    if kind == "lost" and complete:
        session, post = complete[0]
        o.db.messages = [m for m in o.db.messages if not (m["session_id"] == session.id and m["content"] == post.text)]
    elif kind == "silent" and complete:
        session, post = complete[0]
        session.turns.remove(post.turn)
        post.turn, post.fate = None, "dropped"
    elif kind == "wedged" and complete:
        _, post = complete[0]
        post.turn.ended, post.turn.end = False, "settle timeout"
    elif kind == "mismatched" and complete:
        session, post = complete[0]
        row = next(m for m in o.db.messages if m["role"] == "assistant" and m["content"] == post.turn.message)
        row["content"] += " (tampered)"
    elif kind == "seq" and resumable:
        session = resumable[0]
        seq = min(session.frames)
        session.note_seq(seq, session.frames[seq].replace('"type"', '"type" ', 1))  # a seq again, other bytes
    elif kind == "closed_1011":
        o.closes_1011.append({"client": 0, "server": 0, "session": None, "injected": True})
    elif kind == "open_sessions" and o.db.sessions:
        next(iter(o.db.sessions.values()))["ended"] = False
    elif kind == "incomplete" and complete:
        _, post = complete[0]
        next(m for m in o.db.messages if m["role"] == "assistant" and m["content"] == post.turn.message)["status"] = (
            "incomplete"
        )
    elif kind == "duplicated" and complete:
        _, post = complete[0]
        row = next(m for m in o.db.messages if m["role"] == "assistant" and m["content"] == post.turn.message)
        o.db.messages.append({**row, "id": -1})
    elif kind == "ended_under_client" and o.sessions:
        o.sessions[0].taken.append("t=0s a post refused: session_ended (injected)")
    elif kind == "resume_answers" and o.sessions:
        o.sessions[0].double_answers.append("internal_error")
    elif kind == "no_progress" and complete:
        session, _ = complete[0]
        for other in o.sessions:
            if other.client == session.client:
                for turn in other.turns:
                    turn.message = None
    elif kind == "gauges":
        o.gauges.append({"server": 0, "t": 0, "name": "r2d2_live_sessions", "value": -1.0, "final": False})
    elif kind == "watchers" and any(t.ended and t.message for w in o.watches for t in w.turns):
        # One watched delta lost (a gap in the watched text), one watched frame received twice.
        watch, turn = next((w, t) for w in o.watches for t in w.turns if t.ended and t.message)
        turn.text = turn.message[:10] + turn.message[12:]
        watch.doubles.append(max(watch.frames))
    elif kind == "tree" and any("parent_id" in m for m in o.db.messages):
        replies = [m for m in o.db.messages if m["role"] == "assistant" and "parent_id" in m]
        replies[0]["parent_id"] = replies[-1]["id"]  # a reply answering a reply
    elif kind == "internal_error":
        o.coded.append({"t": 1.0, "code": "internal_error", "client": 0, "server": 0, "session": None, "frame": "?"})
    elif kind == "storage_unavailable":
        # One with no storage fault near it, one after a fault the retries should have absorbed, one allowed.
        o.windows += [
            {"kind": "pg", "start": -100.0, "end": -99.7},
            {"kind": "pg-outage", "start": -300.0, "end": -270.0},
        ]
        for t in (-50.0, -99.5, -275.0):
            o.coded.append({"t": t, "code": "storage_unavailable", "client": 0, "server": 0, "session": None})
    else:
        return None
    return o


def self_check(observed: Observed, base: dict[str, list]) -> bool:
    print("\nself-check: one injected fault of each kind, into a copy of what this run observed")
    ok = True
    for kind in VIOLATIONS:
        tampered = inject(observed, kind)
        if tampered is None and kind == "tree":
            print(f"  {kind:19s} no parent_id column: servers before issue 29")
            continue
        if tampered is None and kind == "watchers" and not any(w.frames for w in observed.watches):
            print(f"  {kind:19s} nothing watched: servers without chatbot_session_watch (issue 28), or --watchers 0")
            continue
        if tampered is None:
            print(f"  {kind:19s} nothing to inject into (run longer)")
            ok = False
            continue
        after = check(tampered)
        caught = len(after[kind]) > len(base[kind])
        if kind == "watchers":  # the hole and the double
            caught = len(after[kind]) == len(base[kind]) + 2
        if kind == "storage_unavailable":  # two to catch, one (in a 30 s outage) to let through
            caught = len(after[kind]) == len(base[kind]) + 2
        ok &= caught
        print(f"  {kind:19s} {len(base[kind])} -> {len(after[kind])}  {'caught' if caught else 'MISSED'}")
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=3.0, help="how long the clients post (then they settle)")
    parser.add_argument("--clients", type=int, default=20, help="1-200; kinds in turn: resumable/plain x stream/whole")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--regenerate", type=float, default=0.05, help="the chance that an idle client regenerates its last reply"
    )
    parser.add_argument(
        "--watchers", type=int, default=4, help="sockets watching other clients' sessions from the other server"
    )
    parser.add_argument("--fault-every", type=float, default=5.0, help="mean seconds between faults")
    parser.add_argument(
        "--pg-outage-seconds", type=float, default=30.0, help="how long PostgreSQL stays down in a pg-outage fault"
    )
    parser.add_argument(
        "--pg-outage-first", type=float, default=120.0, help="when the first outage starts (s; at most a third in)"
    )
    parser.add_argument("--pg-outage-every", type=float, default=600.0, help="seconds between PostgreSQL outages")
    parser.add_argument(
        "--storage-retry",
        type=float,
        default=None,
        help="the servers' R2D2_STORAGE_RETRY_SECONDS (default: theirs, 10; 0 turns retrying off)",
    )
    parser.add_argument(
        "--absorb-seconds",
        type=float,
        default=10.0,
        help="the retry window the soak expects: shorter storage faults must be invisible (issue 26: 10)",
    )
    parser.add_argument("--faults", default=",".join(FAULT_KINDS), help=f"comma-separated among {FAULT_KINDS}, or ''")
    parser.add_argument("--no-auth", dest="auth", action="store_false", help="anonymous clients (default: an API key)")
    parser.add_argument("--think", type=float, default=0.6, help="at most this many seconds between turns")
    parser.add_argument("--settle-seconds", type=float, default=60.0, help="how long turns may take to end at the end")
    parser.add_argument("--stall-seconds", type=float, default=40.0, help="a turn silent this long is wedged")
    parser.add_argument(
        "--doubt-seconds", type=float, default=35.0, help="a post neither answered nor refused this long"
    )
    parser.add_argument("--resume-window", type=float, default=30.0, help="the servers' R2D2_RESUME_WINDOW_SECONDS")
    parser.add_argument("--stale-seconds", type=float, default=5.0, help="the servers' R2D2_PROCESS_STALE_SECONDS")
    parser.add_argument("--details", type=int, default=5, help="violations printed per kind (all are in the JSON)")
    parser.add_argument("--logs", default=str(LOGS / "chaos"), help="server, PostgreSQL, Redis and model logs")
    parser.add_argument(
        "--server-root", default=str(ROOT), help="the checkout whose servers to soak (e.g. a `git archive` export)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the PostgreSQL cluster's directory")
    parser.add_argument("--result", default="chaos", help="the result's name: bench/results/<name>.json")
    parser.add_argument("--verbose", "-v", action="store_true", help="print the fault timeline as it happens")
    parser.add_argument("--self-check", action="store_true", help="a short run (cuts only), then inject each violation")
    args = parser.parse_args()
    if args.self_check:
        given = set(sys.argv[1:])
        args.minutes = args.minutes if "--minutes" in given else 0.5
        args.clients = args.clients if "--clients" in given else 8
        # Only client cuts: resumes, replays and lost sockets, which a sound server gets through cleanly.
        args.faults = args.faults if "--faults" in given else "cut"
        args.fault_every = args.fault_every if "--fault-every" in given else 3.0
    args.faults = [k for k in args.faults.split(",") if k]
    unknown = set(args.faults) - set(FAULT_KINDS)
    if unknown:
        parser.error(f"unknown fault kinds {sorted(unknown)}")
    if not 1 <= args.clients <= 200 or not 0 < args.minutes <= 120:
        parser.error("--clients must be 1-200 and --minutes at most 120")
    Path(args.logs).mkdir(parents=True, exist_ok=True)

    soak = Soak(args)
    limit = args.minutes * 60 + args.settle_seconds + args.resume_window + 600  # bounded, whatever hangs
    try:
        observed = asyncio.run(asyncio.wait_for(soak.run(), limit))
    except TimeoutError:
        print(f"chaos: the soak did not finish within {limit:.0f} s; timeline:\n" + "\n".join(soak.timeline))
        return 2
    found = check(observed)
    figs = figures(soak, observed)
    total = print_report(args, figs, found, args.details)
    anomalies = [f"{s.id} (client {s.client}): {a}" for s in observed.sessions for a in s.anomalies]
    write_result(
        "chaos-self-check" if args.self_check else args.result,
        {
            "settings": {k: v for k, v in vars(args).items()},
            "figures": figs,
            "violations": {kind: len(items) for kind, items in found.items()},
            "details": found,
            "anomalies": anomalies[:500],
            "timeline": soak.timeline,
        },
    )
    if args.self_check:
        caught = self_check(observed, found)
        print(f"self-check {'passed: every injected fault was caught' if caught else 'FAILED'}")
        return 0 if caught else 1
    return 1 if total else 0


if __name__ == "__main__":
    sys.exit(main())
