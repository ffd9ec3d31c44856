"""gunicorn settings for mana-llm: ``gunicorn -c gunicorn.conf.py`` from the repo root.

Plain settings first, then a few hooks, each with one job. This file is
executed again on every ``kill -HUP``, so it does no work at import
time: everything with side effects lives in a hook.
"""

import glob
import logging
import os
import shutil
import subprocess
import sys
import tempfile


def _env_int(name, default, minimum=1):
    """Read a sizing variable; a bad value stops startup naming the variable."""
    value = os.environ.get(name, str(default))
    if not value.strip().isdigit() or int(value) < minimum:
        raise SystemExit(f"mana-llm: {name} must be a whole number >= {minimum}, got {value!r}")
    return int(value)


wsgi_app = "app:create_app()"
# HOST narrows the bind (tests use 127.0.0.1); PORT is the one operators set.
# These sizing variables come from the real environment (gunicorn reads
# them before the app exists); the app's own settings may also be in .env.
bind = f"{os.environ.get('HOST', '0.0.0.0')}:{_env_int('PORT', 3025)}"
# gthread with deadlines for slow clients, and a prompt close of the port on
# TERM (serving/worker.py). Outside the app package: the master imports it.
worker_class = "serving.worker.TimedThreadWorker"
# A request gets a thread only once its head is in, which must be within
# HEADER_TIMEOUT seconds of connecting (or of the next request starting on
# a kept-alive connection); a body read may wait BODY_TIMEOUT seconds for a
# byte; a client that stops reading an answer is cut off after
# STREAM_IDLE_TIMEOUT (the app's setting, given to the worker in
# post_worker_init).
HEADER_TIMEOUT = _env_int("HEADER_TIMEOUT", 10)
BODY_TIMEOUT = _env_int("BODY_TIMEOUT", 30)
# Two processes per core-pair is enough: the work is I/O-bound, and every
# worker keeps its own health cache that must learn about outages.
workers = _env_int("WEB_CONCURRENCY", 2)
# Each streamed answer holds a thread for its whole length (a minute or
# more for long-form), so threads, not CPU, bound concurrency. The kernel
# does not split connections evenly between workers (the benchmark saw
# 285/215 for 500 streams), so 2 x 384 holds 500 concurrent streams with
# margin. An idle thread costs ~100 KiB of RSS (500 open streams: 135 MiB).
threads = _env_int("GUNICORN_THREADS", 384)
worker_connections = 1000
# With gthread the heartbeat comes from the worker's main loop, not from
# request threads, so a long stream does not trip this.
timeout = 60
# On HUP or TERM, old workers finish what they are serving before they
# exit (each exits as soon as its last request ends), so a reload fails no
# request in flight. This caps it: a whole chain walk of three entries at
# the default timeouts, or a long-form stream, fits in ten minutes.
graceful_timeout = 600
keepalive = 75
# Recycle each worker after about this many requests (memory hygiene for a
# long-lived Python process); the jitter keeps workers from recycling
# together. Their metrics are archived when they exit (child_exit).
max_requests = _env_int("MAX_REQUESTS", 10000, minimum=0)
max_requests_jitter = _env_int("MAX_REQUESTS_JITTER", 1000, minimum=0)
# Where the master writes its PID, for `kill -HUP $(cat "$PIDFILE")`. Off
# unless set: a fixed default path would make two instances on one host
# fight over it (gunicorn refuses to start over a live PID), and under
# systemd or a container the supervisor knows the master's PID anyway.
pidfile = os.environ.get("PIDFILE") or None
# Never preload: on HUP the app must be imported afresh by new workers.
preload_app = False
# gunicorn 27's control socket defaults to one path per user; several
# instances on a host (tests start many) would fight over it.
control_socket_disable = True
loglevel = os.environ.get("LOG_LEVEL", "info")
accesslog = None  # the app writes its own access line, with request id and model

_log = logging.getLogger("gunicorn.error")
# The same name as app.SNAPSHOT_VARIABLE: the master never imports the app.
SNAPSHOT_VARIABLE = "MANA_LLM_SNAPSHOT"


def _accepted_settings():
    """Validate config, .env and alias file in a child process; return its JSON or raise."""
    # Run from the master's working directory (where .env is read), with
    # the repo importable wherever that is.
    here = os.path.dirname(os.path.abspath(__file__))
    path = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)
    # Not the previous snapshot: it can outgrow what one variable may hold
    # for exec (128 KiB), and the child must read the files afresh anyway.
    # Nor the metrics directory: the checker's files (an unlabelled gauge
    # at 0, under a pid never marked dead) would stay in the aggregate.
    env = {k: v for k, v in os.environ.items()
           if k not in (SNAPSHOT_VARIABLE, "PROMETHEUS_MULTIPROC_DIR")}
    result = subprocess.run([sys.executable, "-m", "app", "check-config", "--json"],
                            capture_output=True, text=True, timeout=30,
                            env=dict(env, PYTHONPATH=path))
    if result.returncode != 0:
        raise ValueError(result.stderr.strip() or "configuration check failed")
    for warning in result.stderr.splitlines():  # e.g. a model with no price
        _log.warning(warning)
    return result.stdout.strip()


