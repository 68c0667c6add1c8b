"""The Elastic Beanstalk bundle as `eb deploy` would build it, and running it the way the platform does."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from testkit.server import ROOT, LiveServer

#: Procfile lines must match this (Elastic Beanstalk's "Buildfile and Procfile" page).
PROCFILE_LINE = re.compile(r"^[A-Za-z0-9_-]+:\s*[^\s].*$")


def bundle_files(root: Path = ROOT) -> list[str]:
    """The files the EB CLI uploads: with an `.ebignore`, the working directory filtered by its
    gitignore-syntax rules (git itself evaluates them, against an empty index so .gitignore plays no part)."""
    with tempfile.TemporaryDirectory() as scratch:
        subprocess.run(["git", "init", "-q", scratch], check=True)
        listed = subprocess.run(
            [
                "git",
                f"--git-dir={scratch}/.git",
                f"--work-tree={root}",
                "-c",
                "core.excludesFile=/dev/null",
                "ls-files",
                "--others",
                f"--exclude-from={root / '.ebignore'}",
                "-z",
            ],
            cwd=root,
            check=True,
            capture_output=True,
        ).stdout
    return sorted(name for name in listed.decode().split("\0") if name)


def copy_bundle(destination: Path, root: Path = ROOT) -> Path:
    """Unpack the bundle into `destination`, as the platform does into /var/app/staging."""
    for name in bundle_files(root):
        target = destination / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / name, target)
    return destination


def procfile_commands(root: Path = ROOT) -> dict[str, str]:
    commands = {}
    for line in (root / "Procfile").read_text().splitlines():
        if line.strip():
            assert PROCFILE_LINE.match(line), f"invalid Procfile line: {line!r}"
            name, _, command = line.partition(":")
            commands[name.strip()] = command.strip()
    return commands


def ebextensions(root: Path = ROOT) -> dict[str, dict]:
    return {path.name: yaml.safe_load(path.read_text()) for path in sorted((root / ".ebextensions").glob("*.config"))}


def container_commands(root: Path = ROOT) -> dict[str, dict]:
    commands: dict[str, dict] = {}
    for config in ebextensions(root).values():
        commands.update(config.get("container_commands") or {})
    return dict(sorted(commands.items()))


def environment_properties(root: Path = ROOT) -> dict[str, str]:
    properties: dict[str, str] = {}
    for config in ebextensions(root).values():
        properties.update((config.get("option_settings") or {}).get("aws:elasticbeanstalk:application:environment", {}))
    return {key: str(value) for key, value in properties.items()}


def venv_path() -> str:
    """PATH with this interpreter's bin first, as the platform activates /var/app/venv before the Procfile."""
    return f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"


class ProcfileServer(LiveServer):
    """The Procfile's `web` command run verbatim by /bin/sh (as the platform's systemd unit does),
    in its own process group so that stopping it stops Daphne too (dash does not exec it)."""

    def __init__(self, env: dict[str, str], log_path: Path, cwd: Path) -> None:
        super().__init__(
            {**env, "PATH": venv_path()}, log_path, command=["/bin/sh", "-c", procfile_commands(cwd)["web"]]
        )
        self.cwd = cwd

    def start(self) -> ProcfileServer:
        from testkit.server import wait_for_port

        self._log = open(self.log_path, "ab")  # noqa: SIM115 (closed in stop)
        self.process = subprocess.Popen(
            self.command, cwd=self.cwd, env=self.env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )
        wait_for_port(self.port, self.process)
        return self

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(5)
        self._log.close()
