"""What named callers cost: one GPU_API_KEY vs a 50-caller key file, with and without limits.

    .venv/bin/python bench/callers.py [--duration 10] [--rounds 2] [--conns 8]

Starts nginx (the fixed chat completion of bench/run.py) and, per
scenario, the gateway under its own gunicorn.conf.py (default SQLite
board), then runs wrk with the scenario's key against a direct model.
Scenarios alternate round by round so a noisy neighbour hits all of them
alike. Reports requests/s and the gateway's CPU per request (its process
tree's utime+stime over the run); never asserts a timing.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

import run
from clients import CHAT_PATH
from processes import Processes, busy_cpu_seconds, free_port, stop_group, tree_cpu_seconds

sys.path.insert(0, run.REPO)
from app.callers import hash_key  # noqa: E402

CALLERS = 50


def key_file(workdir, limited):
    """Write a key file of CALLERS callers (two keys each); return its path."""
    callers = []
    for index in range(CALLERS):
        caller = {"name": f"svc-{index}",
                  "keys": [hash_key(f"key-{index}"), hash_key(f"old-key-{index}")],
                  "models": ["mana/*", "openai/*", "ollama/*"]}
        if limited:
            caller["limits"] = {"requests_per_minute": 10**8, "tokens_per_minute": 10**9,
                                "tokens_per_day": 10**10}
        callers.append(caller)
    path = os.path.join(workdir, f"keys-{'limited' if limited else 'open'}.json")
    with open(path, "w") as handle:
        json.dump({"callers": callers}, handle)  # JSON is YAML
    return path


def wrk(url, key, conns, duration):
    """Run wrk with ``key``; return (requests, errors, seconds)."""
    argv = ["wrk", "-t", str(min(conns, 2)), "-c", str(conns), "-d", f"{duration:g}s",
            "--timeout", "10s", "-H", f"Authorization: Bearer {key}",
            "-s", os.path.join(run.BENCH, "post.lua"), url + CHAT_PATH, "--", run.MODEL]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60).stdout
    line = next(ln for ln in out.splitlines() if ln.startswith("BENCH_JSON "))
    doc = json.loads(line.split(" ", 1)[1])
    return doc["requests"], sum(doc["errors"].values()), doc["duration_us"] / 1e6


def scenario(procs, workdir, plain_url, name, extra, key, args):
    """Start a gateway with ``extra`` env, load it; return a result row."""
    env = run.gateway_env(free_port(), plain_url, plain_url, run.write_aliases(workdir),
                          "warning")
    env.update(extra)
    process, url = run.start_gateway(procs, env)
    try:
        wrk(url, key, args.conns, 2)  # warm-up
        cpu0, busy0 = tree_cpu_seconds(process.pid), busy_cpu_seconds()
        done, errors, seconds = wrk(url, key, args.conns, args.duration)
        cpu = tree_cpu_seconds(process.pid) - cpu0
        others = busy_cpu_seconds() - busy0 - cpu
    finally:
        stop_group(process)
    return {"scenario": name, "req_s": done / seconds, "errors": errors,
            "cpu_ms_per_req": 1000 * cpu / max(done, 1), "others_cores": others / seconds}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--conns", type=int, default=8)
    args = parser.parse_args(argv)
    workdir = tempfile.mkdtemp(prefix="mana-llm-bench-callers-")
    procs = Processes(workdir)
    try:
        _, plain_url = run.start_nginx(procs, workdir)
        scenarios = [
            ("GPU_API_KEY (1 key)", {"GPU_API_KEY": "the-one-key"}, "the-one-key"),
            ("50 callers, no limits", {"KEYS_PATH": key_file(workdir, False)}, "key-25"),
            ("50 callers, limits", {"KEYS_PATH": key_file(workdir, True)}, "key-25"),
        ]
        rows = [scenario(procs, workdir, plain_url, name, extra, key, args)
                for _ in range(args.rounds) for name, extra, key in scenarios]
    finally:
        procs.stop_all()
    print(f"| scenario | req/s | gateway CPU ms/req | errors | others' CPU (cores) |  "
          f"({args.conns} conns, {args.duration:g} s)")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['scenario']} | {row['req_s']:.0f} | {row['cpu_ms_per_req']:.3f} | "
              f"{row['errors']} | {row['others_cores']:.2f} |")


if __name__ == "__main__":
    main()
