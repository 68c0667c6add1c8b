"""Debian's nginx with the bundle's `.platform/nginx` files, laid out as on Amazon Linux 2023.

The platform's nginx.conf includes `conf.d/*.conf` in the http block and
`conf.d/elasticbeanstalk/*.conf` inside its port-80 server block; a bundle's
`.platform/nginx/conf.d/...` files are copied over those directories. This
builds the same layout in a temporary prefix, on a free port.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from testkit.server import free_port, wait_for_port

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)

MAIN_CONF = """\
{user}
worker_processes 1;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log {prefix}/access.log;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    include {prefix}/conf.d/*.conf;
    server {{
        listen 127.0.0.1:{port} default_server;
        include {prefix}/conf.d/elasticbeanstalk/*.conf;
    }}
}}
"""


def prepare(bundle: Path, prefix: Path, *, upstream_port: int | None = None) -> tuple[Path, int]:
    """Copy the bundle's nginx files into `prefix`; point `proxy_pass` at `upstream_port` if given."""
    shutil.copytree(bundle / ".platform" / "nginx" / "conf.d", prefix / "conf.d")
    if upstream_port is not None:
        for conf in (prefix / "conf.d").rglob("*.conf"):
            conf.write_text(re.sub(r"127\.0\.0\.1:\d+", f"127.0.0.1:{upstream_port}", conf.read_text()))
    port = free_port()
    user = "user root;" if os.geteuid() == 0 else ""
    main = prefix / "nginx.conf"
    main.write_text(MAIN_CONF.format(user=user, prefix=prefix, port=port))
    return main, port


def check(main: Path) -> subprocess.CompletedProcess:
    return subprocess.run([NGINX, "-t", "-c", str(main)], capture_output=True, text=True, timeout=30)


class Nginx:
    def __init__(self, main: Path, port: int) -> None:
        self.main, self.port = main, port
        self.process: subprocess.Popen | None = None

    def start(self) -> Nginx:
        self.process = subprocess.Popen(
            [NGINX, "-c", str(self.main)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_for_port(self.port, self.process)
        return self

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
