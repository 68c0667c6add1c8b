"""Run the Procfile's Daphne command as one server process per core, all on the same port.

    python -m r2d2site.serve daphne -b 127.0.0.1 -p $PORT [daphne's other options] r2d2site.asgi:application

One Daphne process is one Python interpreter: it uses one core, so an instance with
two cores and one process leaves half the machine idle. This launcher opens the
listening port itself, one socket per process with SO_REUSEPORT (the kernel spreads
new connections across them), and starts `R2D2_WEB_PROCESSES` Daphne processes
(default: the cores this process may run on), each adopting its socket with `--fd`.
nginx in front still proxies to the one port; a WebSocket stays with the process
that accepted it.

A process that dies is started again on the same socket (connections the kernel
queued on it wait instead of being refused); its sessions are ended as orphaned by
the others' sweep (chat/sessions/liveness.py). SIGTERM/SIGINT stop every process. With one
process Daphne runs in this process, with no launcher in between.

Each Daphne runs on uvloop (r2d2site/loop.py), installed here before Daphne is imported.

PROMETHEUS_MULTIPROC_DIR (chat/ops/metrics.py) is made fresh here when several
processes serve, so /metrics adds up what all of them counted.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

logger = logging.getLogger("r2d2site.serve")

RESTART_DELAY = 1.0  # seconds before a dead process is started again (no busy loop if it cannot start)


def process_count() -> int:
    configured = os.environ.get("R2D2_WEB_PROCESSES", "").strip()
    if configured:
        return max(1, int(configured))
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def split_address(args: list[str]) -> tuple[str, int, list[str]]:
    """Take `-b HOST` / `--bind HOST` and `-p PORT` / `--port PORT` out of Daphne's arguments."""
    host, port, rest = "127.0.0.1", None, []
    items = iter(args)
    for arg in items:
        if arg in ("-b", "--bind"):
            host = next(items)
        elif arg in ("-p", "--port"):
            port = int(next(items))
        else:
            rest.append(arg)
    if port is None:
        raise SystemExit("r2d2site.serve: the Daphne command needs -p PORT")
    return host, port, rest


def listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(4096)
    sock.set_inheritable(True)
    return sock


def prometheus_dir() -> str:
    """A fresh directory for the processes' metric files: files of a previous run would be added in."""
    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.path.join(tempfile.gettempdir(), "r2d2-metrics")
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path, exist_ok=True)
    return path


def _log_json() -> None:
    """The launcher's lines are JSON like every other line the server prints (chat/ops/logging.py)."""
    from chat.ops.logging import JsonFormatter

    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter())
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def run_daphne(args: list[str]) -> None:
    """Daphne's command line, in this process, on the event loop r2d2site/loop.py chooses."""
    from r2d2site import loop

    loop.install()
    from daphne.cli import CommandLineInterface

    CommandLineInterface().run(args)


def main(argv: list[str]) -> int:
    if not argv or os.path.basename(argv[0]) != "daphne":
        raise SystemExit("usage: python -m r2d2site.serve daphne -b HOST -p PORT [options] APPLICATION")
    count = process_count()
    if count == 1:
        run_daphne(argv[1:])  # exactly the Procfile's Daphne command
        return 0
    host, port, rest = split_address(argv[1:])
    _log_json()
    # Each child is this launcher again, serving one process: Daphne on the same event loop.
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": prometheus_dir(), "R2D2_WEB_PROCESSES": "1"}
    sockets = [listen(host, port) for _ in range(count)]

    def start(sock: socket.socket) -> subprocess.Popen:
        command = [sys.executable, "-m", "r2d2site.serve", "daphne", "--fd", str(sock.fileno()), *rest]
        return subprocess.Popen(command, env=env, pass_fds=(sock.fileno(),))

    children = {index: start(sock) for index, sock in enumerate(sockets)}
    stopping = False

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for child in children.values():
            if child.poll() is None:
                child.send_signal(signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    logger.info("serving", extra={"processes": count, "address": f"{host}:{port}"})
    while not stopping:
        time.sleep(0.2)
        for index, child in list(children.items()):
            if child.poll() is None or stopping:
                continue
            logger.warning(
                "server process exited; starting another", extra={"pid": child.pid, "status": child.returncode}
            )
            # Its gauges (open sockets, live sessions) stop counting; its counters stay in the totals.
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(child.pid, env["PROMETHEUS_MULTIPROC_DIR"])
            time.sleep(RESTART_DELAY)
            if not stopping:
                children[index] = start(sockets[index])
    for child in children.values():
        try:
            child.wait(30)
        except subprocess.TimeoutExpired:
            child.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
