"""Benchmark mana-llm: direct upstream vs through the gateway, plain requests and streams.

    .venv/bin/python bench/run.py            # full run, a few minutes; needs nginx and wrk
    .venv/bin/python bench/run.py --check    # smoke run for CI, < 30 s; no nginx, no wrk

The full run starts nginx (fixed chat completion), bench/upstream.py
(slow SSE streams) and the gateway under its own gunicorn.conf.py, runs
wrk at 1, 8 and 64 connections against nginx directly and through the
gateway, measures stream time to first byte and holds 500 slow streams
open at once, then prints one markdown report and writes it to
bench/results/. ``--check`` does the same at a trickle with a Python
client and never judges timings: it fails only if a request failed.
"""

import argparse
import os
import runpy
import shutil
import signal
import string
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import requests

import clients
import hotpath
import portkey
import report
from processes import (Processes, busy_cpu_seconds, cpu_seconds_between, cpu_ticks, free_port,
                       process_tree, raise_open_files_limit, rss_mib, tree_cpu_seconds,
                       wait_until)
from upstream import COMPLETION_JSON, MODELS_JSON

BENCH = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH)
MODEL = "openai/gpt-4o-mini"        # served by the plain upstream (nginx in full mode)
ALIAS = "mana/bench"                # chain: [MODEL]
CACHED = "mana/bench-cached"        # chain: [MODEL], cache_ttl: every request after the first hits
STREAM_MODEL = "groq/gpt-4o-mini"   # served by bench/upstream.py, which can stream slowly
# The same upstream behind a provider with a concurrency cap it never reaches: what a
# slot costs (one acquire and one release on the board SHARED_STATE_URL names).
CAPPED_MODEL = "together/gpt-4o-mini"
CAP = 100000


@dataclass
class Target:
    """One server the plain requests are measured against."""

    label: str
    pid: int
    url: str
    model: str
    headers: dict = None


@dataclass
class Profile:
    """How much load a mode applies."""

    name: str
    duration: float         # seconds per measured load run
    warmup: float           # seconds of unmeasured load before each run
    conns: tuple
    timing_samples: int     # sequential requests read for Server-Timing
    first_byte_samples: int
    streams: int            # concurrent slow streams
    stream_chunks: int
    stream_interval: float
    out: str


FULL = Profile("full", 10, 2, (1, 8, 64), 300, 40, 500, 20, 0.1, "latest.md")
# --check: ~5 s of load at a trickle (4 threads x 25 req/s), a few streams.
CHECK = Profile("check", 2, 0.3, (4,), 20, 5, 20, 5, 0.1, "check.md")
CHECK_RATE = 25


