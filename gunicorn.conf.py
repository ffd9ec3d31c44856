"""gunicorn settings for mana-llm: ``gunicorn -c gunicorn.conf.py`` from the repo root.

Plain settings first, then a few hooks, each with one job. This file is
executed again on every ``kill -HUP``, so it does no work at import
time: everything with side effects lives in a hook.
"""

import logging
import os
import shutil
import subprocess
import sys
import tempfile

wsgi_app = "app:create_app()"
# HOST narrows the bind (tests use 127.0.0.1); PORT is the one operators set.
bind = f"{os.environ.get('HOST', '0.0.0.0')}:{os.environ.get('PORT', '3025')}"
worker_class = "gthread"
# Two processes per core-pair is enough: the work is I/O-bound, and every
# worker keeps its own health cache that must learn about outages.
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
# Each streamed answer holds a thread for its whole length (a minute or
# more for long-form), so threads, not CPU, bound concurrency. The kernel
# does not split connections evenly between workers (the benchmark saw
# 285/215 for 500 streams), so 2 x 384 holds 500 concurrent streams with
# margin. An idle thread costs ~100 KiB of RSS (500 open streams: 135 MiB).
threads = int(os.environ.get("GUNICORN_THREADS", "384"))
worker_connections = 1000
# With gthread the heartbeat comes from the worker's main loop, not from
# request threads, so a long stream does not trip this.
timeout = 60
# On HUP or TERM, workers finish what they are serving (streams included)
# before they exit, so a reload fails no request in flight.
graceful_timeout = 120
keepalive = 75
# Never preload: on HUP the app must be imported afresh by new workers.
preload_app = False
# gunicorn 27's control socket defaults to one path per user; several
# instances on a host (tests start many) would fight over it.
control_socket_disable = True
loglevel = os.environ.get("LOG_LEVEL", "info")
accesslog = None  # the app writes its own access line, with request id and model

_log = logging.getLogger("gunicorn.error")


def _accept_aliases(server):
    """Validate the alias file in a child process; return its JSON or raise."""
    result = subprocess.run([sys.executable, "-m", "app", "check-aliases", "--json"],
                            capture_output=True, text=True, timeout=30,
                            cwd=os.path.dirname(os.path.abspath(__file__)))
    if result.returncode != 0:
        raise ValueError(result.stderr.strip() or "alias check failed")
    return result.stdout.strip()


def on_starting(server):
    """Prepare this instance's metrics directory and accept the first alias file."""
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if directory:
        shutil.rmtree(directory, ignore_errors=True)
        os.makedirs(directory, exist_ok=True)
    else:
        directory = tempfile.mkdtemp(prefix="mana-llm-metrics-")
        os.environ["MANA_LLM_OWN_METRICS_DIR"] = directory
    # Set before any worker imports prometheus_client: it picks its value
    # class (mmap files per process) at import time.
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    os.environ["GUNICORN_THREADS"] = str(server.cfg.threads)
    try:
        snapshot = _accept_aliases(server)
    except (ValueError, OSError, subprocess.SubprocessError) as exc:
        _log.error("mana-llm cannot start: %s", exc)
        raise SystemExit(1)
    # The last good alias table lives in the master's environment. The
    # master outlives every worker and forks each one, so workers started
    # at boot, after a HUP or after a crash all inherit it; a broken file
    # is never read by a worker at all, so it can never stop one booting.
    os.environ["MANA_LLM_ALIASES_SNAPSHOT"] = snapshot


def on_reload(server):
    """Accept the alias file again on HUP, or keep the last good one."""
    # An exception escaping this hook would stop the whole server.
    try:
        os.environ["MANA_LLM_ALIASES_SNAPSHOT"] = _accept_aliases(server)
        _log.info("mana-llm: aliases reloaded")
    except Exception as exc:
        _log.error("mana-llm: alias reload rejected, keeping the last good aliases: %s",
                   exc)


def post_worker_init(worker):
    """Start the worker's prober and set its health gauges (threads start after fork)."""
    worker.wsgi.extensions["mana_llm"].start()


def child_exit(server, worker):
    """Drop a dead worker's live gauges from the aggregated metrics."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server):
    """Remove the metrics directory this instance created for itself."""
    directory = os.environ.get("MANA_LLM_OWN_METRICS_DIR")
    if directory:
        shutil.rmtree(directory, ignore_errors=True)
