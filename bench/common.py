"""Shared machinery of the benchmarks: services, server processes, the load client, figures.

Every benchmark runs as in production: PostgreSQL (its own database,
``r2d2_bench``), Redis (its own ``redis-server`` on loopback port 6390, so a
fault run may restart it without touching the test suite's Redis), Daphne
processes, and the local OpenAI-compatible model server in its own process.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
LOGS = Path(os.environ.get("R2D2_BENCH_LOGS", "/tmp/r2d2-bench-logs"))
PYTHON = sys.executable
PG_URL = os.environ.get("R2D2_BENCH_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/r2d2_bench")
REDIS_PORT = int(os.environ.get("R2D2_BENCH_REDIS_PORT", "6390"))
REDIS_URL = f"redis://127.0.0.1:{REDIS_PORT}/0" + os.environ.get("R2D2_BENCH_REDIS_QUERY", "")
API_KEY = "sk-bench-0123456789"

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from testkit.redis import PrivateRedis  # noqa: E402
from testkit.server import free_port, wait_for_port  # noqa: E402


def raise_nofile(wanted: int = 65536) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = min(wanted, hard) if hard != resource.RLIM_INFINITY else wanted
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_kib = 0
    with contextlib.suppress(OSError):
        mem_kib = int(Path("/proc/meminfo").read_text().split()[1])
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_kib / 1024 / 1024, 1),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "note": "server, model server and load client share these cores",
    }


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def summary_ms(values: list[float]) -> dict[str, float | int | None]:
    """p50/p99/mean of durations in seconds, as milliseconds."""
    if not values:
        return {"n": 0, "p50": None, "p99": None, "mean": None}
    return {
        "n": len(values),
        "p50": round(pct(values, 50) * 1000, 3),
        "p99": round(pct(values, 99) * 1000, 3),
        "mean": round(statistics.fmean(values) * 1000, 3),
    }


def write_result(name: str, data: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    data = {"benchmark": name, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": machine(), **data}
    path.write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {path.relative_to(ROOT)}")
    return path


# Services --------------------------------------------------------------------


class Redis(PrivateRedis):
    """The benchmarks' redis-server: a fixed port (R2D2_BENCH_REDIS_PORT), room for 20,000 clients."""

    def __init__(self, port: int = REDIS_PORT) -> None:
        super().__init__(port, LOGS / "redis.log", "--maxclients", "20000")


def prepare_database() -> None:
    """Create r2d2_bench if missing, migrate it, and empty the chat tables."""
    import psycopg

    base, _, name = PG_URL.rpartition("/")
    with psycopg.connect(base + "/postgres", autocommit=True) as conn:
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
            conn.execute(f'CREATE DATABASE "{name}"')
    env = {**os.environ, "DATABASE_URL": PG_URL, "DJANGO_SETTINGS_MODULE": "r2d2site.settings"}
    subprocess.run([PYTHON, "manage.py", "migrate", "-v", "0"], cwd=ROOT, env=env, check=True)
    truncate()


def truncate() -> None:
    import psycopg

    with psycopg.connect(PG_URL, autocommit=True) as conn:
        conn.execute("TRUNCATE chat_chatmessage, chat_chatsession CASCADE")


def db_query(sql: str, params: tuple = ()) -> list[tuple]:
    import psycopg

    with psycopg.connect(PG_URL) as conn:
        return conn.execute(sql, params).fetchall()


@dataclass
class Process:
    name: str
    process: subprocess.Popen
    port: int

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(5)


def spawn(name: str, command: list[str], env: dict[str, str] | None = None, port: int | None = None) -> Process:
    LOGS.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    process = subprocess.Popen(
        [part.replace("{port}", str(port)) for part in command],
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        stdout=open(LOGS / f"{name}.log", "wb"),  # noqa: SIM115
        stderr=subprocess.STDOUT,
        preexec_fn=lambda: raise_nofile(),
    )
    wait_for_port(port, process, timeout=30)
    return Process(name, process, port)


def start_model(
    *,
    ttft: float = 0.0,
    token_delay: float = 0.0,
    text: str | None = None,
    repeat: int = 1,
    fail_rate: float = 0.0,
    stall_rate: float = 0.0,
    stamp: bool = False,
) -> Process:
    """The model server in its own process (testkit/fake_llm.py, or bench/stamp_llm.py when `stamp`)."""
    command = [PYTHON, "bench/stamp_llm.py"] if stamp else [PYTHON, "-m", "testkit.fake_llm"]
    command += ["--port", "{port}", "--ttft", str(ttft), "--token-delay", str(token_delay)]
    if text is not None:
        command += ["--text", text] + (["--repeat", str(repeat)] if repeat != 1 else [])
    if not stamp:
        command += ["--fail-rate", str(fail_rate), "--stall-rate", str(stall_rate)]
    return spawn("model-stamp" if stamp else "model", command)