def parse_args(argv):
    """Return the command line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="smoke run for CI: no nginx/wrk, low rate, asserts no timings")
    parser.add_argument("--duration", type=float, help="seconds per load run")
    parser.add_argument("--streams", type=int, help="concurrent slow streams")
    parser.add_argument("--log-level", default="warning",
                        help="gateway LOG_LEVEL (default warning: no access lines)")
    parser.add_argument("--profile", action="store_true",
                        help="also profile the gateway with py-spy under an extra load run")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir with logs")
    parser.add_argument("--no-portkey", action="store_true",
                        help="leave out the optional Portkey peer (full mode only)")
    return parser.parse_args(argv)


def profile_for(args):
    """Return the mode's Profile with the command line's overrides applied."""
    base = CHECK if args.check else FULL
    return Profile(**{**base.__dict__,
                      "duration": args.duration or base.duration,
                      "streams": args.streams or base.streams})


def wait_http(url, what, timeout=30.0, process=None, procs=None):
    """Wait until GET ``url`` answers 200 (and ``process`` still runs)."""
    def ready():
        if process is not None:
            procs.check_alive(process)
        try:
            return requests.get(url, timeout=1).status_code == 200
        except requests.RequestException:
            return False
    try:
        wait_until(ready, timeout, what)
    except RuntimeError as exc:
        tail = f"\n{procs.log_tail(process)}" if process is not None else ""
        raise RuntimeError(f"{exc}{tail}") from None


def start_stream_upstream(procs):
    """Start bench/upstream.py in its own process; return its base URL."""
    port = free_port()
    process = procs.start("upstream", [sys.executable, os.path.join(BENCH, "upstream.py"),
                                       "--port", str(port)])
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/v1/models", "bench/upstream.py", process=process, procs=procs)
    return process, url


def nginx_binary():
    """Return the nginx binary, or raise with how to install it."""
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx")
                                      else None)
    if not found or not shutil.which("wrk"):
        raise RuntimeError("the full benchmark needs nginx and wrk: "
                           "apt-get install -y nginx-light wrk (or run with --check)")
    return found


def start_nginx(procs, workdir):
    """Start nginx with a generated config answering fixed JSON; return (process, URL)."""
    binary = nginx_binary()
    prefix = os.path.join(workdir, "nginx")
    os.makedirs(prefix)
    port = free_port()
    with open(os.path.join(BENCH, "nginx.conf.template")) as handle:
        template = string.Template(handle.read())
    conf = os.path.join(prefix, "nginx.conf")
    with open(conf, "w") as handle:
        handle.write(template.substitute(prefix=prefix, port=port,
                                         completion=COMPLETION_JSON, models=MODELS_JSON))
    process = procs.start("nginx", [binary, "-p", prefix, "-c", conf,
                                    "-e", os.path.join(prefix, "error.log")])
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/v1/models", "nginx", process=process, procs=procs)
    return process, url


def write_aliases(workdir):
    """Write the benchmark's alias file (one alias, one entry); return its path."""
    path = os.path.join(workdir, "aliases.yaml")
    with open(path, "w") as handle:
        handle.write(f'aliases:\n  {ALIAS}:\n    description: "benchmark"\n'
                     f"    chain:\n      - {MODEL}\n"
                     f'  {CACHED}:\n    description: "benchmark, cached"\n'
                     f"    cache_ttl: 3600\n    chain:\n      - {MODEL}\n"
                     f"default: {ALIAS}\n")
    return path


_NOT_INHERITED = ("OLLAMA_URL", "PROMETHEUS_MULTIPROC_DIR", "ALIASES_PATH", "GUNICORN_THREADS",
                  "WEB_CONCURRENCY", "CORS_ORIGINS", "LOG_LEVEL", "HOST", "PORT")


def _inherited(name):
    """Say whether an environment variable of ours may reach the gateway."""
    return not (name.endswith(("_API_KEY", "_BASE_URL"))
                or name.startswith(("MANA_LLM_", "GPU_")) or name in _NOT_INHERITED)


def gateway_env(port, plain_url, stream_url, aliases, log_level):
    """Return the gateway's environment: production settings, providers on 127.0.0.1."""
    env = {k: v for k, v in os.environ.items() if _inherited(k)}
    env.update({"HOST": "127.0.0.1", "PORT": str(port), "WEB_CONCURRENCY": "2",
                "LOG_LEVEL": log_level, "ALIASES_PATH": aliases,
                "OPENAI_API_KEY": "bench-key", "OPENAI_BASE_URL": plain_url + "/v1",
                "GROQ_API_KEY": "bench-key", "GROQ_BASE_URL": stream_url + "/v1",
                "TOGETHER_API_KEY": "bench-key", "TOGETHER_BASE_URL": plain_url + "/v1",
                "TOGETHER_MAX_CONCURRENCY": str(CAP),
                # No recycling mid-run: a recycled worker's CPU time leaves /proc
                # with it, and its replacement's warm-up lands in the latencies.
                "MAX_REQUESTS": "0",
                # Ollama is always configured and probed: keep its probe on this box.
                "OLLAMA_URL": stream_url})
    return env