def _metrics_directory():
    """Return this instance's metrics directory, emptied of old workers' files."""
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not directory:
        directory = tempfile.mkdtemp(prefix="mana-llm-metrics-")
        os.environ["MANA_LLM_OWN_METRICS_DIR"] = directory
        return directory
    os.makedirs(directory, exist_ok=True)
    # Only our own files: the operator may have pointed this at a shared place.
    for path in glob.glob(os.path.join(directory, "*.db")):
        os.unlink(path)
    return directory


def _runtime_directory():
    """Return a new directory of this instance's own for its shared board (SQLite)."""
    # Fresh per master: two instances on one host never share or wipe each
    # other's board, and HUP keeps it (the master stays), so new workers
    # start from what the old ones learned. The same name as
    # app.routing.board.RUNTIME_DIR_VARIABLE: the master never imports the app.
    directory = tempfile.mkdtemp(prefix="mana-llm-run-")
    os.environ["MANA_LLM_RUNTIME_DIR"] = directory
    return directory


def on_starting(server):
    """Prepare this instance's metrics and runtime directories; accept the configuration."""
    # Set before any worker imports prometheus_client: it picks its value
    # class (mmap files per process) at import time.
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = _metrics_directory()
    os.environ["GUNICORN_THREADS"] = str(server.cfg.threads)
    os.environ["WEB_CONCURRENCY"] = str(server.cfg.workers)  # a cap's per-worker share
    try:
        snapshot = _accepted_settings()
    except (ValueError, OSError, subprocess.SubprocessError) as exc:
        _log.error("mana-llm cannot start: %s", exc)
        raise SystemExit(1)
    _runtime_directory()
    # The last good configuration and alias table live in the master's
    # environment. The master outlives every worker and forks each one, so
    # workers started at boot, after a HUP or after a crash all inherit it;
    # a broken file is never read by a worker, so it can never stop one
    # booting (which would halt the arbiter and every worker with it).
    os.environ[SNAPSHOT_VARIABLE] = snapshot


def on_reload(server):
    """Accept the alias file (and .env) again on HUP, or keep the last good ones."""
    # An exception escaping this hook would stop the whole server.
    try:
        os.environ[SNAPSHOT_VARIABLE] = _accepted_settings()
        _log.info("mana-llm: configuration and aliases reloaded")
    except Exception as exc:
        _log.error("mana-llm: reload rejected, keeping the last good configuration and "
                   "aliases: %s", exc)


def post_fork(server, worker):
    """Create the new worker's metrics files before any scrape can read them half-made."""
    from serving.metrics_archive import create_worker_files

    create_worker_files(os.environ["PROMETHEUS_MULTIPROC_DIR"], worker.pid)


def post_worker_init(worker):
    """Start the worker's prober and give the worker its client timeouts."""
    gateway = worker.wsgi.extensions["mana_llm"]
    gateway.start()  # threads start after fork
    worker.configure_timeouts(header=HEADER_TIMEOUT, body=BODY_TIMEOUT,
                              send=gateway.config["STREAM_IDLE_TIMEOUT"])


def worker_exit(server, worker):
    """Stop the worker's prober and close its upstream connections."""
    app = getattr(worker, "wsgi", None)
    if app is not None and hasattr(app, "extensions"):
        app.extensions["mana_llm"].stop()


def child_exit(server, worker):
    """Fold a dead worker's counters into the metrics archive; drop its live gauges."""
    # Imported here, not at the top: prometheus_client must be imported
    # only after on_starting has set PROMETHEUS_MULTIPROC_DIR.
    from prometheus_client import multiprocess

    from serving.metrics_archive import archive_dead_worker

    multiprocess.mark_process_dead(worker.pid)
    try:
        archive_dead_worker(os.environ["PROMETHEUS_MULTIPROC_DIR"], worker.pid)
    except Exception as exc:
        # An exception escaping this hook would stop the master; the dead
        # worker's files stay and are still counted.
        _log.error("mana-llm: could not archive the metrics of worker %s: %s",
                   worker.pid, exc)


def on_exit(server):
    """Remove the metrics and runtime directories this instance created for itself."""
    for variable in ("MANA_LLM_OWN_METRICS_DIR", "MANA_LLM_RUNTIME_DIR"):
        directory = os.environ.get(variable)
        if directory:
            shutil.rmtree(directory, ignore_errors=True)
