"""Soak the real gateway: 32 clients for ten minutes while the primary upstream fails on and off.

    .venv/bin/python bench/soak.py                   # 600 s, faults every other minute
    .venv/bin/python bench/soak.py --duration 20 --fault-period 5   # smoke

Starts the gateway under its own gunicorn.conf.py (two workers, the shipped
aliases.yaml) with Ollama pointed at one fake upstream (the primary) and the
cloud providers at another (the fallback), each fake in its own process.
Client threads send plain and streamed chat through the alias and to direct
models, and a few embeddings. Every other ``--fault-period`` the primary
fails in the next way of FAULTS; in between it is healthy. Every failure a
client sees is recorded with its cause and whether an injected fault
explains it. Every 5 s the master's and each worker's RSS, open fds and
threads are read from /proc and a /metrics scrape is timed. The report goes
to stdout and to the kept temp dir, beside the gateway's log.
"""

import argparse
import json
import multiprocessing
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import requests

BENCH = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH)
sys.path.insert(0, REPO)  # for tests.fake_upstream, here and in the fakes' processes

from processes import Processes, free_port, raise_open_files_limit, wait_until  # noqa: E402
from run import gateway_env, start_gateway  # noqa: E402
from tests.fake_upstream import FakeUpstream  # noqa: E402

ALIAS = "mana/fast-text"                 # shipped chain: ollama -> groq -> (openrouter unset)
PRIMARY = "ollama/qwen2.5:7b"
CLOUD = "groq/llama-3.1-8b-instant"
EMBED_PRIMARY = "ollama/nomic-embed-text"
EMBED_CLOUD = "openai/text-embedding-3-small"
# (name, fake mode or "refused", behave options); cycled through, one per fault window.
FAULTS = (("500s", "status", {"status": 500}),
          ("refused", "refused", {}),
          ("drop mid-stream", "drop_after", {"chunks": 2}),
          ("429 Retry-After", "rate_limit", {"retry_after": 5}),
          ("malformed", "malformed", {}),
          ("hang", "hang", {}))
PRIMARY_TIMEOUT = 5          # OLLAMA_TIMEOUT: a hung primary costs this, then the walk moves on
CLIENT_TIMEOUT = 30
SAMPLE_EVERY = 5.0
WORKERS = 2                  # WEB_CONCURRENCY, as in run.gateway_env


def parse_args(argv):
    """Return the command line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=600, help="seconds of load")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--fault-period", type=float, default=60,
                        help="seconds healthy, then seconds faulty, and so on")
    parser.add_argument("--grace", type=float, default=15,
                        help="seconds after a fault ends in which the primary may still be "
                             "benched (a direct call to it failing then is explained)")
    parser.add_argument("--stream-share", type=float, default=0.3)
    parser.add_argument("--embed-share", type=float, default=0.03)
    parser.add_argument("--max-requests", help="MAX_REQUESTS for gunicorn (default: shipped)")
    parser.add_argument("--log-level", default="info",
                        help="gateway LOG_LEVEL (info: access lines with request ids)")
    parser.add_argument("--seed", type=int, default=1)
    return parser.parse_args(argv)


# --- the fakes, each in its own process -------------------------------------------------------

class ForgetfulFake(FakeUpstream):
    """A FakeUpstream that keeps no record of requests: a soak sends hundreds of thousands."""

    def _record(self, method, path, headers, body):
        """Record nothing."""


def serve_fake(name, control):
    """Serve a fake upstream until told to stop (or the parent goes); obey fault commands."""
    fake = ForgetfulFake(name=name).start()
    port = fake.port
    control.send(port)
    try:
        while True:
            if not control.poll(1.0):
                continue
            command, mode, opts = control.recv()  # EOFError once the parent is gone
            if command == "stop":
                break
            fake = obey(fake, name, port, mode, opts)
            control.send("ok")
    except (EOFError, KeyboardInterrupt):
        pass
    finally:
        if fake is not None:
            fake.stop()


def obey(fake, name, port, mode, opts):
    """Switch to ``mode`` ("ok", "refused" or a fake mode); return the fake, None if refusing."""
    if mode == "refused":
        if fake is not None:
            fake.stop()  # nothing listens: connections are refused
        return None
    fake = fake or restart(name, port)
    fake.reset()
    if mode != "ok":
        fake.behave(mode, **opts)
    return fake


def restart(name, port):
    """Start a fake on the same port again, retrying briefly while the port is released."""
    deadline = time.monotonic() + 10
    while True:
        try:
            return ForgetfulFake(name=name, port=port).start()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


class FakeProcess:
    """A fake upstream in a child process, driven over a pipe."""

    def __init__(self, name):
        context = multiprocessing.get_context("spawn")
        self.control, child_end = context.Pipe()
        self.process = context.Process(target=serve_fake, args=(name, child_end),
                                       name=f"fake-{name}", daemon=True)
        self.process.start()
        if not self.control.poll(30):
            raise RuntimeError(f"fake upstream {name} did not start")
        self.url = f"http://127.0.0.1:{self.control.recv()}"

    def set(self, mode, opts=None):
        """Switch the fake's behaviour; wait until it has."""
        self.control.send(("set", mode, opts or {}))
        if not self.control.poll(15):
            raise RuntimeError(f"fake upstream did not switch to {mode}")
        self.control.recv()

    def stop(self):
        """Stop the child: ask, then terminate, then kill."""
        try:
            self.control.send(("stop", None, None))
        except OSError:
            pass
        self.process.join(5)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)