def start_gateway(procs, env):
    """Start ``gunicorn -c gunicorn.conf.py`` from the repo root; return (process, URL)."""
    script = os.path.join(os.path.dirname(sys.executable), "gunicorn")
    argv = [script] if os.path.exists(script) else [sys.executable, "-m", "gunicorn"]
    process = procs.start("gateway", argv + ["-c", "gunicorn.conf.py"], env=env, cwd=REPO)
    url = f"http://127.0.0.1:{env['PORT']}"
    workers = int(env["WEB_CONCURRENCY"])
    wait_http(url + "/health", "the gateway", timeout=60, process=process, procs=procs)
    wait_until(lambda: len(process_tree(process.pid)) >= workers + 1, 30, "the gateway's workers")
    return process, url


PASSTHROUGH = "bare Flask passthrough (2x16)"
HITS = f"gateway, cache hits ({CACHED})"
PORTKEY = "Portkey OSS gateway (Node, 1 process)"


def start_portkey(args, procs, plain_url, notes):
    """Return Portkey as a Target list of one, or none (with a note why) when it cannot run."""
    if args.no_portkey:
        notes.append("Portkey: left out (--no-portkey)")
        return []
    print("starting Portkey (npm, cached after the first run) ...", flush=True)
    try:
        process, url = portkey.start(procs, plain_url)
    except RuntimeError as exc:
        print(f"  Portkey skipped: {str(exc).splitlines()[0]}", flush=True)
        notes.append(f"Portkey: skipped ({str(exc).splitlines()[0]})")
        return []
    notes.append(f"Portkey: {portkey.PACKAGE}, node, provider openai with a custom host "
                 "pointing at the same nginx")
    return [Target(PORTKEY, process.pid, url, portkey.MODEL, portkey.headers(plain_url))]


def start_passthrough(procs, plain_url):
    """Start the bare passthrough baseline (bench/passthrough.py, 2 x 16); return (process, URL)."""
    port = free_port()
    script = os.path.join(os.path.dirname(sys.executable), "gunicorn")
    argv = [script] if os.path.exists(script) else [sys.executable, "-m", "gunicorn"]
    env = dict(os.environ, UPSTREAM_URL=plain_url + "/v1")
    # -c /dev/null: run from the repo root, gunicorn would load our gunicorn.conf.py.
    process = procs.start("passthrough", argv + [
        "-c", os.devnull, "-w", "2", "--threads", "16", "-k", "gthread", "-b", f"127.0.0.1:{port}",
        "--no-control-socket", "--log-level", "warning", "bench.passthrough:app"],
        env=env, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: len(process_tree(process.pid)) >= 3, 30, "the passthrough's workers")
    wait_until(lambda: _answers(url), 30, "the passthrough")
    return process, url


def _answers(url):
    try:
        return requests.post(url + clients.CHAT_PATH, json=clients.chat_body(MODEL),
                             timeout=2).status_code == 200
    except requests.RequestException:
        return False


def smoke_gateway(url):
    """Send one plain and one streamed request through the gateway; raise if either fails."""
    for model in (MODEL, ALIAS, CACHED, STREAM_MODEL, CAPPED_MODEL):
        response = requests.post(url + clients.CHAT_PATH, json=clients.chat_body(model),
                                 timeout=10)
        if response.status_code != 200:
            raise RuntimeError(f"gateway answered {response.status_code} for {model}: "
                               f"{response.text[:300]}")
    port = int(url.rsplit(":", 1)[1])
    body = clients.chat_body(STREAM_MODEL, stream=True, bench_chunks=2, bench_interval=0.01)
    result = clients.stream_once(port, body)
    if not result.ok:
        raise RuntimeError(f"gateway stream failed: {result.error}")


def load(profile, url, model, conns, duration, headers=None):
    """Apply one load run: wrk in full mode, the Python client in check mode."""
    if profile.name == "check":
        return clients.run_python_load(url, model, conns, duration, CHECK_RATE)
    return clients.run_wrk(url, model, conns, duration, headers)


