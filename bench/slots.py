"""What a capacity slot costs: one claim and one release, per board backend, in one process.

    .venv/bin/python bench/slots.py [--calls N] [--redis redis://127.0.0.1:6379/0]

Without ``--redis`` it starts Debian's redis-server on a free loopback
port for the run (and skips Redis if there is none). Prints the median
and p90 of claim + release in microseconds for: an uncapped provider
(no board touched), the per-worker share (no board), the SQLite board on
a temp file, and Redis. No load besides this one thread: what a capped
call adds to a request, not what the board does under contention.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from app.routing.board import GuardedBoard  # noqa: E402
from app.routing.board_sqlite import SqliteBoard  # noqa: E402
from app.routing.capacity import Capacity  # noqa: E402


def timings(capacity, provider, calls):
    """Return the seconds of each claim + release."""
    out = []
    for _ in range(calls):
        started = time.perf_counter()
        capacity.release(capacity.claim(provider))
        out.append(time.perf_counter() - started)
    return out


def row(label, seconds):
    ordered = sorted(seconds)
    p90 = ordered[int(len(ordered) * 0.9)]
    return f"| {label} | {statistics.median(ordered) * 1e6:.0f} | {p90 * 1e6:.0f} |"


def redis_url(args):
    """Return (URL, server to stop or None); (None, None) without Redis."""
    if args.redis:
        return args.redis, None
    from tests import redis_server

    if not redis_server.available():
        return None, None
    server = redis_server.RedisServer().start()
    return server.url, server


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--redis", help="an existing Redis to use (default: start one)")
    args = parser.parse_args(argv)
    caps = {"ollama": 1000}
    rows = [row("uncapped provider (no board touched)",
                timings(Capacity(caps), "groq", args.calls)),
            row("capped, no board (per-worker share)",
                timings(Capacity(caps), "ollama", args.calls))]
    with tempfile.TemporaryDirectory() as directory:
        board = SqliteBoard(os.path.join(directory, "board.sqlite3"))
        rows.append(row("capped, SQLite board (the default)",
                        timings(Capacity(caps, board=GuardedBoard(board)), "ollama",
                                args.calls)))
        board.close()
    url, server = redis_url(args)
    try:
        if url:
            from app.routing.board_redis import RedisBoard

            board = RedisBoard(url, "bench-slots:")
            rows.append(row("capped, Redis board (loopback)",
                            timings(Capacity(caps, board=GuardedBoard(board)), "ollama",
                                    args.calls)))
            board.close()
    finally:
        if server is not None:
            server.stop()
    print(f"claim + release, {args.calls} sequential calls each\n")
    print("| board | p50 µs | p90 µs |\n|---|---:|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