# --- faults over time -------------------------------------------------------------------------

@dataclass
class Window:
    """One injected fault: its kind and when it was on (monotonic seconds)."""

    name: str
    start: float
    end: float = float("inf")


class FaultSchedule:
    """Toggle the primary's faults in a thread; answer which faults overlap a request."""

    def __init__(self, fake, period, grace):
        self.fake, self.period, self.grace = fake, period, grace
        self.windows = []
        self.lock = threading.Lock()

    def run(self, stop, end):
        """Healthy for a period, then the next fault for a period, until ``end`` or ``stop``."""
        index = 0
        while not stop.wait(min(self.period, max(0.0, end - time.monotonic()))):
            if time.monotonic() >= end:
                break
            name, mode, opts = FAULTS[index % len(FAULTS)]
            index += 1
            with self.lock:
                self.windows.append(Window(name, time.monotonic()))
            self.fake.set(mode, opts)
            print(f"  fault on: {name}", flush=True)
            stopped = stop.wait(min(self.period, max(0.0, end - time.monotonic())))
            self.fake.set("ok")
            with self.lock:
                self.windows[-1].end = time.monotonic()
            print(f"  fault off: {name}", flush=True)
            if stopped:
                break

    def overlapping(self, start, end):
        """Return the names of faults on (or within the grace after) between start and end."""
        with self.lock:
            return {w.name for w in self.windows
                    if w.start <= end and start <= w.end + self.grace}


# --- clients ----------------------------------------------------------------------------------

@dataclass
class Outcome:
    """What one request came to: ``cause`` is None for a success."""

    target: str
    kind: str          # plain | stream | embed
    cause: str = None
    started: bool = False  # a stream that had begun (200 and content) before it failed
    request_id: str = "-"