def measure(profile, target, conns, upstream_url):
    """Warm up, then load a target; return a Row with the server tree's CPU and RSS."""
    server_pid, url, model, headers = target.pid, target.url, target.model, target.headers
    if profile.warmup:
        load(profile, url, model, conns, profile.warmup, headers)
    accepted = clients.accepted_connections(upstream_url)
    before, box, ours = cpu_ticks(server_pid), busy_cpu_seconds(), tree_cpu_seconds(os.getpid())
    stats = load(profile, url, model, conns, profile.duration, headers)
    cpu = cpu_seconds_between(before, cpu_ticks(server_pid))
    # Everything this run started descends from this process (wrk is reaped
    # by now), so the rest of the box's busy time belongs to strangers.
    others = (busy_cpu_seconds() - box) - (tree_cpu_seconds(os.getpid()) - ours)
    # Minus one: the connection that asked for the count.
    opened = clients.accepted_connections(upstream_url) - accepted - 1
    cpu_ms = cpu * 1000 / stats.requests if stats.requests else 0.0
    return report.Row(model, conns, stats, cpu_ms, rss_mib(server_pid), opened,
                      others_cores=max(0.0, others / stats.seconds) if stats.seconds else 0.0)


def plain_rows(profile, targets, upstream_url):
    """Run every target at every connection count; return report Rows, direct first."""
    rows = []
    for conns in profile.conns:
        direct = None
        for target in targets:
            print(f"  {target.label}, {conns} conns ...", flush=True)
            row = measure(profile, target, conns, upstream_url)
            row.path = target.label
            if direct is None:
                direct = row
            else:
                row.added_p50 = row.stats.p50 - direct.stats.p50
                row.added_p99 = row.stats.p99 - direct.stats.p99
            rows.append(row)
    return rows


def first_bytes(profile, stream_url, gateway_url):
    """Return StreamResults of sequential streams, direct and through the gateway.

    Also return how many upstream connections the gateway opened for its
    streams (one per stream means none was reused).
    """
    direct_port = int(stream_url.rsplit(":", 1)[1])
    gateway_port = int(gateway_url.rsplit(":", 1)[1])
    clients.first_byte_times(direct_port, "gpt-4o-mini", 3)
    clients.first_byte_times(gateway_port, STREAM_MODEL, 3)
    n = profile.first_byte_samples
    direct = clients.first_byte_times(direct_port, "gpt-4o-mini", n)
    accepted = clients.accepted_connections(stream_url)
    gateway = clients.first_byte_times(gateway_port, STREAM_MODEL, n)
    opened = clients.accepted_connections(stream_url) - accepted - 1
    return direct, gateway, opened


def hold_many_streams(profile, gateway):
    """Hold the profile's number of slow streams open through the gateway."""
    process, url = gateway
    port = int(url.rsplit(":", 1)[1])
    return clients.many_streams(port, STREAM_MODEL, profile.streams, profile.stream_chunks,
                                profile.stream_interval, lambda: rss_mib(process.pid))


def profile_gateway(profile, gateway):
    """Profile the gateway under one extra, unmeasured load run; return a markdown summary."""
    process, url = gateway
    conns = 8 if 8 in profile.conns else profile.conns[-1]
    out = os.path.join(BENCH, "results", "profile-raw.txt")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    print(f"  profiling the gateway at {conns} conns ...", flush=True)
    recorder = hotpath.start_recording(process.pid, profile.duration, out)
    try:
        time.sleep(1)   # py-spy attaches to the workers first
        load(profile, url, MODEL, conns, profile.duration)
        _, stderr = recorder.communicate(timeout=60)
    finally:
        if recorder.poll() is None:
            recorder.kill()
    if recorder.returncode != 0:
        raise RuntimeError(f"py-spy failed: {stderr.decode(errors='replace')[-500:]}")
    return (f"py-spy record --gil at {conns} connections, model `{MODEL}` (an extra run, not "
            f"one of the measured ones; raw stacks in bench/results/profile-raw.txt)\n\n"
            + hotpath.summarise(out))


