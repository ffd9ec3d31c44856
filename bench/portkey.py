"""Portkey's open-source gateway (Node) as an optional peer in the full benchmark.

It is installed with npm into a cache directory outside the repository the
first time, and started in front of the same nginx upstream. When npm or
the registry is not there, or it does not start, the benchmark skips it and
says why: it is a point of comparison, never a requirement.
"""

import os
import shutil
import subprocess
import tempfile

import requests

from processes import free_port, wait_until

PACKAGE = "@portkey-ai/gateway@1.15.2"
CACHE = os.path.join(tempfile.gettempdir(), "mana-llm-bench-portkey")
MODEL = "gpt-4o-mini"   # Portkey routes by header, so the body names the upstream's model
INSTALL_TIMEOUT = 180


def entry_point():
    """Return Portkey's server script, installing the package first; raise RuntimeError."""
    script = os.path.join(CACHE, "node_modules", "@portkey-ai", "gateway", "build",
                          "start-server.js")
    if os.path.exists(script):
        return script
    if not shutil.which("npm") or not shutil.which("node"):
        raise RuntimeError("npm/node not installed")
    os.makedirs(CACHE, exist_ok=True)
    try:
        result = subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--prefix", CACHE,
                                 PACKAGE], capture_output=True, text=True,
                                timeout=INSTALL_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"npm install took over {INSTALL_TIMEOUT} s") from None
    if result.returncode != 0 or not os.path.exists(script):
        raise RuntimeError("npm install failed: " + (result.stderr or result.stdout)[-300:])
    return script


def headers(plain_url):
    """Return the request headers that make Portkey forward to ``plain_url``'s OpenAI API."""
    return {"x-portkey-provider": "openai", "x-portkey-custom-host": plain_url + "/v1",
            "Authorization": "Bearer bench-key"}


def start(procs, plain_url):
    """Start Portkey on a free port; return (process, URL). Raise RuntimeError to skip it."""
    script = entry_point()
    port = free_port()
    env = dict(os.environ, NODE_ENV="production")
    process = procs.start("portkey", ["node", script, f"--port={port}", "--headless"],
                          env=env)
    url = f"http://127.0.0.1:{port}"

    def answers():
        procs.check_alive(process)
        try:
            return requests.post(url + "/v1/chat/completions", headers=headers(plain_url),
                                 json={"model": MODEL, "messages": [
                                     {"role": "user", "content": "hi"}]},
                                 timeout=2).status_code == 200
        except requests.RequestException:
            return False

    wait_until(answers, 30, "Portkey")
    return process, url
