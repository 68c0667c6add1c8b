"""A private redis-server on loopback keeping nothing (--save "" --appendonly no): restarting it disturbs nobody."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from testkit.server import free_port, wait_for_port


class PrivateRedis:
    """A throwaway redis-server of its own, on a free port unless one is given; `restart` for the fault tests."""

    def __init__(self, port: int | None = None, log_path: Path | None = None, *extra: str) -> None:
        self.port = port or free_port()
        self.log_path = log_path
        self.extra = list(extra)
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> PrivateRedis:
        command = ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--save", "", "--appendonly", "no"]
        if self.log_path is None:
            self.process = subprocess.Popen([*command, *self.extra], stdout=subprocess.DEVNULL)
        else:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.log_path, "ab") as log:
                self.process = subprocess.Popen([*command, *self.extra], stdout=log, stderr=subprocess.STDOUT)
        wait_for_port(self.port, self.process)
        return self

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.kill()  # nothing to save, nothing to wait for
            self.process.wait(10)

    def restart(self, down_for: float = 0.5) -> None:
        self.stop()
        time.sleep(down_for)  # the outage itself: how long clients see no Redis
        self.start()