def targets_of(rows, direct_fb, gateway_fb, many):
    """Return the figures beside their targets: (name, measured, target, met)."""
    gw = [r for r in rows if r.path.startswith("gateway, direct")]
    at = {r.conns: r for r in gw}
    fb_overhead = (report.first_byte_summary(gateway_fb)[0]
                   - report.first_byte_summary(direct_fb)[0])
    worst_cpu = max(r.cpu_ms for r in gw)
    rss = max(r.rss_mib for r in rows if r.path.startswith("gateway"))
    figures = []
    if 1 in at:
        figures += [("added p50 at 1 client", f"{at[1].added_p50:.2f} ms",
                     "<= 1.6 ms (stretch 0.9)", at[1].added_p50 <= 1.6),
                    ("added p99 at 1 client", f"{at[1].added_p99:.2f} ms", "<= 3 ms",
                     at[1].added_p99 <= 3)]
    if 64 in at:
        figures.append(("RPS at 64 clients", f"{at[64].stats.rps:,.0f}", ">= 1,200",
                        at[64].stats.rps >= 1200))
    figures += [
        ("CPU per request (worst of the runs)", f"{worst_cpu:.2f} ms",
         "<= 1.6 ms (stretch 1.0)", worst_cpu <= 1.6),
        ("stream first-byte overhead (median)", f"{fb_overhead:+.2f} ms", "<= 2.5 ms",
         fb_overhead <= 2.5),
        ("master + 2 workers RSS after load", f"{rss:.1f} MiB", "< 150 MiB", rss < 150),
        (f"{many.count} slow streams: failed / peak held open at once",
         f"{many.failed} / {many.peak_open}", f"0 / {many.count}",
         many.failed == 0 and many.peak_open == many.count),
        ("RSS while they are open", f"{many.rss_peak_mib:.1f} MiB", "< 300 MiB",
         many.rss_peak_mib < 300),
    ]
    return figures + against_passthrough(rows, at) + cache_hits(rows)


def cache_hits(rows):
    """Return the cache hit path's figures beside the passthrough's of the same run.

    The targets: a hit adds at most the passthrough's p50 at 1 client, and
    serves at least 2 x the passthrough's RPS at 64 connections.
    """
    base = {r.conns: r for r in rows if r.path == PASSTHROUGH}
    hits = {r.conns: r for r in rows if r.path == HITS}
    figures = []
    if 1 in base and 1 in hits:
        figures.append(("cache hit: added p50 at 1 client vs the passthrough's (same run)",
                        f"{hits[1].added_p50:.2f} vs {base[1].added_p50:.2f} ms",
                        "<= the passthrough's", hits[1].added_p50 <= base[1].added_p50))
    if 64 in base and 64 in hits:
        ratio = hits[64].stats.rps / base[64].stats.rps if base[64].stats.rps else 0.0
        figures.append(("cache hit: RPS at 64 clients vs the passthrough (same run)",
                        f"{hits[64].stats.rps:,.0f} vs {base[64].stats.rps:,.0f} "
                        f"({ratio:.2f} x)", ">= 2 x", ratio >= 2))
    return figures


def against_passthrough(rows, at):
    """Return the gateway's figures beside the passthrough (and Portkey) of the same run.

    The targets: added p50 at 1 client at most 0.75 x the passthrough's,
    RPS at 64 connections at least 1.1 x, CPU per request at most 0.8 x.
    """
    base = {r.conns: r for r in rows if r.path == PASSTHROUGH}
    peer = {r.conns: r for r in rows if r.path == PORTKEY}
    figures = []
    if 1 in base and 1 in at:
        ratio = at[1].added_p50 / base[1].added_p50 if base[1].added_p50 > 0 else 0.0
        figures.append(("added p50 at 1 client vs the passthrough (same run)",
                        f"{at[1].added_p50:.2f} vs {base[1].added_p50:.2f} ms "
                        f"({ratio:.2f} x)", "<= 0.75 x", ratio <= 0.75))
    if 64 in base and 64 in at:
        rps = at[64].stats.rps / base[64].stats.rps if base[64].stats.rps else 0.0
        cpu = at[64].cpu_ms / base[64].cpu_ms if base[64].cpu_ms else 0.0
        figures += [("RPS at 64 clients vs the passthrough (same run)",
                     f"{at[64].stats.rps:,.0f} vs {base[64].stats.rps:,.0f} ({rps:.2f} x)",
                     ">= 1.1 x", rps >= 1.1),
                    ("CPU per request at 64 vs the passthrough (same run)",
                     f"{at[64].cpu_ms:.2f} vs {base[64].cpu_ms:.2f} ms ({cpu:.2f} x)",
                     "<= 0.8 x", cpu <= 0.8)]
    for conns, name in ((1, "added p50 at 1 client"), (1, "added p99 at 1 client")):
        if conns in peer and conns in at:
            ours = at[conns].added_p50 if "p50" in name else at[conns].added_p99
            theirs = peer[conns].added_p50 if "p50" in name else peer[conns].added_p99
            figures.append((f"{name} vs Portkey (same run)",
                            f"{ours:.2f} vs {theirs:.2f} ms", "below Portkey's",
                            ours < theirs))
    if 64 in peer and 64 in at:
        figures.append(("RPS at 64 clients vs Portkey (same run)",
                        f"{at[64].stats.rps:,.0f} vs {peer[64].stats.rps:,.0f}",
                        "above Portkey's", at[64].stats.rps > peer[64].stats.rps))
    return figures