def model_url(model: Process) -> str:
    return f"http://127.0.0.1:{model.port}/v1"


def daphne_env(model: Process, **overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "R2D2_", "DATABASE_URL", "REDIS_URL"))}
    env.update(
        {
            "DJANGO_SETTINGS_MODULE": "r2d2site.settings",
            "DJANGO_DEBUG": "0",
            "DJANGO_SECRET_KEY": "bench-secret-key-not-for-production-0123456789abcdefghijklmnop",
            "DJANGO_SECURE_SSL_REDIRECT": "0",
            "DATABASE_URL": PG_URL,
            "REDIS_URL": REDIS_URL,
            "OPENAI_BASE_URL": model_url(model),
            "OPENAI_API_KEY": API_KEY,
            "R2D2_RATE_LIMIT_PER_MINUTE": "0",
            # Every simulated client connects from 127.0.0.1 (bench/auth_cost.py: all with one key).
            "R2D2_MAX_CONNECTIONS_PER_ADDRESS": "0",
            "R2D2_MAX_CONNECTIONS_PER_PRINCIPAL": "0",
            # The load clients are anonymous; bench/auth_cost.py measures authenticated turns.
            "R2D2_REQUIRE_AUTH": "0",
            "R2D2_LOG_LEVEL": "WARNING",
            "R2D2_DB_POOL_MAX": "20",
            "R2D2_CHANNEL_PREFIX": "r2d2bench",
        }
    )
    env.update(overrides)
    return env


def start_daphne(model: Process, name: str = "daphne", wrap: list[str] | None = None, **overrides: str) -> Process:
    # The Procfile's launcher with one process: Daphne as production runs it (on uvloop unless R2D2_UVLOOP=0).
    command = [*(wrap or []), PYTHON, "-m", "r2d2site.serve", "daphne", "-b", "127.0.0.1", "-p", "{port}"]
    command.append("r2d2site.asgi:application")
    return spawn(name, command, env=daphne_env(model, **{"R2D2_WEB_PROCESSES": "1", **overrides}))


def start_relay(model: Process) -> Process:
    return spawn("relay", [PYTHON, "bench/relay.py", "--port", "{port}", "--base-url", model_url(model)])


# The load client ---------------------------------------------------------------


@dataclass
class Turn:
    session: int
    index: int
    sent: float = 0.0
    processing_start: float | None = None
    first_delta: float | None = None
    message: float | None = None
    processing_end: float | None = None
    text: str = ""
    deltas: str = ""
    types: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    stamp_lag: float | None = None  # model's first token written -> first delta here (stamp server)

    @property
    def ok(self) -> bool:
        return (
            self.types.count("processing_start") == 1
            and self.types.count("message") == 1
            and (self.types[-1:] == ["processing_end"] and not self.errors)
        )


@dataclass
class Session:
    index: int
    session_id: str | None = None
    turns: list[Turn] = field(default_factory=list)
    failure: str | None = None


def parse_stamp(text: str) -> int | None:
    if text.startswith("<") and ">" in text:
        with contextlib.suppress(ValueError):
            return int(text[1 : text.index(">")])
    return None


