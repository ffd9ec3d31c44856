"""Other real servers the end-to-end tests put around the gateway (nginx in front)."""

import os
import shutil
import signal
import socket
import subprocess

from tests.conftest import REPO, free_port, wait_until

SITE = os.path.join(REPO, "deploy", "nginx.conf")
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
# The lines of deploy/nginx.conf a test replaces: where it listens, where the gateway is.
LISTEN_LINE = "listen 80;"
UPSTREAM_LINE = "server 127.0.0.1:3025;"
TEMP_PATHS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")


def nginx_available():
    return os.access(NGINX, os.X_OK)


def render_site(port, upstream_port):
    """Return deploy/nginx.conf listening on 127.0.0.1:``port``, in front of ``upstream_port``."""
    with open(SITE) as handle:
        text = handle.read()
    for line, replacement in ((LISTEN_LINE, f"listen 127.0.0.1:{port};"),
                              (UPSTREAM_LINE, f"server 127.0.0.1:{upstream_port};")):
        if text.count(line) != 1:
            raise AssertionError(f"deploy/nginx.conf must contain {line!r} exactly once")
        text = text.replace(line, replacement)
    return text


class Nginx:
    """Debian's nginx with the shipped site file, run unprivileged-style from a prefix."""

    def __init__(self, upstream_port, prefix):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.prefix = str(prefix)
        self.upstream_port = upstream_port
        self.process = None

    def main_config(self):
        """Return an nginx.conf whose paths all live under the prefix, including the site."""
        temp = "\n".join(f"    {name}_temp_path {self.prefix}/{name};" for name in TEMP_PATHS)
        # Run as root (CI), workers would default to "nobody", which cannot
        # enter pytest's private temporary directory.
        user = "user root;\n" if os.geteuid() == 0 else ""
        return (f"{user}worker_processes 2;\nworker_rlimit_nofile 16384;\n"
                "events { worker_connections 8192; }\n"
                f"http {{\n    access_log {self.prefix}/access.log;\n{temp}\n"
                f"    include {self.prefix}/site.conf;\n}}\n")

    def start(self):
        os.makedirs(self.prefix, exist_ok=True)
        with open(os.path.join(self.prefix, "site.conf"), "w") as handle:
            handle.write(render_site(self.port, self.upstream_port))
        with open(os.path.join(self.prefix, "nginx.conf"), "w") as handle:
            handle.write(self.main_config())
        self.process = subprocess.Popen(
            [NGINX, "-p", self.prefix, "-c", os.path.join(self.prefix, "nginx.conf"),
             "-e", os.path.join(self.prefix, "error.log"),
             "-g", f"daemon off; pid {self.prefix}/nginx.pid;"],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        if not wait_until(self._ready, timeout=15):
            self.stop()
            raise RuntimeError("nginx did not start:\n" + self.log())
        return self

    def _ready(self):
        if self.process.poll() is not None:
            raise RuntimeError("nginx exited:\n" + self.log())
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            return True
        except OSError:
            return False

    def log(self):
        try:
            with open(os.path.join(self.prefix, "error.log"), errors="replace") as handle:
                return handle.read()
        except OSError:
            return ""

    def stop(self):
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)  # nginx's fast shutdown
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