def tool_versions():
    """Return the versions of nginx and wrk, as they print them."""
    versions = []
    for argv in (["nginx", "-v"], ["wrk", "-v"]):
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=5)
        except OSError:
            continue
        text = (out.stdout + out.stderr).strip().splitlines()
        versions.append(text[0] if text else argv[0])
    return ", ".join(versions)


def settings_lines(profile, args):
    """Return what the numbers were measured with, for the report."""
    threads = runpy.run_path(os.path.join(REPO, "gunicorn.conf.py"))["threads"]
    if profile.name == "check":
        loader = (f"Python client, {profile.conns[0]} threads x {CHECK_RATE} req/s, "
                  f"{profile.duration:g} s per run; direct upstream is bench/upstream.py")
    else:
        loader = (f"wrk -t min(c,2) -c c -d {profile.duration:g}s --latency "
                  f"(after a {profile.warmup:g} s warm-up); direct upstream is nginx "
                  f"(1 worker, access_log off; {tool_versions()})")
    return [
        f"mode: {profile.name}; load: {loader}",
        f"gateway: gunicorn -c gunicorn.conf.py, WEB_CONCURRENCY=2, {threads} threads "
        f"(the config's default), LOG_LEVEL={args.log_level}"
        + (" (the per-request access line is info, so it is not written here)"
           if args.log_level in ("warning", "error", "critical") else ""),
        f"requests: model `{MODEL}` (direct), `{ALIAS}` (alias whose chain is `{MODEL}`) and "
        f"`{CACHED}` (the same alias with cache_ttl: after the first, every request is a "
        "cache hit); "
        f"streams: `{STREAM_MODEL}` from bench/upstream.py (Python, own process); "
        f"capped model: `{CAPPED_MODEL}` (same upstream, TOGETHER_MAX_CONCURRENCY={CAP}, "
        f"never reached)",
        "shared board: SHARED_STATE_URL="
        + (os.environ.get("SHARED_STATE_URL") or "(unset: the instance's own SQLite file)"),
        "server CPU ms/req: utime+stime of the server's process tree (/proc) over the run, "
        "divided by the requests the client counted; RSS: summed VmRSS after the run",
        "others' CPU: cores used during the run by processes this benchmark did not start; "
        "above ~0.1 the run was disturbed and its figures are not comparable",
    ]


def start_servers(profile, args, procs, workdir):
    """Start the upstreams and the gateway; return (plain, stream URL, gateway)."""
    stream_proc, stream_url = start_stream_upstream(procs)
    plain = (stream_proc, stream_url) if profile.name == "check" \
        else start_nginx(procs, workdir)
    env = gateway_env(free_port(), plain[1], stream_url, write_aliases(workdir),
                      args.log_level)
    gateway = start_gateway(procs, env)
    smoke_gateway(gateway[1])
    return plain, stream_url, gateway