@dataclass
class Tally:
    """Everything the clients saw, shared between their threads."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    requests: Counter = field(default_factory=Counter)
    failures: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=lambda: defaultdict(list))

    def add(self, outcome, explained):
        """Count one request; keep up to 5 request ids per failure cause."""
        with self.lock:
            self.requests[outcome.kind] += 1
            if outcome.cause is None:
                return
            key = (explained, outcome.cause, outcome.target, outcome.kind)
            self.failures[key] += 1
            if len(self.examples[key]) < 5:
                self.examples[key].append(outcome.request_id)


def chat_body(model, stream):
    """Return a small chat request."""
    return {"model": model, "stream": stream, "max_tokens": 16,
            "messages": [{"role": "user", "content": "Say hello in five words."}]}


def error_cause(response):
    """Return ``"<status> <error type>"`` for an error answer."""
    try:
        error = response.json().get("error") or {}
        kind = error.get("type") or error.get("code") or "?"
    except (ValueError, AttributeError):
        kind = "not-json"
    return f"{response.status_code} {kind}"


def plain_outcome(outcome, response):
    """Judge a plain chat or embeddings answer."""
    if response.status_code != 200:
        outcome.cause = error_cause(response)
        return outcome
    try:
        body = response.json()
        ok = bool(body["choices"][0]["message"]["content"]) if outcome.kind == "plain" \
            else bool(body["data"][0]["embedding"])
    except (ValueError, KeyError, IndexError, TypeError):
        ok = False
    outcome.cause = None if ok else "200 bad-body"
    return outcome


def stream_outcome(outcome, response):
    """Read a stream to its end; judge it: content, then [DONE], with no error event."""
    if response.status_code != 200:
        outcome.cause = error_cause(response)
        return outcome
    done = False
    for line in response.iter_lines():
        if not line.startswith(b"data: "):
            continue
        data = line[6:]
        if data == b"[DONE]":
            done = True
            break
        event = json.loads(data)
        if "error" in event:
            error = event["error"] or {}
            outcome.cause = f"stream error event {error.get('type') or error.get('code')}"
            return outcome
        outcome.started = True
    if not done:
        outcome.cause = "stream ended without [DONE]"
    elif not outcome.started:
        outcome.cause = "stream without content"
    return outcome


def one_request(session, url, rng, args):
    """Send one request of a random kind; return its Outcome."""
    if rng.random() < args.embed_share:
        target = rng.choice((EMBED_PRIMARY, EMBED_CLOUD))
        outcome = Outcome(target, "embed")
        path, body, stream = "/v1/embeddings", {"model": target, "input": ["soak"]}, False
    else:
        target = rng.choices((ALIAS, PRIMARY, CLOUD), weights=(6, 2, 2))[0]
        stream = rng.random() < args.stream_share
        outcome = Outcome(target, "stream" if stream else "plain")
        path, body = "/v1/chat/completions", chat_body(target, stream)
    try:
        with session.post(url + path, json=body, stream=stream,
                          timeout=CLIENT_TIMEOUT) as response:
            outcome.request_id = response.headers.get("X-Request-ID", "-")
            judge = stream_outcome if stream else plain_outcome
            return judge(outcome, response)
    except (requests.RequestException, ValueError) as exc:
        outcome.cause = f"exception {type(exc).__name__}"
        return outcome


def explained(outcome, faults):
    """Say whether the faults on during the request explain its failure."""
    if not faults or outcome.target in (CLOUD, EMBED_CLOUD):
        return False  # the cloud fake never fails
    if outcome.target in (PRIMARY, EMBED_PRIMARY):
        return True   # a direct call to a failing (or still benched) primary
    # Through the alias the walk falls back, except once a stream has begun.
    return outcome.started and "drop mid-stream" in faults


def client(url, seed, args, schedule, tally, stop, end):
    """Send requests back to back until ``end`` or ``stop``."""
    rng = random.Random(seed)
    with requests.Session() as session:
        while not stop.is_set() and time.monotonic() < end:
            began = time.monotonic()
            outcome = one_request(session, url, rng, args)
            faults = schedule.overlapping(began, time.monotonic()) if outcome.cause else ()
            tally.add(outcome, explained(outcome, faults))


# --- sampling the processes -------------------------------------------------------------------

def read_proc(pid):
    """Return (RSS MiB, open fds, threads) of a process, or None if it is gone."""
    try:
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        with open(f"/proc/{pid}/status") as handle:
            fields = dict(line.split(":", 1) for line in handle if ":" in line)
    except OSError:
        return None
    return int(fields["VmRSS"].split()[0]) / 1024, fds, int(fields["Threads"])


def children(master):
    """Return the master's child pids (its workers)."""
    try:
        with open(f"/proc/{master}/task/{master}/children") as handle:
            return [int(pid) for pid in handle.read().split()]
    except OSError:
        return []


@dataclass
class Series:
    """One process's samples: (seconds since start, RSS MiB, fds, threads)."""

    samples: list = field(default_factory=list)


def sample(master, url, metrics_dir, stop, end, series, scrapes, files):
    """Every SAMPLE_EVERY seconds: /proc figures of master and workers, a timed scrape."""
    origin = time.monotonic()
    while not stop.is_set() and time.monotonic() < end + SAMPLE_EVERY:
        now = time.monotonic() - origin
        for pid in [master] + children(master):
            figures = read_proc(pid)
            if figures is not None:
                series[pid].samples.append((now,) + figures)
        began = time.perf_counter()
        try:
            if requests.get(url + "/metrics", timeout=10).status_code == 200:
                scrapes.append((time.perf_counter() - began) * 1000)
        except requests.RequestException:
            scrapes.append(float("nan"))
        files.append(len(os.listdir(metrics_dir)))
        stop.wait(SAMPLE_EVERY)


# --- the report -------------------------------------------------------------------------------