async def run_sessions(
    url: str,
    sessions: int,
    turns: int,
    *,
    stream: bool = True,
    connect_concurrency: int = 200,
    message: str = "Hello R2D2, tell me something",
    end: bool = True,
    turn_timeout: float = 120.0,
    jitter: float = 0.0,
    think: float = 0.0,
) -> tuple[list[Session], float, float]:
    """Open `sessions` sockets (one session each), then all run `turns` turns back to back
    (or about `think` seconds apart, 0.5-1.5x at random, as people reading the answers would).

    Returns the sessions and the wall-clock start and end of the turn phase
    (connecting is not timed: every socket is open before the first turn).
    """
    from websockets.asyncio.client import connect

    results = [Session(i) for i in range(sessions)]
    gate = asyncio.Semaphore(connect_concurrency)
    ready = asyncio.Event()
    opened = 0
    all_open = asyncio.Event()

    async def one(state: Session) -> None:
        nonlocal opened
        ws = None
        try:
            async with gate:
                ws = await connect(url, compression=None, ping_interval=None, open_timeout=60, max_queue=None)
                await ws.send('{"action": "chatbot_session_start"}')
                frame = json.loads(await asyncio.wait_for(ws.recv(), 60))
                state.session_id = frame["data"]["session_id"]
        except Exception as exc:
            state.failure = f"connect: {exc!r}"
        finally:
            opened += 1
            if opened == sessions:
                all_open.set()
        await ready.wait()
        if ws is None or state.failure:
            return
        if jitter:
            await asyncio.sleep(random.random() * jitter)
        try:
            for index in range(turns):
                if index and think:
                    await asyncio.sleep(think * (0.5 + random.random()))  # people do not read in step
                turn = Turn(state.index, index)
                state.turns.append(turn)
                payload = {
                    "action": "chatbot_post_message",
                    "session_id": state.session_id,
                    "user_message": f"{message} s{state.index} t{index}",
                }
                if stream:
                    payload["stream"] = True
                turn.sent = time.perf_counter()
                await ws.send(json.dumps(payload))
                while True:
                    raw = await asyncio.wait_for(ws.recv(), turn_timeout)
                    now = time.perf_counter()
                    frame = json.loads(raw)
                    kind = frame["type"]
                    turn.types.append(kind)
                    if kind == "message_delta":
                        if turn.first_delta is None:
                            turn.first_delta = now
                            stamp = parse_stamp(frame["data"])
                            if stamp is not None:
                                turn.stamp_lag = time.monotonic_ns() / 1e9 - stamp / 1e9
                        turn.deltas += frame["data"]
                    elif kind == "processing_start":
                        turn.processing_start = now
                    elif kind == "message":
                        turn.message = now
                        turn.text = frame["data"]
                    elif kind == "error":
                        turn.errors.append(frame["data"]["code"])
                    elif kind == "processing_end":
                        turn.processing_end = now
                        break
            if end:
                await ws.send(json.dumps({"action": "chatbot_session_end", "session_id": state.session_id}))
                await asyncio.wait_for(ws.recv(), 60)
        except Exception as exc:
            state.failure = f"turn: {exc!r}"
        finally:
            await ws.close()

    tasks = [asyncio.create_task(one(s)) for s in results]
    await all_open.wait()
    started = time.perf_counter()
    ready.set()
    await asyncio.gather(*tasks)
    return results, started, time.perf_counter()


def turn_latencies(sessions: list[Session]) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"processing_start": [], "first_delta": [], "message": []}
    for s in sessions:
        for t in s.turns:
            if t.processing_start is not None:
                out["processing_start"].append(t.processing_start - t.sent)
            if t.first_delta is not None:
                out["first_delta"].append(t.first_delta - t.sent)
            if t.message is not None:
                out["message"].append(t.message - t.sent)
    return out


def direct_client(base_url: str):
    """The baseline: the same `openai` client, same aiohttp transport, same settings as chat/llm.py."""
    import openai

    return openai.AsyncOpenAI(
        api_key=API_KEY,
        base_url=base_url,
        timeout=60,
        max_retries=0,
        http_client=openai.DefaultAioHttpClient(timeout=60),
    )


async def run_direct(
    base_url: str, sessions: int, turns: int, *, stream: bool = True, jitter: float = 0.0, think: float = 0.0
) -> tuple[dict, float, float]:
    """The same turns as `run_sessions`, made straight to the model server with AsyncOpenAI.

    Events: "processing_start" is the call being made (0 by definition: nothing
    sits between), "first_delta" the first content chunk, "message" the end of the stream.
    """
    client = direct_client(base_url)
    lat: dict[str, list[float]] = {"processing_start": [], "first_delta": [], "message": []}
    stamp_lags: list[float] = []
    ready = asyncio.Event()

    async def one(index: int) -> None:
        history: list[dict[str, str]] = []
        await ready.wait()
        if jitter:
            await asyncio.sleep(random.random() * jitter)
        for turn in range(turns):
            if turn and think:
                await asyncio.sleep(think * (0.5 + random.random()))
            history.append({"role": "user", "content": f"Hello R2D2, tell me something s{index} t{turn}"})
            sent = time.perf_counter()
            lat["processing_start"].append(0.0)
            text = ""
            if stream:
                response = await client.chat.completions.create(
                    model="gpt-3.5-turbo", messages=history, stream=True, stream_options={"include_usage": True}
                )
                first = None
                async with response:
                    async for chunk in response:
                        for choice in chunk.choices:
                            if choice.delta and choice.delta.content:
                                if first is None:
                                    first = time.perf_counter()
                                    stamp = parse_stamp(choice.delta.content)
                                    if stamp is not None:
                                        stamp_lags.append(time.monotonic_ns() / 1e9 - stamp / 1e9)
                                text += choice.delta.content
                lat["first_delta"].append(first - sent)
            else:
                completion = await client.chat.completions.create(model="gpt-3.5-turbo", messages=history)
                text = completion.choices[0].message.content or ""
            lat["message"].append(time.perf_counter() - sent)
            history.append({"role": "assistant", "content": text})

    tasks = [asyncio.create_task(one(i)) for i in range(sessions)]
    await asyncio.sleep(0)
    started = time.perf_counter()
    ready.set()
    await asyncio.gather(*tasks)
    ended = time.perf_counter()
    await client.close()
    return {"latencies": lat, "stamp_lags": stamp_lags}, started, ended