def run(profile, args, procs, workdir):
    """Run the whole benchmark; return (report text, whether every request succeeded)."""
    (plain_proc, plain_url), stream_url, gateway = start_servers(profile, args, procs,
                                                                 workdir)
    direct_label = "direct upstream" + (" (nginx)" if profile.name == "full" else "")
    targets = [Target(direct_label, plain_proc.pid, plain_url, MODEL)]
    peers = []
    if profile.name == "full":
        passthrough = start_passthrough(procs, plain_url)
        targets.append(Target(PASSTHROUGH, passthrough[0].pid, passthrough[1], MODEL))
        targets += start_portkey(args, procs, plain_url, peers)
    targets += [Target("gateway, direct model", gateway[0].pid, gateway[1], MODEL),
                Target(f"gateway, alias {ALIAS}", gateway[0].pid, gateway[1], ALIAS),
                Target(HITS, gateway[0].pid, gateway[1], CACHED),
                Target("gateway, capped model", gateway[0].pid, gateway[1], CAPPED_MODEL)]
    print("plain requests:", flush=True)
    rows = plain_rows(profile, targets, plain_url)
    profiled = profile_gateway(profile, gateway) if args.profile else None
    timing = clients.server_timing(gateway[1], MODEL, profile.timing_samples)
    print("streams: first byte ...", flush=True)
    direct_fb, gateway_fb, stream_conns = first_bytes(profile, stream_url, gateway[1])
    print(f"streams: {profile.streams} at once ...", flush=True)
    many = hold_many_streams(profile, gateway)
    time.sleep(0.5)
    sections = [
        ("Plain requests: direct upstream vs through the gateway", report.render_load(rows)),
        ("Server-Timing reported by the gateway (median of "
         f"{profile.timing_samples} sequential requests)",
         ", ".join(f"{k} {v:.2f} ms" for k, v in timing.items()) or "(no header)"),
        ("Streams: time to first byte", report.render_streams(direct_fb, gateway_fb)
         + f"\n\nUpstream connections the gateway opened for its {len(gateway_fb)} "
         f"sequential streams: {stream_conns}"),
        ("Many streams through the gateway",
         report.render_many(many, profile.stream_chunks, profile.stream_interval,
                            rss_mib(gateway[0].pid))),
    ]
    if profiled:
        sections.append(("Where the gateway's Python time goes", profiled))
    if profile.name == "full":
        sections.append(("Figures beside their targets (informative, never asserted)",
                         report.render_targets(targets_of(rows, direct_fb, gateway_fb,
                                                          many))))
    text = report.render(f"mana-llm benchmark ({profile.name})", report.box_facts(REPO),
                         settings_lines(profile, args) + peers, sections)
    ok = (all(r.stats.errors == 0 and r.stats.requests > 0 for r in rows)
          and all(r.ok for r in direct_fb + gateway_fb) and many.failed == 0)
    return text, ok


def write_report(text, name):
    """Write the report under bench/results/; return its path."""
    directory = os.path.join(BENCH, "results")
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, name)
    with open(path, "w") as handle:
        handle.write(text)
    return path


def _exit_on_term(signum, frame):
    """Turn SIGTERM or SIGHUP into SystemExit so that the cleanup in ``main`` runs."""
    raise SystemExit(128 + signum)


def main(argv=None):
    """Run the benchmark; return the exit status (non-zero if anything failed)."""
    args = parse_args(argv)
    profile = profile_for(args)
    signal.signal(signal.SIGTERM, _exit_on_term)
    signal.signal(signal.SIGHUP, _exit_on_term)
    # Ctrl-C stops the run even when started from a shell that ignores SIGINT.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    raise_open_files_limit()
    os.environ.pop("GUNICORN_THREADS", None)    # the gateway runs with the config's default
    workdir = tempfile.mkdtemp(prefix="mana-llm-bench-")
    procs = Processes(workdir)
    failed = True
    try:
        text, ok = run(profile, args, procs, workdir)
        failed = False
    except RuntimeError as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        procs.stop_all()
        if args.keep or failed:
            print(f"logs kept in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print(text)
    print(f"written to {os.path.relpath(write_report(text, profile.out), REPO)}")
    if not ok:
        print("FAILED: some requests or streams failed (see the errors columns)",
              file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