def process_lines(master, series):
    """Return one line per process: lifetime and RSS / fds / threads first, last, max."""
    lines = ["| process | seen (s) | RSS MiB first/last/max | fds first/last/max "
             "| threads first/last/max |", "|---|---|---|---|---|"]
    for pid, serie in sorted(series.items(), key=lambda item: item[1].samples[0][0]):
        rows = serie.samples
        role = "master" if pid == master else "worker"
        cells = []
        for column in (1, 2, 3):
            values = [row[column] for row in rows]
            fmt = "{:.1f}" if column == 1 else "{:d}"
            cells.append("/".join(fmt.format(v) for v in (values[0], values[-1], max(values))))
        lines.append(f"| {role} {pid} | {rows[0][0]:.0f}-{rows[-1][0]:.0f} | "
                     + " | ".join(cells) + " |")
    return lines


def growth_lines(master, series):
    """Return the RSS growth of the master and of workers that lived long, and overall maxima."""
    workers = {pid: s.samples for pid, s in series.items() if pid != master}
    lines = []
    if master in series:
        rows = series[master].samples
        lines.append(f"master: RSS {rows[0][1]:.1f} -> {rows[-1][1]:.1f} MiB, fds "
                     f"{rows[0][2]} -> {rows[-1][2]}, threads {rows[0][3]} -> {rows[-1][3]}")
    if workers:
        every = [row for rows in workers.values() for row in rows]
        lines.append(f"workers: {len(workers)} seen; max over the run RSS "
                     f"{max(r[1] for r in every):.1f} MiB, fds {max(r[2] for r in every)}, "
                     f"threads {max(r[3] for r in every)}")
        # A worker's samples from before its app booted (one thread) are not a baseline.
        booted = [[row for row in rows if row[3] > 1] for rows in workers.values()]
        long_lived = [rows for rows in booted if len(rows) >= 3]
        for label, pick in (("first", 0), ("last", -1)):
            if long_lived:
                rows = long_lived[pick]
                lines.append(f"{label} worker generation with >= 3 samples: RSS "
                             f"{rows[0][1]:.1f} -> {rows[-1][1]:.1f} MiB "
                             f"(+{(rows[-1][1] / rows[0][1] - 1) * 100:.0f} %) "
                             f"over {rows[-1][0] - rows[0][0]:.0f} s")
        longest = max(booted, key=len)
        if len(longest) >= 5:
            points = [longest[round(q * (len(longest) - 1) / 4)] for q in range(5)]
            lines.append("longest-lived worker RSS at 0/25/50/75/100 % of its samples: "
                         + ", ".join(f"{row[1]:.1f}" for row in points) + " MiB")
    return lines


def write_samples(path, series):
    """Write every sample as CSV: seconds, pid, RSS MiB, fds, threads."""
    with open(path, "w") as handle:
        handle.write("seconds,pid,rss_mib,fds,threads\n")
        for pid, serie in series.items():
            for seconds, rss, fds, threads in serie.samples:
                handle.write(f"{seconds:.1f},{pid},{rss:.1f},{fds},{threads}\n")


def failure_lines(tally):
    """Return the failures by cause, unexplained first, with request ids."""
    lines = []
    for (is_explained, cause, target, kind), count in sorted(
            tally.failures.items(), key=lambda item: (item[0][0], -item[1])):
        label = "explained" if is_explained else "UNEXPLAINED"
        ids = ", ".join(tally.examples[(is_explained, cause, target, kind)])
        lines.append(f"  {label:11} {count:6d}  {cause}  ({kind} {target})  ids: {ids}")
    return lines or ["  none"]


def report(args, tally, elapsed, master, series, scrapes, files, windows, workdir, load):
    """Return the report as text."""
    total = sum(tally.requests.values())
    unexplained = sum(n for key, n in tally.failures.items() if not key[0])
    failed = sum(tally.failures.values())
    good = [s for s in scrapes if s == s]
    lines = [f"# Soak: {args.duration:g} s, {args.clients} clients, faults every other "
             f"{args.fault_period:g} s", "",
             f"load average before {load[0]}, after {load[1]}",
             f"requests: {total} in {elapsed:.0f} s ({total / elapsed:.0f}/s): "
             + ", ".join(f"{k} {v}" for k, v in sorted(tally.requests.items())),
             f"failures: {failed} ({failed - unexplained} explained, {unexplained} unexplained)"]
    lines += failure_lines(tally)
    lines += ["faults: " + ", ".join(f"{w.name} {w.end - w.start:.0f} s" for w in windows)]
    lines += growth_lines(master, series)
    workers_seen = len([pid for pid in series if pid != master])
    lines += [f"worker recycles seen: {max(0, workers_seen - WORKERS)}"]
    if good:
        lines.append(f"/metrics scrape: {len(good)} timed, median {statistics.median(good):.1f} "
                     f"ms, max {max(good):.1f} ms; {len(scrapes) - len(good)} failed")
    if files:
        lines.append(f"metrics directory files: first {files[0]}, max {max(files)}, "
                     f"at the end {files[-1]}")
    lines += ["", *process_lines(master, series), "",
              f"gateway log and this report: {workdir}"]
    return "\n".join(lines)


# --- the run ----------------------------------------------------------------------------------

def start_everything(args, workdir, procs, fakes):
    """Start the fakes and the gateway; return (gateway process, URL, metrics dir)."""
    fakes["primary"] = FakeProcess("ollama")
    fakes["cloud"] = FakeProcess("cloud")
    metrics_dir = os.path.join(workdir, "metrics")
    os.makedirs(metrics_dir)
    env = gateway_env(free_port(), fakes["cloud"].url, fakes["cloud"].url,
                      os.path.join(REPO, "aliases.yaml"), args.log_level)
    env.update({"OLLAMA_URL": fakes["primary"].url, "OLLAMA_TIMEOUT": str(PRIMARY_TIMEOUT),
                "PROMETHEUS_MULTIPROC_DIR": metrics_dir})
    if args.max_requests is not None:
        env["MAX_REQUESTS"] = args.max_requests
    else:
        env.pop("MAX_REQUESTS", None)  # the shipped recycling, which a soak should see
    process, url = start_gateway(procs, env)
    wait_until(lambda: ready(url), 30, "a first chat answer through the alias")
    return process, url, metrics_dir


def ready(url):
    """Say whether the alias answers a plain chat request."""
    try:
        return requests.post(url + "/v1/chat/completions", json=chat_body(ALIAS, False),
                             timeout=5).status_code == 200
    except requests.RequestException:
        return False


def soak(args, workdir, procs, fakes):
    """Run the load, the faults and the sampler; return the report."""
    process, url, metrics_dir = start_everything(args, workdir, procs, fakes)
    print(f"gateway {url} (master {process.pid}), log in {workdir}", flush=True)
    load_before = os.getloadavg()
    stop, tally = threading.Event(), Tally()
    schedule = FaultSchedule(fakes["primary"], args.fault_period, args.grace)
    series, scrapes, files = defaultdict(Series), [], []
    began = time.monotonic()
    end = began + args.duration
    threads = [threading.Thread(target=client, args=(url, args.seed + n, args, schedule, tally,
                                                     stop, end), daemon=True)
               for n in range(args.clients)]
    threads += [threading.Thread(target=schedule.run, args=(stop, end), daemon=True),
                threading.Thread(target=sample, args=(process.pid, url, metrics_dir, stop, end,
                                                      series, scrapes, files), daemon=True)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads[:args.clients]:
            thread.join(max(0.0, end - time.monotonic()) + CLIENT_TIMEOUT + 5)
        elapsed = time.monotonic() - began  # the clients' time: last answer in
        for thread in threads[args.clients:]:
            thread.join(max(0.0, end - time.monotonic()) + CLIENT_TIMEOUT + SAMPLE_EVERY + 5)
    finally:
        stop.set()
    load = (fmt_load(load_before), fmt_load(os.getloadavg()))
    write_samples(os.path.join(workdir, "samples.csv"), series)
    return report(args, tally, elapsed, process.pid, series, scrapes, files,
                  schedule.windows, workdir, load)


def fmt_load(load):
    """Return a load average triple as text."""
    return " ".join(f"{x:.2f}" for x in load)


def main(argv=None):
    """Soak the gateway; print the report; stop everything started, whatever happens."""
    args = parse_args(argv)
    raise_open_files_limit()
    workdir = tempfile.mkdtemp(prefix="mana-llm-soak-")
    procs, fakes = Processes(workdir), {}
    try:
        text = soak(args, workdir, procs, fakes)
    except KeyboardInterrupt:
        text = None
    finally:
        procs.stop_all()
        for fake in fakes.values():
            fake.stop()
    if text is None:
        sys.exit(f"interrupted: everything stopped; gateway log in {workdir}")
    with open(os.path.join(workdir, "report.md"), "w") as handle:
        handle.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
